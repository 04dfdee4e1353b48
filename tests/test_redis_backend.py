"""The Redis backend against real redis-server processes, and the fallback around it.

The protocol semantics are in tests/test_state_limits.py and tests/test_state_records.py
(parameterised over memory, redis and a 3-node redis-cluster). Here: what only Redis
has (scripts, TTLs, URL forms, server time) and what happens when Redis misbehaves
(killed and restarted, frozen, scripts flushed) underneath `ResilientState`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from fakes.server import FakeServer
from proxy.events import Event, EventBus, StateBackendError
from proxy.server import EgressServer
from proxy.state.base import CircuitSettings, RecordsUnavailable, StoredResponse
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState, connect, decode_response, encode_response
from proxy.state.resilient import ResilientState, open_shared_state
from tests.conftest import proxy_url
from tests.redis_server import RedisSentinel, RedisServer, require_redis

CB = CircuitSettings(window=10.0, min_requests=4, failure_rate=0.5, open_for=30.0, half_open_requests=1)


def _prefix() -> str:
    return f"t-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (it gets killed, frozen or restarted)."""
    require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
async def resilient() -> AsyncIterator[Callable[..., Awaitable[ResilientState]]]:
    made: list[ResilientState] = []

    async def make(url: str, *, prefix: str, events: EventBus | None = None, **kwargs: Any) -> ResilientState:
        kwargs.setdefault("probe_interval", 0.05)
        kwargs.setdefault("heartbeat_interval", 0.05)
        kwargs.setdefault("refusal_window", 0.5)
        state = ResilientState(RedisState(url, prefix=prefix), MemoryState(), events, **kwargs)
        made.append(state)
        assert await state.connect()
        return state

    yield make
    for state in made:
        await state.close()


async def _wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def answer(body: bytes = b"{}") -> StoredResponse:
    return StoredResponse(200, (("Content-Type", "application/json"),), body, 1_800_000_000.0)


# -- the backend itself ------------------------------------------------------------------


async def test_key_layout_uses_the_scope_as_hash_tag() -> None:
    state = RedisState("redis://127.0.0.1:1/0", prefix="egressd:")
    assert state.key("stripe:idem:3f2a|abc", "idem") == "egressd:{stripe:idem:3f2a}|abc:idem"
    assert state.key("stripe:rl:3f2a", "gcra") == "egressd:{stripe:rl:3f2a}:gcra"
    await state.close()


def test_stored_response_encoding_roundtrip() -> None:
    stored = StoredResponse(201, (("A", "1"), ("A", "2\n3")), bytes(range(256)), 1.5)
    assert decode_response(encode_response(stored)) == stored
    full = StoredResponse(200, (), b"x", 2.5, upstream="paypal", age=50.0, lifetime=60.0)
    assert decode_response(encode_response(full)) == full


def test_stored_response_written_before_the_extras_still_decodes() -> None:
    old = b'[200, [["Content-Type", "application/json"]], 1800000000.0]\n{"id":1}'
    stored = decode_response(old)
    assert stored.status == 200 and stored.body == b'{"id":1}'
    assert (stored.upstream, stored.age, stored.lifetime) == ("", 0.0, None)
    # and a record with only defaults is written exactly as before
    assert encode_response(stored) == b'[200, [["Content-Type", "application/json"]], 1800000000.0]\n{"id":1}'


async def test_url_forms() -> None:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    plain = connect("rediss://:pw@cache.internal:6380/2?ssl_cert_reqs=none")
    assert isinstance(plain, Redis)
    kwargs = plain.connection_pool.connection_kwargs
    assert kwargs["password"] == "pw" and kwargs["db"] == 2 and kwargs["host"] == "cache.internal"
    assert isinstance(connect("redis+cluster://a:7000,b:7001"), RedisCluster)
    assert isinstance(connect("redis://a:7000/0?cluster=true"), RedisCluster)
    sentinel = connect("redis+sentinel://:pw@s1:26379,s2:26379/mymaster/3")
    assert isinstance(sentinel, Redis)
    assert sentinel.connection_pool.connection_kwargs["db"] == 3
    with pytest.raises(ValueError, match="service"):
        connect("redis+sentinel://s1:26379")
    for client in (plain, sentinel):
        await client.aclose()


async def test_server_time_is_used_without_a_clock(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, prefix=_prefix())
    try:
        first = await state.rate_take("k", interval=0.2, burst=1, max_wait=5)
        second = await state.rate_take("k", interval=0.2, burst=1, max_wait=5)
        assert first.allowed and first.wait == 0
        assert second.allowed and 0.05 < second.wait <= 0.2  # server time moved on a little
        await state.pause("k", 2)
        assert 1.5 < await state.paused_for("k") <= 2
    finally:
        await state.close()


async def test_noscript_after_script_flush_is_handled(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, prefix=_prefix())
    try:
        assert (await state.rate_take("k", interval=1, burst=2, max_wait=0)).allowed
        await state.client.script_flush()
        assert (await state.rate_take("k", interval=1, burst=2, max_wait=0)).allowed
        assert not (await state.rate_take("k", interval=1, burst=2, max_wait=0)).allowed
        assert state.health() == "ok"
    finally:
        await state.close()


async def test_every_key_has_a_ttl(redis_server: RedisServer) -> None:
    prefix = _prefix()
    state = RedisState(redis_server.url, prefix=prefix)
    try:
        await state.rate_take("up:rl:1", interval=0.1, burst=5, max_wait=1)
        await state.pause("up:rl:1", 3)
        await state.budget_record("up:budget:1", window=10, retry=False)
        await state.budget_record("up:budget:1", window=10, retry=True)
        for _ in range(4):
            await state.circuit_record("up:cb:1", CB, failure=True, trial=False)  # opens
        await state.circuit_record("up:cb:2", CB, failure=False, trial=False)  # closed, with a window
        await state.idem_claim("up:idem:1|a", "fp", ttl=60, lock_ttl=10)
        await state.idem_claim("up:idem:1|b", "fp", ttl=60, lock_ttl=10)
        await state.idem_complete("up:idem:1|b", answer(), ttl=60)
        await state.idem_complete("up:idem:1|c", answer(), ttl=60, fingerprint="fp")  # no claim: stored anyway
        await state.cache_set("up:cache:1|x", answer(), ttl=30)
        await state.kv_set("routing|obj_1", b"paypal", ttl=300)
        await state.ledger_set("routing|obj_1", b"paypal", ttl=300)
        await state.heartbeat()
        keys = [k async for k in state.client.scan_iter(match=prefix + "*")]
        assert len(keys) == 12
        for key in keys:
            ttl = await state.client.pttl(key)
            assert ttl > 0, key
    finally:
        await state.close()


async def test_sentinel_url(redis_server: RedisServer) -> None:
    sentinel = RedisSentinel(redis_server).start()
    state = RedisState(sentinel.url, prefix=_prefix())
    try:
        await state.kv_set("k", b"v", ttl=5)
        assert await state.kv_get("k") == b"v"
    finally:
        await state.close()
        sentinel.cleanup()


async def test_tls_with_password_in_url() -> None:
    require_redis()
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    server = RedisServer(tls=True).start()
    state = RedisState(server.url, prefix=_prefix())
    try:
        await state.kv_set("k", b"v", ttl=5)
        assert await state.kv_get("k") == b"v"
    finally:
        await state.close()
        server.cleanup()


# -- when Redis misbehaves ---------------------------------------------------------------


async def test_killed_redis_falls_back_and_sharing_resumes(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]], caplog: pytest.LogCaptureFixture
) -> None:
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix, events=bus)
    b = await resilient(own_redis.url, prefix=prefix)
    for _ in range(4):
        await a.circuit_record("up:cb:1", CB, failure=True, trial=False)
    assert not (await b.circuit_admit("up:cb:1", CB)).allowed  # one circuit for both

    own_redis.kill()
    caplog.set_level(logging.WARNING, logger="egressd.state")
    started = time.monotonic()
    for i in range(50):  # every operation answers, from local state...
        assert (await a.circuit_admit(f"up:cb:{i + 2}", CB)).allowed
        claim = await a.idem_claim(f"up:idem:1|{i}", "fp", ttl=60, lock_ttl=10, owner=f"o{i}", dedupes=True)
        assert claim.state == "new"
        await a.idem_complete(f"up:idem:1|{i}", answer(), ttl=60, fingerprint="fp", owner=f"o{i}")
        assert (await a.idem_claim(f"up:idem:1|{i}", "fp", ttl=60, lock_ttl=10, dedupes=True)).state == "completed"
        # ... except a claim for an upstream that does not deduplicate: never decided locally
        with pytest.raises(RecordsUnavailable):
            await a.idem_claim(f"up:idem:2|{i}", "fp", ttl=60, lock_ttl=10, owner=f"p{i}")
        await a.cache_set("up:cache:1|x", answer(), ttl=30)
        assert await a.cache_get("up:cache:1|x") is not None
    assert time.monotonic() - started < 2.0
    assert a.health().startswith("degraded:")
    assert any(isinstance(e, StateBackendError) and e.backend == "redis" for e in events)
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    # Rate-limited logging: one line per state, not one per failed operation (`b`, idle
    # here, logs its own line when its heartbeat meets the dead Redis, if it comes in time).
    assert 1 <= len(warnings) <= 2

    own_redis.start()  # same port, empty
    await _wait_for(lambda: a.up and b.up)
    await _wait_for(lambda: a.health() == "ok")  # the completions are written back, no refusals lately
    assert a.records_snapshot()["write_backs_done"] == 50
    for _ in range(4):
        await a.circuit_record("up:cb:9", CB, failure=True, trial=False)
    assert (await b.circuit_state("up:cb:9", CB)) == "open"  # shared again
    # a key claimed locally during the outage stays local, and its answer was written back
    assert (await a.idem_claim("up:idem:1|0", "fp", ttl=60, lock_ttl=10, dedupes=True)).state == "completed"
    assert (await b.idem_claim("up:idem:1|0", "fp", ttl=60, lock_ttl=10)).state == "completed"


async def test_frozen_redis_falls_back_within_the_budget(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    state = await resilient(own_redis.url, prefix=_prefix(), budget=0.05)
    await state.kv_set("k", b"before", ttl=60)
    assert await state.kv_get("k") == b"before"
    own_redis.suspend()  # SIGSTOP: connections stay open, nothing answers
    try:
        for _ in range(state.down_after_timeouts):  # each one answered within the budget
            started = time.monotonic()
            assert (await state.rate_take("k", interval=0.01, burst=1, max_wait=0)).allowed
            assert time.monotonic() - started < 0.05 + 0.15  # the budget, plus slack for a busy CI box
        assert not state.up and "no answer within 50 ms" in state.health()
        started = time.monotonic()
        for i in range(20):  # down: straight to memory, nobody pays the budget again
            await state.kv_set(f"k{i}", b"local", ttl=60)
        assert time.monotonic() - started < 0.2  # 20 x 50 ms would be 1 s
    finally:
        own_redis.resume()
    await _wait_for(lambda: state.up)
    # answers are not mixed up with replies to commands that were cut off
    for i in range(20):
        await state.kv_set(f"r{i}", str(i).encode(), ttl=60)
    assert [await state.kv_get(f"r{i}") for i in range(20)] == [str(i).encode() for i in range(20)]
    assert await state.kv_get("k") == b"before"


async def test_local_rate_share_while_redis_is_away(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    replicas = [await resilient(own_redis.url, prefix=prefix) for _ in range(4)]
    for r in replicas:
        await r.paused_for("warm-up")  # starts the probe / heartbeat task
    await _wait_for(lambda: all(r.replicas == 4 for r in replicas))
    own_redis.kill()
    one = replicas[0]
    first = await one.rate_take("up:rl:1", interval=0.1, burst=1, max_wait=10)
    second = await one.rate_take("up:rl:1", interval=0.1, burst=1, max_wait=10)
    assert first.allowed and second.allowed
    assert second.wait == pytest.approx(0.4, abs=0.02)  # a quarter of the rate
    assert "rate share 1/4" in one.health()


async def test_open_shared_state_reads_the_budget_from_the_url(redis_server: RedisServer) -> None:
    state = open_shared_state(redis_server.url + "?budget_ms=20", prefix=_prefix())
    try:
        assert state.budget == pytest.approx(0.02)
        assert await state.connect()
        await state.kv_set("k", b"v", ttl=5)
        assert await state.kv_get("k") == b"v" and state.up
    finally:
        await state.close()


# -- end to end: a proxy whose Redis dies and comes back -----------------------------------


async def test_proxy_calls_never_fail_while_redis_restarts(
    own_redis: RedisServer,
    start_proxy: Callable[..., Awaitable[EgressServer]],
    resilient: Callable[..., Awaitable[ResilientState]],
) -> None:
    bus = EventBus()
    state = await resilient(own_redis.url, prefix=_prefix(), events=bus)
    async with FakeServer("echo") as fake:
        server = await start_proxy(
            [
                {
                    "upstream": "echo",
                    "target": fake.url,
                    "rate_limit": {"rate": "200/s", "burst": 20, "shared": True, "queue": {"max_wait": "5s"}},
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
        statuses: list[int] = []
        async with aiohttp.ClientSession() as http:

            async def traffic(seconds: float) -> None:
                end = time.monotonic() + seconds
                i = 0
                while time.monotonic() < end:
                    i += 1
                    async with http.post(
                        f"{base}/pay", json={"i": i}, headers={"Idempotency-Key": uuid.uuid4().hex}
                    ) as r:
                        statuses.append(r.status)
                    async with http.get(f"{base}/items/{i % 5}") as r:
                        statuses.append(r.status)

            task = asyncio.ensure_future(traffic(2.0))
            await asyncio.sleep(0.4)
            assert state.up and state.errors == 0  # shared state was in use
            own_redis.kill()
            await asyncio.sleep(0.5)
            async with http.get(proxy_url(server, "admin") + "/status.json") as r:
                down = (await r.json())["state_backend"]
            own_redis.start()
            await task
            await _wait_for(lambda: state.up)
            await _wait_for(lambda: state.health() == "ok")  # write-backs done, no refusal lately
            async with http.get(proxy_url(server, "admin") + "/status.json") as r:
                up = (await r.json())["state_backend"]
            async with http.get(proxy_url(server, "admin") + "/metrics") as r:
                metrics = await r.text()
    assert len(statuses) > 50
    assert set(statuses) == {200}
    assert down["name"] == "redis" and down["health"].startswith("degraded")
    assert up["health"] == "ok"
    errors = [
        line for line in metrics.splitlines() if line.startswith('egressd_state_backend_errors_total{backend="redis"}')
    ]
    assert errors and float(errors[0].split()[-1]) >= 1


# -- what counts toward "Redis is down" (no redis-server needed) ---------------------------


class StubRedis:
    """Stands in for RedisState: `kv_get` does whatever `behaviour` says."""

    def __init__(self) -> None:
        self.behaviour: Callable[[], Awaitable[bytes | None]] = self._ok

    @staticmethod
    async def _ok() -> bytes | None:
        return b"shared"

    async def warm(self) -> None:
        return None

    async def heartbeat(self) -> int:
        return 1

    async def kv_get(self, key: str) -> bytes | None:
        return await self.behaviour()

    async def close(self) -> None:
        return None


async def _stub_state(**kwargs: Any) -> tuple[ResilientState, StubRedis, list[Event]]:
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    stub = StubRedis()
    fallback = MemoryState()
    await fallback.kv_set("k", b"local", ttl=60)
    state = ResilientState(stub, fallback, bus, probe_interval=30, **kwargs)  # type: ignore[arg-type]
    return state, stub, events


async def test_other_errors_use_the_fallback_but_leave_redis_up() -> None:
    import redis.exceptions

    state, stub, events = await _stub_state()

    async def script_error() -> bytes | None:
        raise redis.exceptions.ResponseError("ERR Error running script")

    stub.behaviour = script_error
    try:
        for _ in range(10):
            assert await state.kv_get("k") == b"local"
        assert state.up and state.errors == 10
        assert sum(isinstance(e, StateBackendError) for e in events) == 10
        stub.behaviour = StubRedis._ok
        assert await state.kv_get("k") == b"shared"
    finally:
        await state.close()


@pytest.mark.parametrize("error", ["redis", "oserror"])
async def test_connection_errors_mark_redis_down_at_once(error: str) -> None:
    import redis.exceptions

    state, stub, _events = await _stub_state()

    async def refused() -> bytes | None:
        if error == "redis":
            raise redis.exceptions.ConnectionError("Connection refused")
        raise ConnectionResetError("reset by peer")

    stub.behaviour = refused
    try:
        assert await state.kv_get("k") == b"local"
        assert not state.up
    finally:
        await state.close()


async def test_one_stall_under_concurrency_counts_as_one_timeout() -> None:
    state, stub, _events = await _stub_state(budget=0.02, down_after_timeouts=3)

    async def stall() -> bytes | None:
        await asyncio.sleep(0.2)
        return b"late"

    stub.behaviour = stall
    try:
        answers = await asyncio.gather(*(state.kv_get("k") for _ in range(50)))
        assert answers == [b"local"] * 50
        assert state.up  # fifty timeouts of one stall: one count
        assert await state.kv_get("k") == b"local"
        assert state.up  # two stalls in a row
        assert await state.kv_get("k") == b"local"
        assert not state.up  # three in a row, no success in between: down
    finally:
        await state.close()


async def test_a_success_between_timeouts_resets_the_count() -> None:
    state, stub, _events = await _stub_state(budget=0.02, down_after_timeouts=2)

    async def stall() -> bytes | None:
        await asyncio.sleep(0.2)
        return b"late"

    try:
        for _ in range(3):
            stub.behaviour = stall
            assert await state.kv_get("k") == b"local"
            stub.behaviour = StubRedis._ok
            assert await state.kv_get("k") == b"shared"
        assert state.up
    finally:
        await state.close()


async def test_a_completion_redis_loses_is_replayed_and_restored(
    redis_server: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    """Redis acknowledged a completion, then lost it (asynchronous replication during a
    Cluster failover, a restart without persistence): a repeat on the replica that completed
    it is replayed from its copy, and the record is written back for the other replicas."""
    import redis.asyncio as aioredis

    prefix = _prefix()
    one = await resilient(redis_server.url, prefix=prefix)
    two = await resilient(redis_server.url, prefix=prefix)
    assert (await one.idem_claim("k", "fp", ttl=60, lock_ttl=5)).state == "new"
    await one.idem_complete("k", answer(b'{"id": 1}'), ttl=60)
    client = aioredis.from_url(redis_server.url)
    try:
        lost = [key async for key in client.scan_iter(match=prefix + "*")]
        assert lost
        await client.delete(*lost)  # the record is gone from Redis
    finally:
        await client.aclose()
    again = await one.idem_claim("k", "fp", ttl=60, lock_ttl=5)
    assert again.state == "completed" and again.response is not None and again.response.body == b'{"id": 1}'
    assert (await one.idem_claim("k", "other", ttl=60, lock_ttl=5)).state == "mismatch"
    elsewhere = await two.idem_claim("k", "fp", ttl=60, lock_ttl=5)
    assert elsewhere.state == "completed"  # written back to Redis


# -- the records protocol in Redis: owners, doubt, completions without a record ---------------


async def test_claims_are_idempotent_per_owner(redis_server: RedisServer) -> None:
    """A claim whose reply was lost (it ran in Redis) is claimed again by the same owner:
    it is still that owner's claim, and nobody else's."""
    state = RedisState(redis_server.url, prefix=_prefix())
    try:
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10)).state == "in_flight"
        # no owner: never "the same owner" (older callers keep their semantics)
        assert (await state.idem_claim("s|n", "fp", ttl=60, lock_ttl=10)).state == "new"
        assert (await state.idem_claim("s|n", "fp", ttl=60, lock_ttl=10)).state == "in_flight"
        # a release by another owner leaves the record; the owner's own (or "") removes it
        await state.idem_release("s|k", "b")
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
        await state.idem_release("s|k", "a")
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "new"
        await state.idem_release("s|k")
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="c")).state == "new"
    finally:
        await state.close()


async def test_a_lapsed_lock_is_in_doubt_until_the_record_ends(redis_server: RedisServer) -> None:
    from proxy.clock import FakeClock

    clock = FakeClock(auto=False)
    state = RedisState(redis_server.url, prefix=_prefix(), clock=clock)
    try:
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
        clock.advance(11)
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
        assert (await state.idem_claim("s|k", "other", ttl=60, lock_ttl=10, owner="b")).state == "mismatch"
        await state.idem_release("s|k", "a")  # in doubt: not the owner's in-flight record any more
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="c")).state == "in_doubt"
        clock.advance(58)
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="c")).state == "in_doubt"
        clock.advance(2)  # lock + ttl are over
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="c")).state == "new"
        # an upstream that deduplicates on the key takes a record in doubt over
        clock.advance(11)
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="d", dedupes=True)).state == "new"
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="e")).state == "in_flight"
        # an in-doubt record that gets its answer after all is completed
        clock.advance(11)
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="e")).state == "in_doubt"
        await state.idem_complete("s|k", answer(b"late"), ttl=60, owner="d")
        done = await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="e")
        assert done.state == "completed" and done.response is not None and done.response.body == b"late"
    finally:
        await state.close()


async def test_complete_keeps_the_first_answer_and_stores_a_missing_record(redis_server: RedisServer) -> None:
    state = RedisState(redis_server.url, prefix=_prefix())
    try:
        await state.idem_complete("s|gone", answer(b"lost"), ttl=60)  # no fingerprint: nothing to store under
        assert (await state.idem_claim("s|gone", "fp", ttl=60, lock_ttl=10)).state == "new"
        await state.idem_complete("s|k", answer(b"first"), ttl=60, fingerprint="fp")
        await state.idem_complete("s|k", answer(b"second"), ttl=60, fingerprint="fp")
        got = await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10)
        assert got.state == "completed" and got.response is not None and got.response.body == b"first"
        assert (await state.idem_claim("s|k", "other", ttl=60, lock_ttl=10)).state == "mismatch"
        # a live record of another request is never given this answer
        assert (await state.idem_claim("s|m", "fp-a", ttl=60, lock_ttl=10, owner="a")).state == "new"
        await state.idem_complete("s|m", answer(b"b's"), ttl=60, fingerprint="fp-b", owner="b")
        assert (await state.idem_claim("s|m", "fp-a", ttl=60, lock_ttl=10, owner="c")).state == "in_flight"
    finally:
        await state.close()


async def test_records_written_by_the_previous_version_still_read(redis_server: RedisServer) -> None:
    """Hashes without owner (`o`) or lock (`lk`): an in-flight one is locked until its
    `exp` and then free, as before; a completed one replays."""
    from proxy.clock import FakeClock

    clock = FakeClock(1000.0, auto=False)
    state = RedisState(redis_server.url, prefix=_prefix(), clock=clock)
    try:
        client = state.client
        await client.hset(state.key("s|old", "idem"), mapping={"s": "in_flight", "fp": "fp", "exp": "1010"})
        await client.pexpire(state.key("s|old", "idem"), 60_000)
        assert (await state.idem_claim("s|old", "fp", ttl=60, lock_ttl=10, owner="a")).state == "in_flight"
        assert (await state.idem_claim("s|old", "x", ttl=60, lock_ttl=10, owner="a")).state == "mismatch"
        clock.advance(11)
        assert (await state.idem_claim("s|old", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
        await client.hset(
            state.key("s|done", "idem"),
            mapping={"s": "completed", "fp": "fp", "exp": "2000", "r": encode_response(answer(b"old"))},
        )
        await client.pexpire(state.key("s|done", "idem"), 60_000)
        got = await state.idem_claim("s|done", "fp", ttl=60, lock_ttl=10, owner="b")
        assert got.state == "completed" and got.response is not None and got.response.body == b"old"
        # an old in-flight record is released by any owner "" and completed by anyone
        await client.hset(state.key("s|rel", "idem"), mapping={"s": "in_flight", "fp": "fp", "exp": "1100"})
        await client.pexpire(state.key("s|rel", "idem"), 60_000)
        await state.idem_release("s|rel", "someone")
        assert (await state.idem_claim("s|rel", "fp", ttl=60, lock_ttl=10, owner="c")).state == "in_flight"
        await state.idem_complete("s|rel", answer(b"done"), ttl=60, owner="someone")
        assert (await state.idem_claim("s|rel", "fp", ttl=60, lock_ttl=10, owner="c")).state == "completed"
        await client.hset(state.key("s|rel2", "idem"), mapping={"s": "in_flight", "fp": "fp", "exp": "1100"})
        await client.pexpire(state.key("s|rel2", "idem"), 60_000)
        await state.idem_release("s|rel2")
        assert (await state.idem_claim("s|rel2", "fp", ttl=60, lock_ttl=10, owner="c")).state == "new"
    finally:
        await state.close()


async def test_the_ledger_has_its_own_keys(redis_server: RedisServer) -> None:
    prefix = _prefix()
    state = RedisState(redis_server.url, prefix=prefix)
    try:
        await state.ledger_set("routing|obj_1", b"paypal", ttl=300)
        assert await state.ledger_get("routing|obj_1") == b"paypal"
        assert await state.kv_get("routing|obj_1") is None
        keys = [k async for k in state.client.scan_iter(match=prefix + "*")]
        assert keys == [f"{prefix}{{routing}}|obj_1:ledger".encode()]
    finally:
        await state.close()


# -- claims never split across replicas while Redis is slow or away (contract 7.2) -------------


async def _claim_until_decided(
    state: ResilientState, key: str, owner: str, *, dedupes: bool = False, within: float = 10.0
) -> str:
    """What the idempotency stage does: claim again (same owner) while the store cannot decide."""
    deadline = time.monotonic() + within
    while True:
        try:
            return (await state.idem_claim(key, "fp", ttl=60, lock_ttl=30, owner=owner, dedupes=dedupes)).state
        except RecordsUnavailable:
            assert time.monotonic() < deadline, f"{key} never decided"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("stall", [0.1, 0.4])
async def test_one_claim_per_key_across_replicas_while_redis_stalls(
    stall: float, own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    """200 keys, each claimed at once through two replicas, while Redis freezes (SIGSTOP)
    for 100 ms (within the claim budget) or 400 ms (beyond it: claims are refused and
    claimed again by the same owner). Every key has exactly one owner."""
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)

    slowest = 0.0

    async def pair(i: int) -> list[str]:
        nonlocal slowest
        await asyncio.sleep(i * 0.001)  # spread over 200 ms around the stall
        key = f"up:idem|k{i}"
        started = time.monotonic()
        states = await asyncio.gather(_claim_until_decided(a, key, f"a{i}"), _claim_until_decided(b, key, f"b{i}"))
        slowest = max(slowest, time.monotonic() - started)
        return list(states)

    async def freeze() -> None:
        await asyncio.sleep(0.05)
        own_redis.suspend()
        try:
            await asyncio.sleep(stall)
        finally:
            own_redis.resume()

    freezing = asyncio.ensure_future(freeze())
    results = await asyncio.gather(*(pair(i) for i in range(200)))
    await freezing
    assert slowest >= stall * 0.8  # claims were waiting on the frozen Redis
    doubled = [i for i, states in enumerate(results) if states.count("new") > 1]
    assert not doubled, f"claimed twice: {doubled[:10]}"
    assert all(sorted(states) == ["in_flight", "new"] for states in results), results[:5]
    if stall > a.claim_budget:
        assert a.claims_refused + b.claims_refused > 0  # the refusal path was taken


async def test_a_frozen_redis_refuses_claims_except_where_the_upstream_dedupes(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    state = await resilient(own_redis.url, prefix=prefix)
    assert state.health() == "ok"
    own_redis.suspend()
    try:
        started = time.monotonic()
        with pytest.raises(RecordsUnavailable):
            await state.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="o1")
        assert 0.2 <= time.monotonic() - started < 0.25 + 0.3  # the claim budget, not the 50 ms one
        health = state.health()
        assert health.startswith("degraded:") and "claims refused: 1" in health, health
        assert state.records_snapshot()["claims_refused"] == 1
        assert state.records_snapshot()["refusing_claims"] is True
        local = await state.idem_claim("up:idem|d", "fp", ttl=60, lock_ttl=30, owner="o2", dedupes=True)
        assert local.state == "new"  # decided locally: the upstream deduplicates on the key
        await state.idem_complete("up:idem|d", answer(b"local"), ttl=60, fingerprint="fp", owner="o2")
        await state.abandon_claim("up:idem|k", "o1")  # the caller gives up (503): release queued
        assert state.records_snapshot()["write_backs_pending"] == 2
        assert "write-backs pending: 2" in state.health()
    finally:
        own_redis.resume()
    await _wait_for(lambda: state.health() == "ok")
    assert state.records_snapshot()["write_backs_pending"] == 0
    other = await resilient(own_redis.url, prefix=prefix)
    assert (await other.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="x")).state == "new"
    written = await other.idem_claim("up:idem|d", "fp", ttl=60, lock_ttl=30, owner="y")
    assert written.state == "completed" and written.response is not None and written.response.body == b"local"


async def test_a_completion_after_redis_was_flushed_is_stored_anyway(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)
    assert (await a.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="oa")).state == "new"
    await a.primary.client.flushall()  # Redis loses everything mid-flight
    await a.idem_complete("up:idem|k", answer(b'{"id": 7}'), ttl=60, fingerprint="fp", owner="oa")
    got = await b.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="ob")
    assert got.state == "completed" and got.response is not None and got.response.body == b'{"id": 7}'
    assert (await b.idem_claim("up:idem|k", "other", ttl=60, lock_ttl=30, owner="ob")).state == "mismatch"
    assert a.records_snapshot()["write_backs_pending"] == 0


async def test_what_was_recorded_while_redis_was_down_is_written_back(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)
    assert (await a.idem_claim("up:idem|k1", "fp", ttl=60, lock_ttl=30, owner="o1")).state == "new"
    own_redis.kill()
    # Redis granted the claim but cannot take the answer: kept here, queued
    await a.idem_complete("up:idem|k1", answer(b"one"), ttl=60, fingerprint="fp", owner="o1")
    assert not a.up and a.records_snapshot()["write_backs_pending"] == 1
    repeat = await a.idem_claim("up:idem|k1", "fp", ttl=60, lock_ttl=30, owner="o1b")
    assert repeat.state == "completed" and repeat.response is not None and repeat.response.body == b"one"
    # a local claim (the upstream dedupes) and a ledger entry, while Redis is away
    assert (await a.idem_claim("up:idem|k2", "fp", ttl=60, lock_ttl=30, owner="o2", dedupes=True)).state == "new"
    await a.idem_complete("up:idem|k2", answer(b"two"), ttl=60, fingerprint="fp", owner="o2")
    await a.ledger_set("routing|obj_1", b"paypal", ttl=300)
    assert await a.ledger_get("routing|obj_1") == b"paypal"
    assert a.records_snapshot()["write_backs_pending"] == 3
    assert "write-backs pending: 3" in a.health()

    own_redis.start()  # same port, empty
    await _wait_for(lambda: a.health() == "ok" and b.up)
    assert a.records_snapshot()["write_backs_done"] == 3
    for key, body in (("up:idem|k1", b"one"), ("up:idem|k2", b"two")):
        got = await b.idem_claim(key, "fp", ttl=60, lock_ttl=30, owner="ob")
        assert got.state == "completed" and got.response is not None and got.response.body == body
    assert await b.ledger_get("routing|obj_1") == b"paypal"


async def test_a_claim_whose_reply_was_lost_is_claimed_again_by_its_owner(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)
    own_redis.suspend()
    try:
        with pytest.raises(RecordsUnavailable):  # sent; Redis runs it when it wakes up
            await a.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="oa")
        assert a.records_snapshot()["claims_unsettled"] == 1
    finally:
        own_redis.resume()
    assert await _claim_until_decided(a, "up:idem|k", "oa") == "new"
    assert await _claim_until_decided(a, "up:idem|k", "oa") == "new"  # and again: still the owner's
    assert await _claim_until_decided(b, "up:idem|k", "ob") == "in_flight"
    assert a.records_snapshot()["claims_unsettled"] == 0


async def test_an_abandoned_claim_is_released_when_redis_returns(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)
    assert (await a.idem_claim("up:idem|held", "fp", ttl=60, lock_ttl=30, owner="o1")).state == "new"
    own_redis.suspend()
    try:
        with pytest.raises(RecordsUnavailable):
            await a.idem_claim("up:idem|lost", "fp", ttl=60, lock_ttl=30, owner="o2")
        await a.abandon_claim("up:idem|held", "o1")  # no answer: queued
        await a.abandon_claim("up:idem|lost", "o2")
        assert a.records_snapshot()["write_backs_pending"] == 2
    finally:
        own_redis.resume()
    await _wait_for(lambda: a.records_snapshot()["write_backs_pending"] == 0)
    assert (await b.idem_claim("up:idem|held", "fp", ttl=60, lock_ttl=30, owner="x")).state == "new"
    assert (await b.idem_claim("up:idem|lost", "fp", ttl=60, lock_ttl=30, owner="x")).state == "new"


async def test_an_unsettled_claim_nobody_retries_is_released_at_the_end_of_its_lock(
    own_redis: RedisServer, resilient: Callable[..., Awaitable[ResilientState]]
) -> None:
    prefix = _prefix()
    a = await resilient(own_redis.url, prefix=prefix)
    b = await resilient(own_redis.url, prefix=prefix)
    own_redis.suspend()
    try:
        with pytest.raises(RecordsUnavailable):
            await a.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=0.8, owner="gone")
    finally:
        own_redis.resume()
    await _wait_for(
        lambda: a.records_snapshot()["claims_unsettled"] == 0 and not a.records_snapshot()["write_backs_pending"]
    )
    assert (await b.idem_claim("up:idem|k", "fp", ttl=60, lock_ttl=30, owner="x")).state == "new"
