"""Shared rate limit across replicas: accuracy and added latency, Redis vs memory.

    python bench/shared_limit.py            # 1, 2, 4, 8 replicas; about 1.5 minutes
    python bench/shared_limit.py --replicas 1 2 --calls 200

For each replica count N, N `python -m proxy run` processes share one policy directory;
with `--redis` they share one Redis (a redis-server started here on a free port), with
memory each keeps its own budget. Two measurements per (N, backend):

* accuracy: `--calls` calls are sent at once, spread over the replicas, to an upstream
  with `rate: R/s, burst: 1, shared: true` and a queue; the rate observed at the fake
  upstream is (arrivals - 1) / (last - first), printed as observed / configured. Memory
  backends cannot share, so N replicas let about N x R through: the reason for Redis.
* hot path: the state work of one admitted call (paused_for + rate_take) timed in this
  process against memory and against Redis (through ResilientState): the cost of the
  shared limit itself, without HTTP or other processes competing for the CPUs.
* latency: closed-loop clients (2 per replica) call an upstream whose shared limit is far
  above the load for `--seconds`; p50/p99 of the whole call as the client sees it. The
  "added" columns are Redis minus memory at the same N: the cost of the shared state.
  Redis round trips per call are read from `INFO commandstats` (EVALSHA + EVAL calls).

Everything runs on loopback; the fake upstream is `python -m fakes echo` in its own
process. Numbers from small machines are dominated by CPU contention at high N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.redis_server import RedisServer, egress_fleet, require_redis  # noqa: E402


def policies(directory: Path, target: str, rate: float) -> Path:
    docs: list[dict[str, Any]] = [
        {
            "upstream": "limited",
            "target": target,
            "timeouts": {"total": "120s"},
            "rate_limit": {
                "rate": f"{rate:g}/s",
                "burst": 1,
                "shared": True,
                "queue": {"max_wait": "100s", "max_size": 100000},
            },
        },
        {
            "upstream": "fast",
            "target": target,
            "rate_limit": {"rate": "100000/s", "burst": 1000, "shared": True, "queue": {"max_wait": "1s"}},
        },
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


async def accuracy(http: aiohttp.ClientSession, urls: list[str], fake: str, calls: int) -> float:
    await (await http.post(fake + "/__fake__/reset")).release()

    async def one(i: int) -> None:
        async with http.get(f"{urls[i % len(urls)]}/limited/rl/{i}") as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"call failed: {r.status} {r.headers.get('X-Egressd-Error')}")

    await asyncio.gather(*(one(i) for i in range(calls)))
    async with http.get(fake + "/__fake__/ledger") as r:
        ledger = await r.json()
    times = sorted(q["t"] for q in ledger["requests"] if q["path"].startswith("/rl/"))
    return (len(times) - 1) / (times[-1] - times[0])


async def latency(http: aiohttp.ClientSession, urls: list[str], seconds: float) -> list[float]:
    samples: list[float] = []
    end = time.monotonic() + seconds

    async def client(url: str) -> None:
        i = 0
        while time.monotonic() < end:
            i += 1
            started = time.perf_counter()
            async with http.get(f"{url}/fast/items/{i}") as r:
                await r.read()
            samples.append(time.perf_counter() - started)

    await asyncio.gather(*(client(u) for u in urls for _ in range(2)))
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000


async def redis_calls(redis: RedisServer) -> int:
    """EVALSHA + EVAL calls the server has run so far."""
    import redis.asyncio as aioredis

    client = aioredis.Redis(port=redis.port)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))


async def measure(
    n: int, backend: str, redis: RedisServer | None, fake: str, work: Path, args: argparse.Namespace
) -> dict[str, float]:
    pol = policies(work / f"p-{n}-{backend}", fake, args.rate)
    url = redis.url if redis else None
    with egress_fleet(n, pol, redis_url=url, prefix=f"bench-{uuid.uuid4().hex[:6]}:", log_dir=work) as fleet:
        urls = [p.url for p in fleet]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await latency(http, urls, 0.3)  # warm-up: connections, pools, scripts
            observed = await accuracy(http, urls, fake, args.calls)
            before = await redis_calls(redis) if redis else 0
            samples = await latency(http, urls, args.seconds)
            after = await redis_calls(redis) if redis else 0
    return {
        "ratio": observed / args.rate,
        "p50": pct(samples, 0.5),
        "p99": pct(samples, 0.99),
        "calls": len(samples),
        "round_trips": (after - before) / len(samples) if redis else 0.0,
    }


async def hot_path(redis: RedisServer, calls: int = 5000) -> dict[str, dict[str, float]]:
    """The state work of one admitted call (paused_for + rate_take), in this process."""
    from proxy.state.base import StateBackend
    from proxy.state.memory import MemoryState
    from proxy.state.redis import RedisState
    from proxy.state.resilient import ResilientState

    shared = ResilientState(RedisState(redis.url, prefix=f"hot-{uuid.uuid4().hex[:6]}:"), MemoryState())
    await shared.connect()
    out: dict[str, dict[str, float]] = {}
    backends: dict[str, StateBackend] = {"memory": MemoryState(), "redis": shared}
    for name, state in backends.items():
        samples: list[float] = []
        for i in range(calls + 500):
            started = time.perf_counter()
            await state.paused_for("bench:rl:0")
            await state.rate_take("bench:rl:0", interval=1e-6, burst=1000, max_wait=1.0)
            if i >= 500:  # warm-up
                samples.append(time.perf_counter() - started)
        out[name] = {"p50": pct(samples, 0.5), "p99": pct(samples, 0.99)}
    await shared.close()
    return out


async def run_all(
    args: argparse.Namespace, redis: RedisServer, fake: str, work: Path
) -> dict[int, dict[str, dict[str, float]]]:
    results: dict[int, dict[str, dict[str, float]]] = {0: await hot_path(redis)}
    for n in args.replicas:
        results[n] = {
            "memory": await measure(n, "memory", None, fake, work, args),
            "redis": await measure(n, "redis", redis, fake, work, args),
        }
        print(f"  measured {n} replica(s)", file=sys.stderr, flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rate", type=float, default=100.0, help="configured shared rate, calls/s")
    parser.add_argument("--calls", type=int, default=300, help="calls per accuracy run")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per latency run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    require_redis()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="egressd-bench-"))
    fake_proc = subprocess.Popen(
        [sys.executable, "-m", "fakes", "echo"], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    redis = RedisServer()
    try:
        redis.start()
        assert fake_proc.stdout is not None
        fake = fake_proc.stdout.readline().strip()
        results = asyncio.run(run_all(args, redis, fake, work))
    finally:
        redis.cleanup()
        fake_proc.terminate()
        fake_proc.wait(timeout=5)
    elapsed = time.monotonic() - started
    print(
        f"\nShared rate limit: {args.rate:g}/s burst 1, {args.calls} calls at once per accuracy run; "
        f"latency: 2 closed-loop clients per replica for {args.seconds:g} s"
    )
    print(f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPU(s), {elapsed:.0f} s")
    print()
    header = (
        "| replicas | observed/configured redis | observed/configured memory | p50 redis | p50 memory "
        "| added p50 | p99 redis | p99 memory | added p99 | Redis round trips/call |"
    )
    print(header)
    print("|" + "---:|" * (header.count("|") - 1))
    hot = results.pop(0)
    for n, r in results.items():
        red, mem = r["redis"], r["memory"]
        print(
            f"| {n} | {red['ratio']:.3f} | {mem['ratio']:.3f} | {red['p50']:.2f} ms | {mem['p50']:.2f} ms "
            f"| {red['p50'] - mem['p50']:+.2f} ms | {red['p99']:.2f} ms | {mem['p99']:.2f} ms "
            f"| {red['p99'] - mem['p99']:+.2f} ms | {red['round_trips']:.2f} |"
        )
    red, mem = hot["redis"], hot["memory"]
    print()
    print("State work of one admitted call (paused_for + rate_take) in one process, no HTTP:")
    print()
    print("| backend | p50 | p99 |")
    print("|---|---:|---:|")
    print(f"| memory | {mem['p50'] * 1000:.0f} us | {mem['p99'] * 1000:.0f} us |")
    print(f"| redis (ResilientState) | {red['p50'] * 1000:.0f} us | {red['p99'] * 1000:.0f} us |")
    added50, added99 = (red["p50"] - mem["p50"]) * 1000, (red["p99"] - mem["p99"]) * 1000
    print(f"| added by Redis | {added50:+.0f} us | {added99:+.0f} us |")
    results[0] = hot
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
