"""Issue 7, item 4: a Redis Cluster master fails over under load, and no call fails.

A real 3-master Cluster with one replica per master (six `redis-server` processes). Two
egressd instances share it (`redis+cluster://`) and serve steady load against a fake
upstream: idempotent POSTs (each repeated once: the repeat must be a replay), GETs, a
shared rate limit. Then the master that holds the shared rate limit's key is SIGKILLed;
its replica is promoted after the node timeout. Every call is answered 2xx (or, for a
keyed POST whose claim no master could decide within its wait, 503 `state_unavailable`:
not sent; no payment is ever sent twice), the backend reports `degraded` and then `ok`
again (redis-py's Cluster client picks up the new slot map), and state is shared across
the two instances again afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from redis.crc import key_slot

from fakes.server import FakeServer
from proxy.server import EgressServer
from proxy.state.base import CircuitSettings
from proxy.state.resilient import ResilientState, open_shared_state
from tests.conftest import proxy_url
from tests.redis_server import RedisCluster, RedisServer, cli, running_cluster

CB = CircuitSettings(window=10.0, min_requests=4, failure_rate=0.5, open_for=30.0, half_open_requests=1)


def slot_ranges(cluster: RedisCluster, port: int) -> list[tuple[int, int]]:
    """The slot ranges `port` serves, per `CLUSTER NODES`."""
    for line in cli(port, "cluster", "nodes").splitlines():
        parts = line.split()
        if len(parts) > 8 and "myself" in parts[2]:
            ranges = []
            for r in parts[8:]:
                if r.startswith("["):  # a slot being migrated
                    continue
                lo, _, hi = r.partition("-")
                ranges.append((int(lo), int(hi or lo)))
            return ranges
    return []


def owner_of(cluster: RedisCluster, pattern: str) -> RedisServer | None:
    """The master holding a key that matches `pattern`."""
    for node in cluster.masters():
        if cli(node.port, "--scan", "--pattern", pattern).strip():
            return node
    return None


def scope_on(state: ResilientState, ranges: list[tuple[int, int]], kind: str) -> str:
    """A state key whose Redis key lives in one of `ranges`."""
    for i in range(100_000):
        key = f"failover:cb:{i}"
        slot = key_slot(state.primary.key(key, kind).encode())
        if any(lo <= slot <= hi for lo, hi in ranges):
            return key
    raise AssertionError("no key found for the slot ranges")


async def wait_for(predicate: Callable[[], bool], limit: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.timeout(60)
async def test_cluster_master_failover_under_load(start_proxy: Callable[..., Awaitable[EgressServer]]) -> None:
    began = time.monotonic()
    prefix = f"failover-{uuid.uuid4().hex[:6]}:"
    states: list[ResilientState] = []
    with running_cluster(replicas=1) as cluster:
        try:
            async with FakeServer("echo") as fake:
                policy = [
                    {
                        "upstream": "echo",
                        "target": fake.url,
                        "rate_limit": {"rate": "1000/s", "burst": 100, "shared": True, "queue": {"max_wait": "5s"}},
                        "circuit_breaker": {"window": "10s", "min_requests": 5, "failure_rate": 0.5, "open_for": "5s"},
                        "idempotency": {"replay_ttl": "1h"},
                    },
                    {
                        "upstream": "tight",
                        "target": fake.url,
                        "rate_limit": {"rate": "2/m", "burst": 2, "shared": True},
                    },
                ]
                servers = []
                for _ in range(2):
                    state = open_shared_state(cluster.url, prefix=prefix)
                    # health is "degraded" for this long after a refused claim (10 s by default)
                    state.refusal_window = 0.5
                    states.append(state)
                    assert await state.connect()
                    servers.append(await start_proxy(policy, state=state))
                a, b = states
                bases = [proxy_url(s) for s in servers]

                statuses: Counter[int] = Counter()
                failures: list[str] = []
                replays: Counter[str] = Counter()  # "replayed" / "sent again"
                # A keyed POST whose claim no Redis master could decide within its wait
                # (the claim's slot was on the failed master) is refused, not sent: 503
                # state_unavailable (contract 7.2). Counted, never a failure.
                refused: Counter[str] = Counter()
                health: list[list[str]] = [[], []]  # health transitions seen, per instance
                stop = asyncio.Event()

                async def worker(n: int, http: aiohttp.ClientSession) -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        base = bases[(n + i) % 2] + "/echo"
                        key = uuid.uuid4().hex
                        calls = [
                            ("POST", f"{base}/pay", key),
                            ("POST", f"{base}/pay", key),  # the app repeats: a replay
                            ("GET", f"{base}/items/{i % 7}", None),
                        ]
                        first_refused = False
                        for j, (method, url, idem) in enumerate(calls):
                            headers = {"Idempotency-Key": idem} if idem else {}
                            try:
                                async with http.request(
                                    method, url, json={"n": n, "i": i} if idem else None, headers=headers
                                ) as r:
                                    text = await r.text()
                                    statuses[r.status] += 1
                                    if idem and r.status == 503 and "state_unavailable" in text:
                                        refused[method] += 1
                                        first_refused = first_refused or j == 0
                                        assert r.headers.get("Retry-After"), "a refusal says when to try again"
                                        continue
                                    if not 200 <= r.status < 300:
                                        failures.append(f"{method} {url}: {r.status} {text}"[:300])
                                    if j == 1 and not first_refused:  # (else the repeat is the first send)
                                        replayed = r.headers.get("Idempotent-Replayed") == "true"
                                        replays["replayed" if replayed else "sent again"] += 1
                            except Exception as exc:  # every failure is reported
                                failures.append(f"{method} {url}: {type(exc).__name__}: {exc}")
                        await asyncio.sleep(0.01)

                async def watch() -> None:
                    while not stop.is_set():
                        for seen, state in zip(health, states, strict=True):
                            h = state.health().split(":")[0]
                            if not seen or seen[-1] != h:
                                seen.append(h)
                        await asyncio.sleep(0.02)

                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
                    tasks = [asyncio.create_task(worker(n, http)) for n in range(4)]
                    watcher = asyncio.create_task(watch())
                    try:
                        await asyncio.sleep(1.5)  # steady load on shared state
                        # (a stray timeout while the pools warm up may be counted; it fails no call)
                        assert a.up and b.up, (a.health(), b.health())
                        warmup_errors = (a.errors, b.errors, a.last_error, b.last_error)
                        victim = owner_of(cluster, f"{prefix}*echo*gcra")
                        assert victim is not None, "the shared rate limit's key is in the cluster"
                        replica = cluster.replica_of(victim)
                        ranges = slot_ranges(cluster, victim.port)
                        before = sum(statuses.values())

                        for seen in health:  # judged from the kill on
                            seen[:] = ["ok"]
                        killed_at = time.monotonic()
                        victim.kill()  # SIGKILL the master; its replica takes over after the node timeout
                        failover_s = await asyncio.to_thread(cluster.wait_failover, victim, replica, 20.0)
                        # redis-py's Cluster client refreshes its slot map; the probe calls Redis up again
                        await wait_for(lambda: a.up and b.up, 15.0, "both instances back on shared state")
                        recovered_s = time.monotonic() - killed_at
                        await asyncio.sleep(1.0)  # load keeps going on the promoted master
                        during = sum(statuses.values()) - before
                    finally:
                        stop.set()
                        await asyncio.gather(*tasks, watcher, return_exceptions=True)

                    async with http.get(proxy_url(servers[0], "admin") + "/status.json") as r:
                        status_page = (await r.json())["state_backend"]
                    records = [state.records_snapshot() for state in states]

                    # Shared again after the failover: a rate limit across the two instances...
                    tight = [(await http.get(bases[0] + "/tight/x")).status for _ in range(2)]
                    over = await http.get(bases[1] + "/tight/x")
                    # ... and a circuit on the promoted master's slots.
                    key = scope_on(a, ranges, "cb")
                    for _ in range(4):
                        await a.circuit_record(key, CB, failure=True, trial=False)
                    shared_circuit = await b.circuit_state(key, CB)
                    shared_admit = (await b.circuit_admit(key, CB)).allowed

                requests_by_key = Counter(
                    r.headers.get("Idempotency-Key") for r in fake.ledger.requests if r.path.endswith("/pay")
                )
        finally:
            for state in states:
                await state.close()

    summary = (
        f"statuses={dict(statuses)} calls_during_fault={during} replays={dict(replays)} "
        f"refused={dict(refused)} health={health} "
        f"failover={failover_s:.1f}s recovered={recovered_s:.1f}s failures={failures[:5]} "
        f"errors before the fault={warmup_errors}"
    )
    print(summary)
    assert not failures, summary
    assert sum(statuses.values()) > 200 and during > 50, summary
    assert set(statuses) <= {200, 503} and statuses[503] == sum(refused.values()), summary
    # every repeat was a replay: no payment reached the upstream twice
    assert replays["sent again"] == 0, summary
    assert max(requests_by_key.values()) == 1, summary
    # degraded during the failover, ok afterwards
    for seen in health:
        assert seen[0] == "ok" and "degraded" in seen and seen[-1] == "ok", summary
    assert status_page["health"] == "ok", status_page
    assert all(r["write_backs_pending"] == 0 for r in records), records
    assert recovered_s < 20, summary
    assert tight == [200, 200] and over.status == 429, (tight, over.status)
    assert shared_circuit == "open" and not shared_admit
    assert time.monotonic() - began < 60


async def test_an_answer_redis_cannot_take_is_kept_for_a_replay_here() -> None:
    """Redis granted the claim, then went away (a master failing over) before the answer
    was stored: the answer is kept locally, so a repeat on this replica is a replay, not a
    second side effect, and it is written to Redis once Redis takes it. (No redis-server
    needed.)"""
    import redis.exceptions

    from proxy.state.base import IdempotencyClaim, StoredResponse
    from proxy.state.memory import MemoryState

    class FlakyRedis:
        up = True
        takes_answers = False

        def __init__(self) -> None:
            self.completed: dict[str, tuple[str, StoredResponse]] = {}
            self.released: list[tuple[str, str]] = []

        async def idem_claim(
            self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
        ) -> IdempotencyClaim:
            if not self.up:
                raise redis.exceptions.ConnectionError("Connection refused")
            return IdempotencyClaim("new")

        async def idem_complete(
            self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
        ) -> None:
            if not self.takes_answers:
                raise redis.exceptions.ConnectionError("Connection refused")
            self.completed.setdefault(key, (fingerprint, response))

        async def idem_release(self, key: str, owner: str = "") -> None:
            self.released.append((key, owner))

        async def warm(self) -> None:
            return None

        async def heartbeat(self) -> int:
            return 1

        async def close(self) -> None:
            return None

    primary = FlakyRedis()
    state = ResilientState(primary, MemoryState(), probe_interval=30)  # type: ignore[arg-type]
    answer = StoredResponse(status=200, headers=(("content-type", "application/json"),), body=b"{}", stored_at=0.0)
    key = "up:idem:1|k"
    try:
        assert (await state.idem_claim(key, "fp", ttl=60, lock_ttl=10, owner="o1")).state == "new"
        await state.idem_complete(key, answer, ttl=60, fingerprint="fp", owner="o1")  # refused: kept, queued
        assert not state.up
        assert state.records_snapshot()["write_backs_pending"] == 1
        assert state.health().startswith("degraded:") and "write-backs pending: 1" in state.health()
        repeat = await state.idem_claim(key, "fp", ttl=60, lock_ttl=10, owner="o2")
        assert repeat.state == "completed" and repeat.response is not None and repeat.response.body == b"{}"
        assert (await state.idem_claim(key, "other", ttl=60, lock_ttl=10, owner="o3")).state == "mismatch"
        # Redis is back but still refuses answers: the claim is answered from the queue
        primary.up = True
        state.up = True
        assert (await state.idem_claim(key, "fp", ttl=60, lock_ttl=10, owner="o4")).state == "completed"
        assert await state.flush_write_back() == 0 and state.records_snapshot()["write_backs_pending"] == 1
        state.up = True
        # ... and once it takes them, the answer is written back under its fingerprint
        primary.takes_answers = True
        assert await state.flush_write_back() == 1
        assert primary.completed[key] == ("fp", answer)
        assert state.records_snapshot()["write_backs_pending"] == 0 and state.health() == "ok"
        assert (await state.idem_claim(key, "fp", ttl=60, lock_ttl=10, owner="o5")).state == "completed"
        # a released claim leaves nothing behind
        assert (await state.idem_claim("up:idem:1|r", "fp", ttl=60, lock_ttl=10, owner="o6")).state == "new"
        await state.idem_release("up:idem:1|r", "o6")
        assert "up:idem:1|r" not in state._redis_claims
        assert primary.released == [("up:idem:1|r", "o6")]
    finally:
        await state.close()
