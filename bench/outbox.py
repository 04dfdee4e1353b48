#!/usr/bin/env python
"""The outbox under a burst: accept at once, deliver at the provider's pace, lose nothing
and send nothing twice across kill -9 (issue 14's targets; docs/performance.md, "Outbox").

    python bench/outbox.py                    # 10,000 sends, kill -9 half way, ~2 minutes
    python bench/outbox.py --count 2000       # smaller
    python bench/outbox.py --no-kill          # delivery rate only
    python bench/outbox.py --json out.json    # the figures as JSON too

Parties, all on 127.0.0.1: the packaged fake SendGrid (`fakes.FakeServer`) in this event
loop, guarded by its own rate-limit fault at `--rate` calls/s (a call past it gets 429 and
is counted: the provider's limit); egressd as a real `python -m proxy run --data-dir DIR`
process (restartable: the tests' `Egressd`) with one upstream:

    sendgrid: rate_limit {rate: RATE/s, burst: 1, queue: {max_wait: 2s}}, retry 3 on [429, connect_error],
              outbox {when: always, concurrency: 16, probe_after: 1s}

1. The app offers `--count` sends as fast as `--clients` connections can (keep-alive,
   one request at a time each): acceptance latency per send (p50, p99, max) and the time
   until all were accepted. Every send carries `custom_args.n` = its number.
2. The worker delivers them; the delivery rate is measured on the fake's ledger between
   10 % and 45 % of the deliveries (before any kill).
3. Unless `--no-kill`: at 50 % delivered, kill -9; restart on the same data dir; wait
   until every send is delivered (or `--deadline`). Then count at the fake: sends
   delivered, sends delivered twice (same n), sends missing, provider 429s.

PASS when: every send delivered, none twice, no provider 429, acceptance p99 <= 20 ms,
delivery rate within +-5 % of `--rate`. Exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fakes import FakeServer  # noqa: E402
from tests.egressd_process import Egressd  # noqa: E402  (the tests' restartable `egressd run`)


def mail(n: int) -> bytes:
    return json.dumps(
        {
            "personalizations": [{"to": [{"email": f"customer{n}@example.org"}]}],
            "from": {"email": "shop@example.com"},
            "subject": f"Your order {n}",
            "content": [{"type": "text/plain", "value": "Thanks for your order."}],
            "custom_args": {"n": str(n)},
        }
    ).encode()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def offer(url: str, count: int, clients: int) -> tuple[list[float], float, Counter[int]]:
    """Offer `count` sends through `clients` connections; (latencies, seconds, statuses)."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    numbers = iter(range(count))
    headers = {"Authorization": "Bearer SG.bench-key", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            for n in numbers:
                body = mail(n)
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    latencies.append(time.perf_counter() - started)
                    statuses[resp.status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return latencies, time.perf_counter() - started, statuses


def delivered_at(fake: FakeServer) -> list[float]:
    return sorted(e.t for e in fake.ledger.effects("mail.sent"))


async def wait_until(check: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.1)
    return bool(check())


async def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    deadline = args.deadline or args.count / args.rate * 1.5 + 60

    work = Path(tempfile.mkdtemp(prefix="egressd-bench-outbox-"))
    # The provider's limit: the fake advertises it per minute (X-RateLimit-*, as SendGrid
    # does) and enforces it with a token bucket holding 100 ms of calls.
    async with FakeServer("sendgrid", rate_limit=int(args.rate * 60)) as sg:
        sg.faults.add(kind="rate_limit", path="/v3/mail/send", rate=args.rate, burst=max(1, int(args.rate / 10)))
        doc = {
            "upstream": "sendgrid",
            "target": sg.url,
            "provider": "sendgrid",
            "rate_limit": {"rate": f"{args.rate:g}/s", "burst": 1, "queue": {"max_wait": "2s"}},
            "retry": {"attempts": 3, "on": [429, "connect_error"], "backoff": {"initial": "200ms", "max": "2s"}},
            "outbox": {"when": "always", "concurrency": 16, "probe_after": "1s", "max_entries": 1_000_000},
        }
        policies = work / "policies"
        policies.mkdir()
        (policies / "sendgrid.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = Egressd(policies, drain=2.0, data_dir=work / "data")
        proc.start()
        rows: dict[str, Any] = {}
        try:
            latencies, accept_seconds, statuses = await offer(
                f"{proc.url}/sendgrid/v3/mail/send", args.count, args.clients
            )
            rows["accepted"] = statuses.get(202, 0)
            rows["accept_statuses"] = dict(statuses)
            rows["accept_p50_ms"] = pct(latencies, 0.50) * 1000
            rows["accept_p99_ms"] = pct(latencies, 0.99) * 1000
            rows["accept_max_ms"] = max(latencies) * 1000
            rows["accept_seconds"] = accept_seconds
            first = args.count if args.no_kill else args.count // 2
            await wait_until(lambda: sg.ledger.count("mail.sent") >= first, deadline)
            times = delivered_at(sg)
            lo, hi = int(args.count * 0.10), min(int(args.count * 0.45), len(times) - 1)
            window = times[lo : hi + 1]
            rows["delivery_rate"] = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 1 else float("nan")
            if not args.no_kill:
                rows["delivered_at_kill"] = sg.ledger.count("mail.sent")
                proc.signal(signal.SIGKILL)
                proc.wait()
                killed_at = time.monotonic()
                proc.start()
                rows["restart_seconds"] = time.monotonic() - killed_at
                await wait_until(lambda: sg.ledger.count("mail.sent") >= args.count, deadline)
                await asyncio.sleep(2.0)  # a send made twice would show up now
        finally:
            proc.stop()
        numbers = Counter(e.data["custom_args"]["n"] for e in sg.ledger.effects("mail.sent"))
        rows["delivered"] = len(numbers)
        rows["delivered_twice"] = sum(1 for c in numbers.values() if c > 1)
        rows["missing"] = args.count - len(numbers)
        rows["provider_429"] = sum(1 for r in sg.ledger.requests_to("/v3/mail/send", "POST") if r.status == 429)
        rows["probes"] = len(sg.ledger.requests_to("/v3/messages", "GET"))

    checks = {
        "every send delivered": rows["missing"] == 0,
        "none twice": rows["delivered_twice"] == 0,
        "no provider 429": rows["provider_429"] == 0,
        "acceptance p99 <= 20 ms": rows["accept_p99_ms"] <= 20.0,
        f"delivery rate {args.rate:g}/s +-5 %": abs(rows["delivery_rate"] - args.rate) <= 0.05 * args.rate,
    }
    print(f"# bench/outbox.py: {args.count} sends, provider limit {args.rate:g}/s, {args.clients} app connections")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print()
    print("| measure | value |")
    print("| --- | --- |")
    print(f"| sends accepted (202) | {rows['accepted']} of {args.count} {rows['accept_statuses']} |")
    print(f"| acceptance p50 / p99 / max | {rows['accept_p50_ms']:.2f} / {rows['accept_p99_ms']:.2f} / "
          f"{rows['accept_max_ms']:.1f} ms |")  # fmt: skip
    speed = args.count / rows["accept_seconds"]
    print(f"| all accepted after | {rows['accept_seconds']:.1f} s ({speed:.0f} sends/s) |")
    print(f"| delivery rate (10-45 % of the sends) | {rows['delivery_rate']:.1f} /s |")
    if not args.no_kill:
        print(f"| kill -9 at | {rows['delivered_at_kill']} delivered; restarted in {rows['restart_seconds']:.1f} s |")
    print(f"| delivered / twice / missing | {rows['delivered']} / {rows['delivered_twice']} / {rows['missing']} |")
    print(f"| provider 429s | {rows['provider_429']} |")
    print(f"| probes (Email Activity) | {rows['probes']} |")
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1, {"rows": rows, "checks": checks}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=100.0, help="the provider's limit, calls/s")
    parser.add_argument("--clients", type=int, default=16, help="app connections offering the sends")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--deadline", type=float, default=0.0, help="seconds to wait for delivery (0: derived)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    code, data = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
