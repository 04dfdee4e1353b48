"""Process and state-backend faults under load: SIGTERM, SIGKILL and restart, reloads,
and a Redis that is frozen (SIGSTOP), killed and restarted underneath the proxy.

egressd runs as a real `python -m proxy run` process where signals matter; the fakes run
in the test's event loop and count what reached them.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fakes import FakeServer
from proxy.events import EventBus
from proxy.server import EgressServer
from proxy.state.resilient import open_shared_state
from tests.conftest import proxy_url
from tests.egressd_process import Egressd
from tests.redis_server import RedisServer, require_redis

StartProxy = Callable[..., Awaitable[EgressServer]]


def classify(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused"  # never accepted: the app's client may resend it safely
    return "lost"  # accepted (or maybe accepted) and no answer: what must never happen


# -- SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_under_load_answers_every_accepted_request(
    egressd_factory: Callable[..., Egressd],
) -> None:
    async with FakeServer("echo") as echo:
        echo.faults.delay(0.3, phase="before")  # every call is in flight for a while
        proc = egressd_factory([{"upstream": "echo", "target": echo.url}], drain=5.0)
        await asyncio.to_thread(proc.start)
        results: Counter[str] = Counter()
        sent = 0
        stop = asyncio.Event()

        async def worker(n: int) -> None:
            nonlocal sent
            # A fresh connection per call: "accepted" is then exactly "the connect succeeded".
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                while not stop.is_set():
                    sent += 1
                    try:
                        async with s.post(f"{proc.url}/echo/pay/{n}", data=b"x") as resp:
                            await resp.read()
                            results[str(resp.status)] += 1
                    except aiohttp.ClientError as exc:
                        results[classify(exc)] += 1
                        if isinstance(exc, aiohttp.ClientConnectorError):
                            await asyncio.sleep(0.05)

        workers = [asyncio.create_task(worker(i)) for i in range(16)]
        await asyncio.sleep(1.0)
        in_flight_at_term = len(echo.ledger.requests)
        proc.signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        stop.set()
        await asyncio.gather(*workers)
    assert code == 0, proc.log()
    answered = sum(n for k, n in results.items() if k.isdigit())
    assert sum(results.values()) == sent
    assert results["lost"] == 0, results
    assert set(k for k in results if k.isdigit()) <= {"200", "503"}, results
    # Every request that reached the upstream was answered to the app with its 200.
    assert results["200"] == len(echo.ledger.requests) >= in_flight_at_term > 0
    print("sigterm:", dict(results), "sent", sent)
    assert answered + results["refused"] == sent


# -- SIGKILL, restart, and the app retrying with the same key -------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


async def test_sigkill_then_restart_never_charges_twice(
    egressd_factory: Callable[..., Egressd], own_redis: RedisServer
) -> None:
    async with FakeServer("stripe") as stripe:
        stripe.faults.delay(0.2, phase="after")  # charged, then answered late: kills land in between
        proc = egressd_factory(
            [
                {
                    "upstream": "stripe",
                    "target": stripe.url,
                    "provider": "stripe",
                    "auth": {"bearer": "sk_test_campaign"},
                    "idempotency": {"replay_ttl": "1h"},
                    "timeouts": {"connect": "1s", "attempt": "3s", "total": "3s"},
                }
            ],
            redis_url=own_redis.url,
            drain=0,
        )
        await asyncio.to_thread(proc.start)
        keys = [f"order-{i}-{uuid.uuid4().hex[:6]}" for i in range(40)]
        outcome: dict[str, int] = {}
        replayed: set[str] = set()

        async def pay(key: str, session: aiohttp.ClientSession) -> None:
            body = {"amount": "1000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
            for _ in range(60):  # the app's own retry loop: same key, until it hears an answer
                try:
                    async with session.post(
                        f"{proc.url}/stripe/v1/payment_intents", data=body, headers={"Idempotency-Key": key}
                    ) as resp:
                        await resp.read()
                        if resp.status < 500:
                            outcome[key] = resp.status
                            if resp.headers.get("Idempotent-Replayed") == "true":
                                replayed.add(key)
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)

        async def app() -> None:
            async with aiohttp.ClientSession() as s:
                await asyncio.gather(*(pay(k, s) for k in keys[:30]))

        traffic = asyncio.create_task(app())
        await asyncio.sleep(0.6)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 5)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(proc.start)
        await traffic

        # Deterministic part: a call completed before a SIGKILL is replayed by the new
        # process from Redis, without reaching Stripe again.
        async with aiohttp.ClientSession() as s:
            await pay(keys[30], s)
            seen = len(stripe.ledger.requests_to("/v1/payment_intents", "POST"))
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 5)
            await asyncio.to_thread(proc.start)
            await pay(keys[30], s)
        assert keys[30] in replayed
        assert len(stripe.ledger.requests_to("/v1/payment_intents", "POST")) == seen

    assert {outcome.get(k) for k in keys[:31]} == {200}, outcome
    charges = stripe.ledger.counts_by_key("charge.succeeded")
    assert set(charges) == set(keys[:31])
    assert set(charges.values()) == {1}, charges


# -- reload under load ------------------------------------------------------------------------


async def test_reload_under_load_fails_no_call(start_proxy: StartProxy) -> None:
    async with FakeServer("echo") as echo:
        docs: list[dict[str, Any]] = [
            {"upstream": "echo", "target": echo.url, "retry": {"attempts": 2}, "headers": {"add": {"X-Gen": "0"}}}
        ]
        server = await start_proxy(docs)
        policy_file = Path(server.settings.policies) / "policies.yaml"
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()

        async def worker() -> None:
            async with aiohttp.ClientSession() as s:
                while not stop.is_set():
                    async with s.post(proxy_url(server) + "/echo/x", data=b"hello") as resp:
                        await resp.read()
                        statuses[resp.status] += 1

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        results = []
        for gen in range(1, 16):
            if gen % 5 == 0:
                policy_file.write_text("upstream: [not valid\n")  # rejected whole; the old set serves
            else:
                docs[0]["headers"]["add"]["X-Gen"] = str(gen)
                # Every other reload changes transport settings: a new pool, the old one retires.
                docs[0]["timeouts"] = {"attempt": f"{10 + gen % 2}s"}
                policy_file.write_text(yaml.safe_dump_all(docs))
            results.append(await server.reload(reason="test"))
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.gather(*workers)
    assert results.count(False) == 3 and results.count(True) == 12
    assert set(statuses) == {200}, statuses
    assert sum(statuses.values()) > 100
    gens = {r.header("X-Gen") for r in echo.ledger.requests}
    assert {"1", "14"} <= gens


# -- the state backend: Redis frozen, killed and restarted under load -------------------------


async def test_redis_frozen_killed_and_restarted_under_load_fails_no_call(
    start_proxy: StartProxy, own_redis: RedisServer
) -> None:
    bus = EventBus()
    state = open_shared_state(own_redis.url, prefix=f"pf-{uuid.uuid4().hex[:6]}:", events=bus)
    async with FakeServer("echo") as echo:
        server = await start_proxy(
            [
                {
                    "upstream": "echo",
                    "target": echo.url,
                    "rate_limit": {"rate": "2000/s", "burst": 50, "shared": True, "queue": {"max_wait": "2s"}},
                    "circuit_breaker": {"window": "10s", "min_requests": 5, "failure_rate": 0.5, "open_for": "5s"},
                    "retry": {"attempts": 2},
                    "idempotency": {"replay_ttl": "1h"},
                    "cache": {"ttl": "1s"},
                }
            ],
            state=state,
            events=bus,
        )
        base = proxy_url(server) + "/echo"
        statuses: Counter[int] = Counter()
        keys: list[str] = []
        stop = asyncio.Event()

        async def worker(n: int) -> None:
            i = 0
            async with aiohttp.ClientSession() as http:
                while not stop.is_set():
                    i += 1
                    key = f"{n}-{i}-{uuid.uuid4().hex[:6]}"
                    keys.append(key)
                    async with http.post(f"{base}/pay", json={"i": i}, headers={"Idempotency-Key": key}) as r:
                        await r.read()
                        statuses[r.status] += 1
                    async with http.get(f"{base}/items/{i % 7}") as r:
                        await r.read()
                        statuses[r.status] += 1

        workers = [asyncio.create_task(worker(n)) for n in range(8)]
        await asyncio.sleep(0.5)
        phases: list[tuple[str, int]] = []
        own_redis.suspend()  # SIGSTOP: connections stay open, nothing answers
        await asyncio.sleep(1.0)
        phases.append(("paused", sum(statuses.values())))
        own_redis.resume()
        await asyncio.sleep(0.7)
        own_redis.kill()
        await asyncio.sleep(1.0)
        phases.append(("killed", sum(statuses.values())))
        await asyncio.to_thread(own_redis.start)
        await asyncio.sleep(1.0)
        phases.append(("restarted", sum(statuses.values())))
        stop.set()
        await asyncio.gather(*workers)
    assert set(statuses) == {200}, statuses
    # Traffic kept flowing through every phase.
    counts = [n for _, n in phases]
    assert counts[0] > 50 and counts[1] > counts[0] + 50 and counts[2] > counts[1] + 50, phases
    # Exactly one side effect per key, Redis trouble or not.
    by_key = echo.ledger.counts_by_key("echo.POST")
    assert set(by_key) == set(keys) and set(by_key.values()) == {1}
    assert state.errors > 0 and state.up
