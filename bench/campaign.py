#!/usr/bin/env python
"""The reliability campaign: a bounded soak through egressd with random faults.

    python bench/campaign.py                 # 10 minutes, the figures in docs/reliability.md
    python bench/campaign.py --seconds 180   # shorter
    python bench/campaign.py --json out.json # raw figures too
    python bench/campaign.py --exactly-once  # then the exactly-once cases of bench/exactly_once.py

One process, one event loop: the fake providers (Stripe, SendGrid, echo), egressd (the real
`EgressServer`, with Redis when `redis-server` is installed) and the app's load. The app:

* pays through Stripe with one Idempotency-Key per order and retries on 5xx or a broken
  connection with the same key, until it hears an answer (as Stripe's SDKs do);
* sends e-mail through SendGrid once (no key: a resend could mail twice);
* reads and downloads through the echo upstream (streamed answers over 256 KiB);
* now and then sends a hostile request (traversal, smuggling, TRACE...).

Every `--fault-interval` seconds one fault from the matrix is injected: resets before and
in the middle of answers (also after the upstream acted), truncated and garbage answers,
drip-fed answers, hangs, 5xx bursts, 429 with Retry-After, refused connections, and Redis
killed or frozen (SIGSTOP). Every `--sample-interval` seconds: open FDs, RSS, asyncio tasks
and upstream connections (ESTABLISHED sockets to the fakes' ports).

Checks (exit status 1 when one fails): every request got exactly one answer (none lost),
no short 200, every payment key charged at most once (and exactly once when the app heard
200), every e-mail sent at most once (exactly once when the app heard 202), no hostile
request forwarded, and FDs back to their level after warm-up once the load stops.

`--exactly-once` (or `--exactly-once quick`) then runs bench/exactly_once.py's cases (each
exactly-once fault at its own size, side effects counted at the fakes) in a fresh event
loop: their table follows the campaign's report, their figures are `exactly_once` in the
`--json` file, and a failed case fails the run too. Without the flag nothing changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from fakes import FakeServer  # noqa: E402
from proxy.server import EgressServer, Settings  # noqa: E402
from proxy.state.base import StateBackend  # noqa: E402

BIG = 300_000  # over the transport's 256 KiB buffering threshold: streamed
HOSTILE = [
    b"GET /echo/hostile/../../stripe/v1/charges HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /echo/hostile/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /echo/hostile/%252e%252e/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /echo/hostile/..;/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /echo/hostile\\..\\x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET http://evil.example/echo/hostile HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"TRACE /echo/hostile HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /echo/hostile HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /echo/hostile-smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /echo/hostile HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /echo/hostile HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n",
    b"GET /echo/hostile HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
]


@dataclass
class Sample:
    t: float
    fds: int
    rss_kib: int
    tasks: int
    upstream_conns: int
    pool_busy: int = 0  # egressd's upstream connections carrying a call (lean client pools)
    pool_idle: int = 0  # ... and idle keep-alive ones (kept up to 2 x keepalive, then closed)
    redis_conns: int = 0  # egressd's connections to Redis (a pool of at most 32)
    app_conns: int = 0  # the app's connections to egressd (closed when the load stops)

    @property
    def fds_net(self) -> int:
        """Open FDs not counting connections that bounded pools keep open and that come and
        go with the load and the faults, not with leaks: idle pooled upstream connections
        (two FDs each in this process: egressd's end and the fake's), Redis connections
        (reopened after each Redis fault) and the app's connections to egressd (two each)."""
        return self.fds - 2 * self.pool_idle - self.redis_conns - 2 * self.app_conns


@dataclass
class Tally:
    requests: int = 0
    answered: int = 0
    aborted: int = 0  # a streamed answer cut after its headers: the honest signal, counted apart
    lost: int = 0  # no answer at all
    short_200: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[str] = field(default_factory=Counter)
    lost_errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    payments: dict[str, int] = field(default_factory=dict)  # key -> last status the app heard (0: none)
    emails: dict[str, int] = field(default_factory=dict)
    hostile_sent: int = 0
    hostile_answered: int = 0


# -- measurements ----------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def established_to(ports: set[int]) -> int:
    """ESTABLISHED TCP connections whose remote end is one of `ports` (egressd's pools)."""
    count = 0
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                local, remote, state = parts[1], parts[2], parts[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) in ports:
                    if int(local.rsplit(":", 1)[1], 16) not in ports:
                        count += 1
    return count


def slope_per_minute(samples: list[Sample], attr: str) -> float:
    """Least-squares slope of `attr` over time, per minute."""
    if len(samples) < 3:
        return 0.0
    xs = [s.t for s in samples]
    ys = [float(getattr(s, attr)) for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


# -- the campaign ----------------------------------------------------------------------------


def policies(stripe: str, sendgrid: str, echo: str) -> list[dict[str, Any]]:
    retry = {"attempts": 3, "backoff": {"initial": "50ms", "max": "500ms"}}
    return [
        {
            "upstream": "stripe",
            "target": stripe,
            "provider": "stripe",
            "auth": {"bearer": "sk_test_campaign"},
            "timeouts": {"connect": "1s", "attempt": "2s", "total": "5s"},
            # Long enough for any retry of the app's; short enough that memory reaches a steady state.
            "idempotency": {"replay_ttl": "2m"},
            "retry": retry,
            "rate_limit": {"rate": "400/s", "burst": 100, "queue": {"max_wait": "2s"}},
            "circuit_breaker": {"window": "10s", "min_requests": 50, "failure_rate": 0.9, "open_for": "2s"},
        },
        {
            "upstream": "sendgrid",
            "target": sendgrid,
            "provider": "sendgrid",
            "auth": {"bearer": "SG.campaign"},
            "timeouts": {"connect": "1s", "attempt": "2s", "total": "5s"},
            "retry": retry,
        },
        {
            "upstream": "echo",
            "target": echo,
            "timeouts": {"connect": "1s", "attempt": "2s", "total": "4s"},
            "retry": retry,
            "cache": {"ttl": "1s"},
        },
    ]


class Campaign:
    def __init__(
        self,
        *,
        seconds: float,
        concurrency: int,
        rate: float,
        fault_interval: float,
        sample_interval: float,
        redis: str,
        seed: int,
        quiet: bool,
    ) -> None:
        self.seconds = seconds
        self.concurrency = concurrency
        self.rate = rate
        self.fault_interval = fault_interval
        self.sample_interval = sample_interval
        self.redis_mode = redis
        self.rng = random.Random(seed)
        self.seed = seed
        self.quiet = quiet
        self.tally = Tally()
        self.samples: list[Sample] = []
        self.stop = asyncio.Event()
        self.redis: Any = None
        self.redis_url: str | None = None
        self.background: set[asyncio.Task[Any]] = set()
        # The fakes' ledgers are folded into these and emptied as the run goes, so that the
        # fakes' memory does not grow with the run and blur egressd's RSS slope.
        self.charges: Counter[str] = Counter()
        self.mails: Counter[str] = Counter()
        self.hostile_forwarded = 0
        self.fakes: tuple[FakeServer, FakeServer, FakeServer] | None = None
        self.server: EgressServer | None = None
        self.main_port = 0
        self.in_flight: dict[object, tuple[str, str, str, float]] = {}
        self.redis_lock = asyncio.Lock()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    # -- app traffic -------------------------------------------------------------------------
    async def _request(
        self, session: aiohttp.ClientSession, kind: str, method: str, url: str, expect_len: int | None = None, **kw: Any
    ) -> int:
        """One HTTP request; returns its status, or 0 when no answer came."""
        t = self.tally
        t.requests += 1
        t.by_kind[kind] += 1
        token = object()
        self.in_flight[token] = (kind, method, url, time.monotonic())
        try:
            async with session.request(method, url, **kw) as resp:
                status = resp.status
                try:
                    body = await resp.read()
                except aiohttp.ClientPayloadError:
                    t.aborted += 1
                    t.by_status["aborted"] += 1
                    return status
                t.answered += 1
                t.by_status[str(status)] += 1
                if status == 200 and expect_len is not None and len(body) != expect_len:
                    t.short_200 += 1
                return status
        except (aiohttp.ClientError, TimeoutError) as exc:
            t.lost += 1
            t.lost_errors[f"{kind}: {type(exc).__name__}"] += 1
            return 0
        finally:
            del self.in_flight[token]

    async def _pay(self, session: aiohttp.ClientSession, base: str) -> None:
        key = f"order-{uuid.uuid4().hex}"
        body = {"amount": "1999", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
        self.tally.payments[key] = 0
        for _ in range(6):
            status = await self._request(
                session, "payment", "POST", f"{base}/stripe/v1/payment_intents", data=body,
                headers={"Idempotency-Key": key},
            )  # fmt: skip
            self.tally.payments[key] = status
            if 0 < status < 500 and status != 429:
                return
            await asyncio.sleep(0.2)

    async def _mail(self, session: aiohttp.ClientSession, base: str) -> None:
        mail_id = uuid.uuid4().hex
        body = {
            "personalizations": [{"to": [{"email": f"user-{mail_id[:8]}@example.com"}]}],
            "from": {"email": "shop@example.com"},
            "subject": "Your receipt",
            "content": [{"type": "text/plain", "value": "Thanks!"}],
            "custom_args": {"campaign_id": mail_id},
        }
        self.tally.emails[mail_id] = await self._request(
            session, "email", "POST", f"{base}/sendgrid/v3/mail/send", json=body
        )

    async def worker(self, base: str) -> None:
        pause = self.concurrency / self.rate
        # egressd answers within a policy's total (5 s) plus the rate-limit queue (2 s); an
        # answer that has not come in 20 s is counted lost.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            while not self.stop.is_set():
                pick = self.rng.random()
                if pick < 0.35:
                    await self._pay(session, base)
                elif pick < 0.55:
                    await self._mail(session, base)
                elif pick < 0.75:
                    await self._request(session, "download", "GET", f"{base}/echo/bytes/{BIG}", expect_len=BIG)
                elif pick < 0.85:
                    await self._request(session, "cached read", "GET", f"{base}/echo/cache/1")
                else:
                    await self._request(session, "read", "GET", f"{base}/echo/items/{self.rng.randrange(100)}")
                await asyncio.sleep(pause * self.rng.uniform(0.5, 1.5))

    async def hostile(self, host: str, port: int) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(0.5)
            raw = self.rng.choice(HOSTILE)
            self.tally.hostile_sent += 1
            with contextlib.suppress(OSError, TimeoutError):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(raw)
                    await writer.drain()
                    head = await asyncio.wait_for(reader.read(12), 15)
                    if head.startswith(b"HTTP/1."):
                        self.tally.hostile_answered += 1
                finally:
                    writer.close()

    # -- faults ------------------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    def fault_menu(self, stripe: FakeServer, sendgrid: FakeServer, echo: FakeServer) -> dict[str, Callable[[], object]]:
        rng = self.rng

        def upstream() -> FakeServer:
            return rng.choice([stripe, sendgrid, echo])

        async def refuse() -> None:
            await echo.stop()  # the port stays reserved for us: connections are refused
            await asyncio.sleep(1.0)
            await echo.start()

        menu: dict[str, Callable[[], object]] = {
            "reset before headers": lambda: upstream().faults.reset(count=2),
            "reset after the upstream acted": lambda: upstream().faults.reset(processed=True, count=1),
            "reset mid-body": lambda: echo.faults.reset_mid_body(count=1, path="/bytes"),
            "truncated body (Content-Length)": lambda: echo.faults.truncate(count=1, path="/bytes"),
            "invalid HTTP": lambda: upstream().faults.garbage(count=1),
            "drip-fed answer": lambda: echo.faults.drip(chunk_size=2048, interval=0.05, count=1, path="/bytes"),
            "hang": lambda: upstream().faults.hang(seconds=6, count=1),
            "503 burst": lambda: upstream().faults.status(503, count=3),
            "500 after the upstream acted": lambda: rng.choice([stripe, sendgrid]).faults.status(
                500, count=1, processed=True
            ),
            "429 with Retry-After": lambda: rng.choice([stripe, echo]).faults.too_many_requests(retry_after=1, count=2),
            "connection refused": lambda: self._spawn(refuse()),
        }
        if self.redis is not None:
            menu["redis killed and restarted"] = lambda: self._spawn(self._redis_kill())
            menu["redis paused (SIGSTOP)"] = lambda: self._spawn(self._redis_pause())
        return menu

    async def _redis_kill(self) -> None:
        async with self.redis_lock:  # one Redis fault at a time
            self.redis.kill()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.redis.start)

    async def _redis_pause(self) -> None:
        async with self.redis_lock:
            self.redis.suspend()
            await asyncio.sleep(1.0)
            self.redis.resume()

    async def faults(self, menu: dict[str, Callable[[], object]]) -> None:
        kinds = sorted(menu)
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.fault_interval)
                return
            kind = self.rng.choice(kinds)
            menu[kind]()
            self.tally.faults[kind] += 1

    # -- sampling ----------------------------------------------------------------------------
    def fold_ledgers(self) -> None:
        """Count what the fakes recorded and empty their ledgers (no await: atomic on this loop)."""
        if self.fakes is None:
            return
        stripe, sendgrid, echo = self.fakes
        self.charges.update(e.key or "" for e in stripe.ledger.effects("charge.succeeded"))
        self.mails.update(
            str((e.data.get("custom_args") or {}).get("campaign_id")) for e in sendgrid.ledger.effects("mail.sent")
        )
        self.hostile_forwarded += sum(1 for r in echo.ledger.requests if "hostile" in r.path)
        for fake in self.fakes:
            fake.ledger.reset()

    def pool_counts(self) -> tuple[int, int]:
        """(busy, idle) connections over egressd's upstream pools (the lean client's)."""
        busy = idle = 0
        if self.server is not None:
            for rt in self.server.runtime.upstreams.values():
                pool = getattr(rt.transport, "_pool", None)
                if pool is not None:
                    busy += pool.size - pool.idle
                    idle += pool.idle
        return busy, idle

    def sample(self, began: float, ports: set[int]) -> Sample:
        busy, idle = self.pool_counts()
        s = Sample(
            t=round(time.monotonic() - began, 2),
            fds=open_fds(),
            rss_kib=rss_kib(),
            tasks=len(asyncio.all_tasks()),
            upstream_conns=established_to(ports),
            pool_busy=busy,
            pool_idle=idle,
            redis_conns=established_to({self.redis.port}) if self.redis is not None else 0,
            app_conns=established_to({self.main_port}) if self.main_port else 0,
        )
        self.samples.append(s)
        return s

    async def sampler(self, began: float, ports: set[int]) -> None:
        while not self.stop.is_set():
            self.fold_ledgers()
            s = self.sample(began, ports)
            self.say(
                f"  t={s.t:6.0f}s  requests={self.tally.requests:7d}  lost={self.tally.lost}  fds={s.fds}  "
                f"rss={s.rss_kib // 1024}MiB  tasks={s.tasks}  upstream_conns={s.upstream_conns} "
                f"(pool busy={s.pool_busy} idle={s.pool_idle})  redis_conns={s.redis_conns}  app_conns={s.app_conns}  "
                f"faults={sum(self.tally.faults.values())}"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.sample_interval)

    # -- run -----------------------------------------------------------------------------------
    def _start_redis(self) -> StateBackend | None:
        if self.redis_mode == "none":
            return None
        from proxy.state.resilient import open_shared_state

        if self.redis_mode == "auto":
            from tests.redis_server import REDIS_SERVER, RedisServer

            if not os.access(REDIS_SERVER, os.X_OK):
                self.say("redis-server not found: running with in-memory state")
                return None
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
        else:
            self.redis_url = self.redis_mode
        return open_shared_state(self.redis_url, prefix=f"campaign-{uuid.uuid4().hex[:6]}:")

    async def run(self, workdir: Path) -> dict[str, Any]:
        started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        stripe = await FakeServer("stripe").start()
        sendgrid = await FakeServer("sendgrid").start()
        echo = await FakeServer("echo").start()
        ports = {stripe.port, sendgrid.port, echo.port}
        self.fakes = (stripe, sendgrid, echo)
        state = self._start_redis()
        (workdir / "policies.yaml").write_text(yaml.safe_dump_all(policies(stripe.url, sendgrid.url, echo.url)))
        server = EgressServer(
            Settings(policies=workdir, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=5.0), state=state
        )
        await server.start()
        self.server = server
        host, port = server.addresses["main"]
        self.main_port = port
        base = f"http://{host}:{port}"
        self.say(
            f"campaign: {self.seconds:.0f}s, {self.concurrency} workers at ~{self.rate:.0f} calls/s, a fault every "
            f"{self.fault_interval:g}s, state: {'redis' if state is not None else 'memory'}"
        )
        began = time.monotonic()
        try:
            workers = [asyncio.create_task(self.worker(base)) for _ in range(self.concurrency)]
            helpers = [
                asyncio.create_task(self.hostile(host, port)),
                asyncio.create_task(self.faults(self.fault_menu(stripe, sendgrid, echo))),
                asyncio.create_task(self.sampler(began, ports)),
            ]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.seconds)
            self.stop.set()
            _, stuck = await asyncio.wait([*workers, *helpers], timeout=60)
            if stuck:
                now = time.monotonic()
                for kind, method, url, since in self.in_flight.values():
                    self.say(f"still waiting after {now - since:.0f}s: {kind} {method} {url}")
                raise RuntimeError(f"{len(stuck)} campaign tasks did not finish")
            if self.background:
                done, late = await asyncio.wait(list(self.background), timeout=30)
                if late:
                    raise RuntimeError(f"{len(late)} background campaign tasks did not finish")
                for task in done:
                    task.result()  # a failed fault action fails the campaign
            for fake in (stripe, sendgrid, echo):
                fake.faults.clear()
            if not echo.running:
                await echo.start()
            # Quiesce: answers finish, idle pooled connections stay (they are not leaks).
            await asyncio.sleep(2.0)
            self.fold_ledgers()
            final = self.sample(began, ports)
            return self.report(started_at, final)
        finally:
            # Every step of the teardown is bounded: a campaign must stop by itself.
            self.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.stop(), 30)
            for fake in (stripe, sendgrid, echo):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(fake.stop(), 15)
            if self.redis is not None:
                self.redis.cleanup()

    def report(self, started_at: str, final: Sample) -> dict[str, Any]:
        t = self.tally
        charges, mails = self.charges, self.mails
        pay_dupes = sum(1 for k in t.payments if charges.get(k, 0) > 1)
        pay_phantom = sum(1 for k, s in t.payments.items() if s == 200 and charges.get(k, 0) != 1)
        pay_unresolved = sum(1 for s in t.payments.values() if s != 200)
        mail_dupes = sum(1 for k in t.emails if mails.get(k, 0) > 1)
        mail_phantom = sum(1 for k, s in t.emails.items() if s == 202 and mails.get(k, 0) != 1)
        forwarded_hostile = self.hostile_forwarded
        # Warm-up: pools fill and caches grow in the first tenth; slopes and leaks are judged after it.
        settled = [s for s in self.samples if s.t >= max(10.0, self.seconds * 0.1)] or self.samples
        baseline = settled[0]
        # Idle keep-alive connections are not leaks (they close after up to 2 x keepalive),
        # nor are Redis connections (a bounded pool, reopened after each Redis fault): FDs
        # are compared without them (`Sample.fds_net`), and upstream connections still busy
        # after the quiesce are counted apart (those would be leaks: an answer never released).
        fd_leak = max(0, final.fds_net - baseline.fds_net)
        figures = {
            "started_at": started_at,
            "command": " ".join(["python", "bench/campaign.py", *sys.argv[1:]]),
            "machine": machine(),
            "seconds": self.seconds,
            "seed": self.seed,
            "state_backend": "redis" if self.redis_url else "memory",
            "requests": t.requests,
            "answered": t.answered,
            "aborted_streams": t.aborted,
            "lost": t.lost,
            "lost_errors": dict(t.lost_errors),
            "short_200": t.short_200,
            "by_status": dict(sorted(t.by_status.items())),
            "by_kind": dict(sorted(t.by_kind.items())),
            "faults": dict(sorted(t.faults.items())),
            "faults_total": sum(t.faults.values()),
            "payments": len(t.payments),
            "payments_charged_once": sum(1 for k in t.payments if charges.get(k, 0) == 1),
            "payments_unresolved": pay_unresolved,
            "payment_duplicates": pay_dupes,
            "payment_phantoms": pay_phantom,
            "emails": len(t.emails),
            "emails_sent_once": sum(1 for k in t.emails if mails.get(k, 0) == 1),
            "email_duplicates": mail_dupes,
            "email_phantoms": mail_phantom,
            "hostile_sent": t.hostile_sent,
            "hostile_answered": t.hostile_answered,
            "hostile_forwarded": forwarded_hostile,
            "fds_baseline": baseline.fds,
            "fds_final": final.fds,
            "fd_leak": fd_leak,
            "fds_raw_growth": final.fds - baseline.fds,
            "pool_idle_baseline": baseline.pool_idle,
            "pool_idle_final": final.pool_idle,
            "pool_busy_final": final.pool_busy,
            "redis_conns_baseline": baseline.redis_conns,
            "redis_conns_final": final.redis_conns,
            "app_conns_baseline": baseline.app_conns,
            "slopes_per_minute": {
                attr: round(slope_per_minute(settled, attr), 3)
                for attr in ("fds", "fds_net", "rss_kib", "tasks", "upstream_conns", "pool_idle")
            },
            "samples": [asdict(s) for s in self.samples],
        }
        figures["ok"] = (
            t.lost == 0
            and t.short_200 == 0
            and pay_dupes == 0
            and pay_phantom == 0
            and mail_dupes == 0
            and mail_phantom == 0
            and forwarded_hostile == 0
            and t.hostile_answered == t.hostile_sent
            and fd_leak <= 10
            and final.pool_busy == 0
        )
        return figures


def render(fig: dict[str, Any]) -> str:
    m = fig["machine"]
    slopes = fig["slopes_per_minute"]
    first, last = fig["samples"][0], fig["samples"][-1]
    lines = [
        f"campaign of {fig['started_at']}: {fig['seconds']:.0f} s, state {fig['state_backend']}, seed {fig['seed']}",
        f"machine: {m['cpu']} x{m['cores']}, Linux {m['kernel']}, Python {m['python']}, aiohttp {m['aiohttp']}",
        f"command: {fig['command']}",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| requests sent by the app | {fig['requests']} |",
        f"| answered (complete answers) | {fig['answered']} |",
        f"| streamed answers aborted after a mid-body fault | {fig['aborted_streams']} |",
        f"| lost (no answer) | {fig['lost']} |",
        f"| short 200s | {fig['short_200']} |",
        f"| faults injected | {fig['faults_total']} |",
        f"| payments / charged exactly once / app never heard 200 | {fig['payments']} / "
        f"{fig['payments_charged_once']} / {fig['payments_unresolved']} |",
        f"| duplicate charges | {fig['payment_duplicates']} |",
        f"| 200 without a charge | {fig['payment_phantoms']} |",
        f"| e-mails / sent exactly once | {fig['emails']} / {fig['emails_sent_once']} |",
        f"| duplicate e-mails | {fig['email_duplicates']} |",
        f"| 202 without a mail | {fig['email_phantoms']} |",
        f"| hostile requests sent / answered / forwarded | {fig['hostile_sent']} / {fig['hostile_answered']} / "
        f"{fig['hostile_forwarded']} |",
        f"| open FDs after warm-up -> end (leak) | {fig['fds_baseline']} -> {fig['fds_final']} ({fig['fd_leak']}) |",
        f"| idle pooled upstream connections (2 FDs each, not counted as leak) | {fig['pool_idle_baseline']} -> "
        f"{fig['pool_idle_final']} |",
        f"| Redis connections (1 FD each, not counted as leak) | {fig['redis_conns_baseline']} -> "
        f"{fig['redis_conns_final']} |",
        f"| the app's connections to egressd at the baseline (2 FDs each, closed at the end) | "
        f"{fig['app_conns_baseline']} |",
        f"| upstream connections still busy after the quiesce | {fig['pool_busy_final']} |",
        f"| RSS first -> last sample | {first['rss_kib'] // 1024} -> {last['rss_kib'] // 1024} MiB |",
        f"| slope per minute: FDs, RSS KiB, tasks, upstream connections | {slopes['fds']}, {slopes['rss_kib']}, "
        f"{slopes['tasks']}, {slopes['upstream_conns']} |",
        f"| slope per minute: FDs without idle pooled connections, idle pooled connections | {slopes['fds_net']}, "
        f"{slopes['pool_idle']} |",
        "",
        "| fault | injected |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in fig["faults"].items()),
        "",
        "| answer | count |",
        "| --- | --- |",
        *(f"| {k} | {v} |" for k, v in fig["by_status"].items()),
        "",
        f"result: {'PASS' if fig['ok'] else 'FAIL'}",
    ]
    if fig["lost_errors"]:
        lines.insert(-1, f"lost by kind: {fig['lost_errors']}")
    return "\n".join(lines)


async def run_campaign(
    *,
    seconds: float = 600.0,
    concurrency: int = 16,
    rate: float = 150.0,
    fault_interval: float = 2.0,
    sample_interval: float = 10.0,
    redis: str = "auto",
    seed: int | None = None,
    quiet: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    import tempfile

    seed = seed if seed is not None else random.randrange(1 << 30)
    campaign = Campaign(
        seconds=seconds, concurrency=concurrency, rate=rate, fault_interval=fault_interval,
        sample_interval=sample_interval, redis=redis, seed=seed, quiet=quiet,
    )  # fmt: skip
    if workdir is not None:
        return await campaign.run(workdir)
    with tempfile.TemporaryDirectory(prefix="egressd-campaign-") as tmp:
        return await campaign.run(Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the load runs (default 600)")
    parser.add_argument("--concurrency", type=int, default=16, help="app workers (default 16)")
    parser.add_argument("--rate", type=float, default=150.0, help="target app calls per second (default 150)")
    parser.add_argument("--fault-interval", type=float, default=2.0, help="seconds between faults (default 2)")
    parser.add_argument("--sample-interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--redis", default="auto", help="auto (start redis-server if installed), none, or a URL")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--quiet", action="store_true", help="print only the report")
    parser.add_argument(
        "--exactly-once", nargs="?", const="full", choices=("full", "quick"), default=None,
        help="after the soak, also run bench/exactly_once.py's cases (its sizes, or `quick`) and add their table",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # The campaign's output is its report: egressd's and the fakes' own logs stay quiet.
    for name in ("egressd", "aiohttp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger(name).propagate = False
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    figures = asyncio.run(
        run_campaign(
            seconds=args.seconds, concurrency=args.concurrency, rate=args.rate, fault_interval=args.fault_interval,
            sample_interval=args.sample_interval, redis=args.redis, seed=args.seed, quiet=args.quiet,
        )
    )  # fmt: skip
    ok = bool(figures["ok"])
    exactly_once: dict[str, Any] | None = None
    if args.exactly_once:
        from bench.exactly_once import render_table, run_exactly_once

        exactly_once = asyncio.run(run_exactly_once(quick=args.exactly_once == "quick", quiet=args.quiet))
        figures["exactly_once"] = exactly_once
        ok = ok and bool(exactly_once["ok"])
    print(render(figures))
    if exactly_once is not None:
        print()
        print(render_table(exactly_once))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
