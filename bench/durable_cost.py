"""What the durable store costs: CPU per keyed POST with `--data-dir` against `--data-dir none`.

    python bench/durable_cost.py                  # 3 rounds of 6 s at 300 calls/s, about 1.5 minutes
    python bench/durable_cost.py --rate 500 --rounds 5
    python bench/durable_cost.py --json out.json

Two egressd processes with the same policy (one upstream with `idempotency: {replay_ttl: 24h}`
in front of bench/upstream.py), one with a data dir on local disk (SQLite, WAL) and one with
`--data-dir none` (process memory). A paced open-loop client sends POSTs, each with a new
`Idempotency-Key` (so each one claims and completes a record: two SQLite write
transactions), at a fixed rate; the proxy's CPU time (utime+stime from /proc) is read before
and after. Rounds alternate the two targets. A third target sends GETs through the data-dir
process, which pay nothing (no record is written for a safe method).

Target (issue 11): CPU per keyed POST with the data dir <= 1.3x the same POST with memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.overhead import (  # noqa: E402
    Server,
    _client_paced,
    free_port,
    machine,
    pct,
    start,
    stop,
    wait_port,
)


async def paced(url: str, method: str, rate: float, seconds: float, pid: int) -> dict[str, Any]:
    """bench/overhead.py's paced client, each call with a new Idempotency-Key."""
    out = await _client_paced(url, rate, seconds, [pid], method=method, body=b'{"amount":2000}', keyed=True)
    return {**out, "cpu_us_per_call": out["cpu"][0] / out["calls"] * 1e6, "latencies": out["latencies"]}


def egressd(name: str, policies: Path, data_dir: str, tmp: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "proxy", "run", "--policies", str(policies), "--listen", f"127.0.0.1:{port}",
           "--admin", "127.0.0.1:0", "--log-level", "error", "--data-dir", data_dir]  # fmt: skip
    srv = start(name, cmd, tmp, "", timeout=0)
    srv.port = port
    return wait_port(srv)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="egressd-durable-") as tmpname:
        tmp = Path(tmpname)
        up = start("upstream", [sys.executable, str(HERE / "upstream.py"), "--port", "0"], tmp,
                   r"listening on [\d.]+:(\d+)")  # fmt: skip
        servers = [up]
        try:
            policies = tmp / "policies"
            policies.mkdir()
            (policies / "bench.yaml").write_text(
                f"upstream: bench\ntarget: http://127.0.0.1:{up.port}\nidempotency: {{replay_ttl: 24h}}\n"
            )
            disk = egressd("datadir", policies, str(tmp / "data"), tmp)
            memory = egressd("memory", policies, "none", tmp)
            servers += [disk, memory]
            targets = {
                "POST, --data-dir (SQLite)": (disk, "POST"),
                "POST, --data-dir none": (memory, "POST"),
                "GET, --data-dir (SQLite)": (disk, "GET"),
                "GET, --data-dir none": (memory, "GET"),
            }
            results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
            names = list(targets)
            for rnd in range(a.rounds):
                for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
                    srv, method = targets[name]
                    print(f"round {rnd + 1}/{a.rounds}: {name} ...", file=sys.stderr, flush=True)
                    url = f"http://127.0.0.1:{srv.port}/bench/sink"
                    results[name].append(asyncio.run(paced(url, method, a.rate, a.seconds, srv.pid)))
                    time.sleep(0.3)
        finally:
            for srv in reversed(servers):
                stop(srv)
    rows = []
    for name, runs in results.items():
        cpu = statistics.median(r["cpu_us_per_call"] for r in runs)
        lat = [x for r in runs for x in r["latencies"]]
        rows.append((name, cpu, pct(lat, 0.5) * 1000, pct(lat, 0.99) * 1000, sum(r["errors"] for r in runs)))
    by = {r[0]: r[1] for r in rows}
    print(f"\nmachine: {json.dumps(machine())}")
    print(f"command: python bench/durable_cost.py --rate {a.rate:g} --seconds {a.seconds:g} --rounds {a.rounds}\n")
    print("| target | CPU us/call (median of rounds) | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, cpu, p50, p99, errors in rows:
        print(f"| {name} | {cpu:.0f} | {p50:.2f} | {p99:.2f} | {errors} |")
    ratio_post = by["POST, --data-dir (SQLite)"] / by["POST, --data-dir none"]
    ratio_get = by["GET, --data-dir (SQLite)"] / by["GET, --data-dir none"]
    print(f"\nkeyed POST, data dir / memory: {ratio_post:.2f}x (target <= 1.3x)")
    print(f"GET, data dir / memory: {ratio_get:.2f}x (pays nothing: ~1.0x)")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "ratio_post": ratio_post, "ratio_get": ratio_get}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
