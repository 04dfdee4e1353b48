"""What each resilience stage costs per call under load: egressd with subsets of
retry / circuit_breaker / rate_limit (far above the load), round-robin under `wrk`.

    python bench/stages_ab.py                      # none, retry, circuit, rate_limit, all
    python bench/stages_ab.py --rounds 12 --seconds 3 --variants none,all

Every variant is its own egressd process on one fast upstream (bench/upstream.py). Each
round runs every variant once, in a rotating order, for --seconds of `wrk -t1 -c32`; the
CPU per call is the process's utime+stime over the phase divided by the calls. Medians of
the rounds are printed with the spread, and each variant's throughput as a ratio to
"none". Differences of 1-2 us need 10 rounds or more on a shared 2-CPU machine; the
summary numbers for the docs come from bench/overhead.py. Needs wrk (apt-get install wrk).
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from overhead import HERE, ROOT, Server, cpu_seconds, free_port, start, stop, wait_port

BLOCKS = {
    "retry": "retry: {attempts: 3}\n",
    "circuit": "circuit_breaker: {}\n",
    "rate_limit": "rate_limit: {rate: 100000/s, burst: 1000}\n",
}
VARIANTS = {"none": (), "retry": ("retry",), "circuit": ("circuit",), "rate_limit": ("rate_limit",)}
VARIANTS["all"] = tuple(BLOCKS)


def _wrk(port: int, seconds: int) -> str:
    cmd = ["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://127.0.0.1:{port}/bench/v1/charges"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--variants", default="none,retry,circuit,rate_limit,all", help=f"from {', '.join(VARIANTS)}")
    a = p.parse_args()
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if not shutil.which("wrk"):
        print("wrk is needed (apt-get install wrk)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="egressd-stages-ab-"))
    servers: list[Server] = []
    try:
        up = start("upstream", [sys.executable, str(HERE / "upstream.py")], tmp, r"listening on [\d.]+:(\d+)")
        servers.append(up)
        proxies: dict[str, Server] = {}
        for name in names:
            pol = tmp / name
            pol.mkdir()
            text = f"upstream: bench\ntarget: http://127.0.0.1:{up.port}\n"
            (pol / "bench.yaml").write_text(text + "".join(BLOCKS[b] for b in VARIANTS[name]))
            port = free_port()
            cmd = [sys.executable, "-m", "proxy", "run", "--policies", str(pol), "--listen", f"127.0.0.1:{port}"]
            cmd += ["--admin", "127.0.0.1:0", "--log-format", "json", "--log-level", "info"]
            srv = start(f"egressd-{name}", cmd, tmp, "", timeout=0)
            servers.append(srv)
            srv.port = port
            proxies[name] = wait_port(srv)
        for name in names:  # warm every path once (imports, pools)
            _wrk(proxies[name].port, 1)
        cpu: dict[str, list[float]] = {n: [] for n in names}
        rps: dict[str, list[float]] = {n: [] for n in names}
        for r in range(a.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                srv = proxies[name]
                before = cpu_seconds(srv.pid)
                out = _wrk(srv.port, a.seconds)
                used = cpu_seconds(srv.pid) - before
                match = re.search(r"(\d+) requests in", out)
                calls = int(match.group(1)) if match else 0
                if calls:
                    cpu[name].append(used / calls * 1e6)
                    rps[name].append(calls / a.seconds)
        base = statistics.median(rps[names[0]])
        print(f"{a.rounds} rounds of {a.seconds} s, wrk -t1 -c32; ratio = rps / rps of {names[0]!r}")
        print(f"{'variant':12s} {'CPU us/call':>11s} {'(min-max)':>13s} {'rps':>8s} {'ratio':>6s}")
        for name in names:
            c = cpu[name]
            print(
                f"{name:12s} {statistics.median(c):11.1f} {f'{min(c):.1f}-{max(c):.1f}':>13s}"
                f" {statistics.median(rps[name]):8.0f} {statistics.median(rps[name]) / base:6.3f}"
            )
        return 0
    finally:
        for srv in reversed(servers):
            stop(srv)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
