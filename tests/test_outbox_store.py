"""One suite for every outbox store (proxy/outbox/store.py has the protocol and the states):
process memory, the data dir (SQLite), Redis and Redis Cluster, then what only Redis has
(replicas that die, Redis that stops answering).

A "backend" makes stores: each call to `make()` is another process on the same backing
store (another `SQLiteState` on the same data dir, another `RedisState` with the same
prefix), except for memory, where the tests that need two processes are skipped. Times
passed to the stores are wall-clock seconds around the real time (the SQLite and Redis
stores stamp `updated` with their own wall clock).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from proxy.clock import FakeClock
from proxy.outbox.redis_store import RedisOutbox
from proxy.outbox.store import (
    KEEP_DELIVERED,
    PENDING,
    STATES,
    Entry,
    EntryNotHeld,
    MemoryOutbox,
    OutboxFull,
    OutboxStore,
    OutboxUnavailable,
)
from proxy.state.factory import open_data_dir
from proxy.state.redis import RedisState
from tests.redis_server import RedisServer, require_redis

T0 = time.time()
HOUR = 3600.0


def make_entry(
    n: int | str, upstream: str = "mail", *, created: float | None = None, due: float | None = None, **kw: Any
) -> Entry:
    created = T0 + (int(n) if isinstance(n, int) else 0) if created is None else created
    return Entry(
        id=f"eo_{n}_{uuid.uuid4().hex[:6]}" if isinstance(n, int) else n,
        upstream=upstream,
        method="POST",
        path="/v3/mail/send",
        query="a=1",
        headers=[("Content-Type", "application/json"), ("Authorization", "Bearer SG.x")],
        body=b'{"n": %d}\x00\xff' % (hash(n) % 1000),
        created=created,
        expires=created + kw.pop("max_age", 24 * HOUR),
        due=created if due is None else due,
        **kw,
    )


@dataclass
class Backend:
    kind: str
    make: Callable[[], Awaitable[OutboxStore]]
    kill: Callable[[OutboxStore], Awaitable[None]] | None = None  # the store's process dies
    cross: bool = True  # make() returns stores of different processes
    extras: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "memory":
        shared = MemoryOutbox()

        async def same() -> OutboxStore:
            return shared

        yield Backend("memory", same, cross=False)
        return
    if request.param == "sqlite":
        from proxy.outbox.sqlite_store import SQLiteOutbox
        from proxy.state.sqlite import SQLiteState

        states: list[SQLiteState] = []

        async def sqlite() -> OutboxStore:
            state = open_data_dir(tmp_path / "d")
            states.append(state)
            return SQLiteOutbox(state)

        async def close_process(store: OutboxStore) -> None:
            assert isinstance(store, SQLiteOutbox)
            await store.state.close()  # its instance row goes: it is dead to the others

        yield Backend("sqlite", sqlite, close_process)
        for s in states:
            await s.close()
        return
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    url = request.getfixturevalue(fixture).url
    prefix = f"tob-{uuid.uuid4().hex[:8]}:"
    made: list[RedisState] = []

    async def redis_store() -> OutboxStore:
        state = RedisState(url, prefix=prefix)
        made.append(state)
        await state.heartbeat()  # what ResilientState's probe loop does every 2 s
        return RedisOutbox(state)

    async def stop_beating(store: OutboxStore) -> None:
        assert isinstance(store, RedisOutbox)
        await age_heartbeat(store)

    yield Backend(request.param, redis_store, stop_beating, extras={"prefix": prefix, "url": url})
    for state in made:
        await assert_consistent(state, prefix)
        await state.close()


async def age_heartbeat(store: RedisOutbox, by: float = 60.0) -> None:
    """The replica's last heartbeat, `by` seconds ago (by Redis TIME): it stopped beating."""
    secs, micros = await store.client.time()
    await store.client.zadd(f"{store.prefix}replicas", {store.instance: secs + micros / 1e6 - by})


async def assert_consistent(state: RedisState, prefix: str) -> None:
    """Every index agrees with the entry hashes: nothing half-written."""
    for raw in await state.client.smembers(f"{prefix}outbox:upstreams"):
        await _consistent_upstream(state, f"{prefix}outbox:{{{raw.decode()}}}:")


async def _consistent_upstream(state: RedisState, base: str) -> None:
    client = state.client
    entries: dict[str, dict[str, str]] = {}
    async for key in client.scan_iter(match=f"{base}e:*", count=1000):
        f = {k.decode(): v.decode("latin-1") for k, v in (await client.hgetall(key)).items()}
        if f and f["state"] != "corrupt":
            entries[f["id"]] = f

    async def zset(name: str) -> dict[str, float]:
        return {m.decode(): s for m, s in await client.zrange(base + name, 0, -1, withscores=True)}

    def want(pred: Callable[[dict[str, str]], bool], score: str) -> dict[str, float]:
        return {i: float(f[score]) for i, f in entries.items() if pred(f)}

    for s in STATES:
        assert await zset("st:" + s) == want(lambda f, s=s: f["state"] == s, "created"), f"{base} st:{s}"
    assert await zset("queue") == want(lambda f: f["state"] == "queued", "due"), f"{base} queue"
    assert await zset("doubt") == want(lambda f: f["state"] == "doubt", "due"), f"{base} doubt"
    unheld = want(lambda f: f["state"] in ("queued", "doubt") and not f["owner"], "expires")
    assert await zset("exp") == unheld, f"{base} exp"
    held = want(lambda f: f["state"] in ("claimed", "sending") or (f["state"] == "doubt" and bool(f["owner"])), "held")
    assert await zset("held") == held, f"{base} held"
    assert await zset("gone") == want(lambda f: f["state"] == "delivered", "updated"), f"{base} gone"


async def state_of(store: OutboxStore, entry_id: str) -> str | None:
    e = await store.get(entry_id)
    return None if e is None else e.state


# -- add, get, the bound ---------------------------------------------------------------------------


async def test_add_keeps_every_field(backend: Backend) -> None:
    store = await backend.make()
    entry = make_entry(1)
    await store.add(entry, max_entries=10)
    got = await store.get(entry.id)
    assert got is not None
    assert (got.id, got.upstream, got.method, got.path, got.query) == (
        entry.id,
        "mail",
        "POST",
        "/v3/mail/send",
        "a=1",
    )
    assert got.headers == entry.headers and got.body == entry.body
    assert (got.created, got.expires, got.due, got.state, got.owner, got.attempts) == (
        entry.created,
        entry.expires,
        entry.due,
        "queued",
        "",
        0,
    )
    assert await store.get("eo_nope") is None
    if backend.cross:  # another process sees it
        other = await backend.make()
        seen = await other.get(entry.id)
        assert seen is not None and seen.body == entry.body


async def test_a_full_outbox_refuses_and_stores_nothing(backend: Backend) -> None:
    store = await backend.make()
    kept = [make_entry(i) for i in range(3)]
    for e in kept:
        await store.add(e, max_entries=3)
    refused = make_entry(9)
    with pytest.raises(OutboxFull):
        await store.add(refused, max_entries=3)
    assert await store.get(refused.id) is None
    await store.add(make_entry(1, upstream="other"), max_entries=3)  # the bound is per upstream
    # Only pending entries count: one delivered and one dead make room for two.
    claimed = await store.claim("mail", T0 + 10, 2)
    claimed[0].state = "delivered"
    claimed[1].state = "dead"
    for e in claimed:
        await store.finish(e)
    if backend.kind == "sqlite":
        await store.stats(T0)  # (SQLite recounts at most every COUNT_EVERY seconds, or here)
    await store.add(make_entry(10), max_entries=3)
    await store.add(make_entry(11), max_entries=3)
    with pytest.raises(OutboxFull):
        await store.add(make_entry(12), max_entries=3)


# -- claim ------------------------------------------------------------------------------------------


async def test_claim_takes_due_entries_by_due_then_created(backend: Backend) -> None:
    store = await backend.make()
    late = make_entry("eo_late", created=T0 + 1, due=T0 + 50)
    second = make_entry("eo_second", created=T0 + 5, due=T0 + 10)
    first_b = make_entry("eo_first_b", created=T0 + 3, due=T0 + 2)
    first_a = make_entry("eo_first_a", created=T0 + 2, due=T0 + 2)
    other = make_entry("eo_other", upstream="other", created=T0, due=T0)
    for e in (late, second, first_b, first_a, other):
        await store.add(e, max_entries=100)
    assert [e.id for e in await store.claim("mail", T0 + 20, 2)] == ["eo_first_a", "eo_first_b"]
    got = await store.claim("mail", T0 + 20, 10)
    assert [e.id for e in got] == ["eo_second"]  # eo_late is not due yet
    assert got[0].state == "claimed" and got[0].owner == store.instance and got[0].body == second.body
    assert await store.claim("mail", T0 + 20, 10) == []
    assert [e.id for e in await store.claim("mail", T0 + 60, 10)] == ["eo_late"]
    assert await store.claim("mail", T0 + 60, 0) == []
    stored = await store.get("eo_first_a")
    assert stored is not None and stored.state == "claimed" and stored.owner == store.instance


async def test_no_entry_is_claimed_twice(backend: Backend) -> None:
    stores = [await backend.make() for _ in range(3)]
    ids = set()
    for i in range(60):
        e = make_entry(i)
        ids.add(e.id)
        await stores[0].add(e, max_entries=1000)
    # Every store claims in small batches at once until nothing is left.
    taken: list[tuple[int, str]] = []

    async def worker(n: int) -> None:
        while True:
            got = await stores[n].claim("mail", T0 + 100, 4)
            if not got:
                return
            taken.extend((n, e.id) for e in got)
            await asyncio.sleep(0)

    await asyncio.gather(*(worker(n) for n in range(3)), *(worker(n) for n in range(3)))
    claimed = [i for _, i in taken]
    assert sorted(claimed) == sorted(ids)  # each one exactly once
    if backend.cross:
        for n, entry_id in taken:  # held by the store that got it
            e = await stores[0].get(entry_id)
            assert e is not None and e.owner == stores[n].instance


# -- only the owner writes -----------------------------------------------------------------------


async def test_mark_sending_and_finish_only_by_the_owner(backend: Backend) -> None:
    owner = await backend.make()
    e = make_entry(1)
    await owner.add(e, max_entries=10)
    [held] = await owner.claim("mail", T0 + 10, 1)
    if backend.cross:
        other = await backend.make()
        with pytest.raises(EntryNotHeld):  # every store refuses it: the caller must not send
            await other.mark_sending(e.id, "mail")
        stolen = await owner.get(e.id)
        assert stolen is not None and stolen.state == "claimed" and stolen.sent_to == []
        rogue = await owner.get(e.id)
        assert rogue is not None
        rogue.state = "delivered"
        await other.finish(rogue)
        assert await state_of(owner, e.id) == "claimed"
        with pytest.raises(EntryNotHeld):
            await other.mark_sending(e.id, "mail")
        assert await state_of(owner, e.id) == "claimed"
    await owner.mark_sending(e.id, "mail")
    await owner.mark_sending(e.id, "mail")  # once in sent_to
    await owner.mark_sending(e.id, "fallback")
    sending = await owner.get(e.id)
    assert sending is not None and sending.state == "sending" and sending.sent_to == ["mail", "fallback"]
    assert sending.owner == owner.instance
    # The owner writes the outcome: delivered drops the body and the hold, keeps the ids.
    held.state, held.attempts, held.provider_id, held.delivered_via = "delivered", 1, "sg-123", "fallback"
    held.sent_to = ["mail", "fallback"]
    await owner.finish(held)
    done = await owner.get(e.id)
    assert done is not None
    assert (done.state, done.owner, done.body, done.attempts) == ("delivered", "", b"", 1)
    assert (done.provider_id, done.delivered_via, done.sent_to) == ("sg-123", "fallback", ["mail", "fallback"])
    # Not held any more: the owner cannot write it either.
    held.state = "queued"
    await owner.finish(held)
    assert await state_of(owner, e.id) == "delivered"


async def test_finish_back_to_the_queue_and_claimed_again(backend: Backend) -> None:
    store = await backend.make()
    e = make_entry(1)
    await store.add(e, max_entries=10)
    [held] = await store.claim("mail", T0 + 1, 1)
    held.state, held.due, held.attempts, held.last_error = "queued", T0 + 30, 1, "rate_limited"
    await store.finish(held)
    again = await store.get(e.id)
    assert again is not None
    assert (again.state, again.owner, again.due, again.last_error) == ("queued", "", T0 + 30, "rate_limited")
    assert again.body == e.body  # kept for the next attempt
    assert await store.claim("mail", T0 + 29, 5) == []
    assert [x.id for x in await store.claim("mail", T0 + 30, 5)] == [e.id]


# -- in doubt: probes ---------------------------------------------------------------------------------


async def test_due_probes_holds_doubt_entries_for_probing(backend: Backend) -> None:
    store = await backend.make()
    entries = [make_entry(i) for i in range(3)]
    for e in entries:
        await store.add(e, max_entries=10)
    held = await store.claim("mail", T0 + 5, 3)
    for n, h in enumerate(held):
        h.state, h.due = "doubt", T0 + 100 + n
        await store.finish(h)
    assert await store.due_probes("mail", T0 + 99, 10) == []
    assert await store.claim("mail", T0 + 1000, 10) == []  # never claimed for a send
    probing = await store.due_probes("mail", T0 + 101, 10)
    assert [p.id for p in probing] == [held[0].id, held[1].id]  # by due
    assert all(p.state == "doubt" and p.owner == store.instance for p in probing)
    assert await store.due_probes("mail", T0 + 101.5, 10) == []  # held: not handed out twice
    if backend.cross:
        other = await backend.make()
        # held: not taken by another process for an hour, and never by a claim
        assert [p.id for p in await other.due_probes("mail", T0 + 200, 10)] == [held[2].id]
    # The probe's verdict: delivered (found) / queued (absent).
    probing[0].state, probing[0].provider_id = "delivered", "sg-1"
    probing[1].state, probing[1].due, probing[1].sent_to = "queued", T0 + 101, []
    for p in probing:
        await store.finish(p)
    assert await state_of(store, held[0].id) == "delivered"
    assert [x.id for x in await store.claim("mail", T0 + 101, 10)] == [held[1].id]


# -- expire ---------------------------------------------------------------------------------------------


async def test_expire_ends_queued_and_doubt_entries_past_max_age(backend: Backend) -> None:
    store = await backend.make()
    queued = make_entry(1, max_age=100)
    doubt = make_entry(2, max_age=100)
    young = make_entry(3, max_age=1000)
    held = make_entry(4, max_age=100)
    for e in (queued, doubt, young, held):
        await store.add(e, max_entries=10)
    claimed = {e.id: e for e in await store.claim("mail", T0 + 10, 10)}
    d = claimed[doubt.id]
    d.state, d.last_error = "doubt", "timeout"
    await store.finish(d)
    for back in (queued, young):
        claimed[back.id].state = "queued"
        await store.finish(claimed[back.id])
    assert await store.expire(T0 + 50) == []
    died = {e.id: e for e in await store.expire(T0 + 200)}
    assert set(died) == {queued.id, doubt.id}  # a claimed entry is not ended under its worker
    assert died[queued.id].state == "dead" and died[queued.id].last_error == "max_age passed"
    assert died[doubt.id].state == "ambiguous" and died[doubt.id].last_error == "timeout"
    assert await state_of(store, queued.id) == "dead"
    assert await state_of(store, doubt.id) == "ambiguous"
    assert await state_of(store, young.id) == "queued"
    assert await state_of(store, held.id) == "claimed"
    assert await store.expire(T0 + 300) == []  # once
    assert [x.id for x in await store.claim("mail", T0 + 300, 10)] == [young.id]  # never a dead one


async def test_expire_leaves_a_doubt_entry_held_for_probing(backend: Backend) -> None:
    store = await backend.make()
    e = make_entry(1, max_age=100)
    await store.add(e, max_entries=10)
    [h] = await store.claim("mail", T0 + 10, 1)
    h.state, h.due = "doubt", T0 + 10
    await store.finish(h)
    [probing] = await store.due_probes("mail", T0 + 150, 1)
    assert await store.expire(T0 + 200) == []
    probing.state, probing.due = "doubt", T0 + 300
    await store.finish(probing)
    assert [x.state for x in await store.expire(T0 + 400)] == ["ambiguous"]


async def test_delivered_entries_are_forgotten_after_keep_delivered(backend: Backend) -> None:
    store = await backend.make()
    e = make_entry(1)
    await store.add(e, max_entries=10)
    [h] = await store.claim("mail", T0 + 10, 1)
    h.state, h.provider_id = "delivered", "sg-1"
    await store.finish(h)  # updated = the store's wall clock, about now
    assert await store.expire(time.time() + KEEP_DELIVERED - 120) == []
    kept = await store.get(e.id)
    assert kept is not None and kept.provider_id == "sg-1"
    assert await store.expire(time.time() + KEEP_DELIVERED + 120) == []
    assert await store.get(e.id) is None
    assert (await store.stats(time.time())).get("mail") is None


# -- the operator: retry, drop ---------------------------------------------------------------------------


async def test_retry_only_ambiguous_and_dead_entries(backend: Backend) -> None:
    store = await backend.make()
    entries = {s: make_entry(n) for n, s in enumerate(("queued", "claimed", "ambiguous", "dead", "delivered"))}
    for e in entries.values():
        await store.add(e, max_entries=10)
    held = {x.id: x for x in await store.claim("mail", T0 + 10, 10)}
    for s in ("queued", "ambiguous", "dead", "delivered"):
        x = held[entries[s].id]
        x.state, x.sent_to = s, ["mail"]
        await store.finish(x)
    for s in ("queued", "claimed", "delivered"):
        assert await store.retry(entries[s].id, T0 + 20, 100) is None
        assert await state_of(store, entries[s].id) == s
    assert await store.retry("eo_nope", T0 + 20, 100) is None
    for s in ("ambiguous", "dead"):
        back = await store.retry(entries[s].id, T0 + 20, 100)
        assert back is not None and back.id == entries[s].id
        stored = await store.get(entries[s].id)
        assert stored is not None
        assert (stored.state, stored.due, stored.expires, stored.owner, stored.sent_to) == (
            "queued",
            T0 + 20,
            T0 + 120,
            "",
            [],
        )
    again = {x.id for x in await store.claim("mail", T0 + 20, 10)}
    assert again == {entries[s].id for s in ("queued", "ambiguous", "dead")}


async def test_drop_deletes_what_no_worker_holds(backend: Backend) -> None:
    store = await backend.make()
    states = ("queued", "claimed", "sending", "doubt", "ambiguous", "dead", "delivered")
    entries = {s: make_entry(n) for n, s in enumerate(states)}
    for e in entries.values():
        await store.add(e, max_entries=10)
    held = {x.id: x for x in await store.claim("mail", T0 + 10, 10)}
    await store.mark_sending(entries["sending"].id, "mail")
    for s in ("queued", "doubt", "ambiguous", "dead", "delivered"):
        held[entries[s].id].state = s
        await store.finish(held[entries[s].id])
    for s in ("claimed", "sending"):
        assert await store.drop(entries[s].id) is None
        assert await state_of(store, entries[s].id) == s
    for s in ("queued", "doubt", "ambiguous", "dead", "delivered"):
        gone = await store.drop(entries[s].id)
        assert gone is not None and gone.id == entries[s].id and gone.state == s
        assert await store.get(entries[s].id) is None
    assert await store.drop(entries["queued"].id) is None
    assert await store.claim("mail", T0 + 1000, 10) == []
    assert await store.due_probes("mail", T0 + 1000, 10) == []


# -- stats and list -----------------------------------------------------------------------------------------


async def test_stats_count_states_per_upstream(backend: Backend) -> None:
    store = await backend.make()
    assert await store.stats(T0) == {}
    mail = [make_entry(n, created=T0 + n) for n in range(7)]
    for e in mail:
        await store.add(e, max_entries=100)
    await store.add(make_entry(1, upstream="other", created=T0 - 50), max_entries=100)
    held = await store.claim("mail", T0 + 100, 7)  # by created: mail[0] first
    ends = ("delivered", "delivered", "dead", "ambiguous", "doubt", "queued")
    for x, s in zip(held[:6], ends, strict=True):
        x.state = s
        await store.finish(x)
    await store.mark_sending(held[6].id, "mail")
    stats = await store.stats(T0 + 100)
    m = stats["mail"]
    assert (m.pending, m.doubt, m.ambiguous, m.dead, m.delivered) == (3, 1, 1, 1, 2)  # doubt, queued, sending
    assert m.oldest == T0 + 4  # the oldest pending one (mail[4], in doubt)
    o = stats["other"]
    assert (o.pending, o.oldest, o.delivered) == (1, T0 - 50, 0)


async def test_list_filters_and_order(backend: Backend) -> None:
    store = await backend.make()
    mail = [make_entry(n, created=T0 + 10 - n) for n in range(5)]  # created newest first
    for e in mail:
        await store.add(e, max_entries=100)
    other = make_entry(1, upstream="other", created=T0 + 7.5)
    await store.add(other, max_entries=100)
    [h] = await store.claim("mail", T0 + 100, 1)  # the earliest due: mail[4]
    h.state = "dead"
    await store.finish(h)
    everything = await store.list()
    assert [e.id for e in everything] == [mail[4].id, mail[3].id, other.id, mail[2].id, mail[1].id, mail[0].id]
    assert [e.id for e in await store.list(upstream="other")] == [other.id]
    assert [e.id for e in await store.list(upstream="mail", state="queued")] == [m.id for m in mail[3::-1]]
    assert [e.id for e in await store.list(state="dead")] == [mail[4].id]
    assert [e.id for e in await store.list(state="queued", limit=2)] == [mail[3].id, other.id]
    assert [e.id for e in await store.list(limit=3)] == [mail[4].id, mail[3].id, other.id]
    assert await store.list(upstream="nope") == []
    assert await store.list(state="sending") == []
    assert everything[0].body == mail[4].body and everything[0].headers == mail[4].headers


# -- a process that dies ----------------------------------------------------------------------------------


async def test_a_dead_process_has_its_entries_taken_back(backend: Backend) -> None:
    survivor = await backend.make()
    if not backend.cross or backend.kill is None:
        assert await survivor.recover(T0, lambda u: 60.0) == (0, 0)  # one process: nobody died
        return
    dying = await backend.make()
    entries = [make_entry(i) for i in range(4)]
    for e in entries:
        await survivor.add(e, max_entries=10)
    [a, b, c] = await dying.claim("mail", T0 + 10, 3)
    await dying.mark_sending(b.id, "mail")
    c.state, c.due = "doubt", T0 + 5
    await dying.finish(c)
    [probing] = await dying.due_probes("mail", T0 + 10, 5)
    [mine] = await survivor.claim("mail", T0 + 10, 5)
    assert await survivor.recover(T0 + 20, lambda u: 60.0) == (0, 0)  # everyone is alive
    await backend.kill(dying)
    assert await survivor.recover(T0 + 20, lambda u: 60.0) == (1, 1)
    back = await survivor.get(a.id)
    assert back is not None and (back.state, back.owner, back.due) == ("queued", "", T0 + 20)
    doubt = await survivor.get(b.id)
    assert doubt is not None and (doubt.state, doubt.owner, doubt.due) == ("doubt", "", T0 + 80)
    assert doubt.last_error == "the process sending it died" and doubt.sent_to == ["mail"]
    probe = await survivor.get(probing.id)
    assert probe is not None and (probe.state, probe.owner, probe.due) == ("doubt", "", T0 + 20)
    alive = await survivor.get(mine.id)
    assert alive is not None and alive.state == "claimed" and alive.owner == survivor.instance
    assert await survivor.recover(T0 + 21, lambda u: 60.0) == (0, 0)
    assert [x.id for x in await survivor.claim("mail", T0 + 20, 5)] == [a.id]
    assert [x.id for x in await survivor.due_probes("mail", T0 + 20, 5)] == [probing.id]


# == Redis only ===========================================================================================


@pytest.fixture
async def redis_pair(redis_server: RedisServer) -> AsyncIterator[Callable[..., Awaitable[RedisOutbox]]]:
    """RedisOutbox stores on one prefix, each on its own RedisState (one replica each)."""
    prefix = f"tob-{uuid.uuid4().hex[:8]}:"
    made: list[RedisState] = []

    async def make(clock: FakeClock | None = None, **kwargs: Any) -> RedisOutbox:
        state = RedisState(redis_server.url, prefix=prefix, clock=clock)
        made.append(state)
        await state.heartbeat()
        return RedisOutbox(state, **kwargs)

    yield make
    for state in made:
        await assert_consistent(state, prefix)
        await state.close()


async def test_a_replica_that_stops_beating_is_taken_over(
    redis_pair: Callable[..., Awaitable[RedisOutbox]],
) -> None:
    clock = FakeClock()  # the liveness clock (RedisState's): heartbeats and holds
    a = await redis_pair(clock)
    b = await redis_pair(clock)
    entries = [make_entry(i) for i in range(3)]
    for e in entries:
        await a.add(e, max_entries=10)
    [claimed, sending] = await a.claim("mail", T0 + 1, 2)
    await a.mark_sending(sending.id, "mail")
    clock.advance(9)  # a beat 9 s ago: alive
    await b.state.heartbeat()
    assert await b.recover(T0 + 2, lambda u: 30.0) == (0, 0)
    clock.advance(2)  # 11 s > OWNER_DEAD_AFTER
    await b.state.heartbeat()
    assert await b.recover(T0 + 3, lambda u: 30.0) == (1, 1)
    got = await b.get(claimed.id)
    assert got is not None and (got.state, got.owner, got.due) == ("queued", "", T0 + 3)
    doubt = await b.get(sending.id)
    assert doubt is not None and (doubt.state, doubt.due, doubt.sent_to) == ("doubt", T0 + 33, ["mail"])
    # Replica a comes back (it was only cut off): it sends nothing it no longer holds...
    await a.state.heartbeat()
    with pytest.raises(EntryNotHeld):
        await a.mark_sending(claimed.id, "mail")
    # ... and writes nothing over what b decided.
    sending.state = "delivered"
    await a.finish(sending)
    assert await state_of(b, sending.id) == "doubt"
    assert {x.id for x in await b.claim("mail", T0 + 3, 5)} == {claimed.id, entries[2].id}


async def test_a_replica_missing_from_the_heartbeats_is_dead_once_its_hold_is_old(
    redis_pair: Callable[..., Awaitable[RedisOutbox]],
) -> None:
    clock = FakeClock()
    a = await redis_pair(clock)
    b = await redis_pair(clock)
    e = make_entry(1)
    await a.add(e, max_entries=10)
    await a.claim("mail", T0 + 10, 1)
    await a.client.zrem(f"{a.prefix}replicas", a.instance)  # its heartbeat is gone
    assert await b.recover(T0, lambda u: 30.0) == (0, 0)  # held just now: maybe not announced yet
    clock.advance(11)
    await b.state.heartbeat()
    assert await b.recover(T0, lambda u: 30.0) == (1, 0)


async def test_a_replica_that_does_not_beat_judges_nobody(
    redis_pair: Callable[..., Awaitable[RedisOutbox]], redis_server: RedisServer
) -> None:
    a = await redis_pair()
    e = make_entry(1)
    await a.add(e, max_entries=10)
    await a.claim("mail", T0 + 10, 1)
    await age_heartbeat(a)
    bare = RedisState(redis_server.url, prefix=a.prefix)  # never beats (like RedisState._owner_dead)
    try:
        assert await RedisOutbox(bare).recover(T0, lambda u: 30.0) == (0, 0)
    finally:
        await bare.close()
    assert await state_of(a, e.id) == "claimed"


async def test_an_orphan_of_a_lost_claim_answer_is_requeued(
    redis_pair: Callable[..., Awaitable[RedisOutbox]],
) -> None:
    clock = FakeClock()
    a = await redis_pair(clock)
    entries = [make_entry(i) for i in range(2)]
    for e in entries:
        await a.add(e, max_entries=10)
    [known] = await a.claim("mail", T0 + 10, 1)
    # The same claim again, whose answer never reached the worker (a timeout, a reset).
    await a._script("claim", "mail", T0 + 10, 1, a.instance)
    assert await a.recover(T0, lambda u: 30.0) == (0, 0)
    clock.advance(31)  # ORPHAN_AFTER
    await a.state.heartbeat()
    assert await a.recover(T0 + 1, lambda u: 30.0) == (1, 0)
    assert await state_of(a, entries[1].id) == "queued"
    assert await state_of(a, known.id) == "claimed"  # its worker has it


async def test_a_finish_that_failed_is_written_by_the_next_recover(
    redis_pair: Callable[..., Awaitable[RedisOutbox]], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await redis_pair()
    e = make_entry(1)
    await a.add(e, max_entries=10)
    [h] = await a.claim("mail", T0 + 10, 1)
    h.state, h.provider_id = "delivered", "sg-1"
    real = a._finish

    async def down(entry: Entry) -> bool:
        raise ConnectionError("Redis went away")

    monkeypatch.setattr(a, "_finish", down)
    with pytest.raises(OutboxUnavailable):
        await a.finish(h)
    monkeypatch.setattr(a, "_finish", real)
    assert await state_of(a, e.id) == "claimed"
    await a.recover(T0, lambda u: 30.0)
    assert await state_of(a, e.id) == "delivered"


async def test_the_redis_keys_of_an_upstream_share_one_slot(redis_cluster: Any) -> None:
    from redis.crc import key_slot

    state = RedisState(redis_cluster.url, prefix=f"tob-{uuid.uuid4().hex[:6]}:")
    try:
        await state.heartbeat()
        store = RedisOutbox(state)
        for up in ("mail", "mailgun-eu", "sendgrid"):
            e = make_entry(1, upstream=up)
            await store.add(e, max_entries=10)
            [h] = await store.claim(up, T0 + 10, 1)
            h.state = "delivered"
            await store.finish(h)
        slots: dict[str, set[int]] = {}
        async for key in state.client.scan_iter(match=f"{state.prefix}outbox:{{*", count=1000):
            up = key.decode().split("{", 1)[1].split("}", 1)[0]
            slots.setdefault(up, set()).add(key_slot(key))
        assert set(slots) == {"mail", "mailgun-eu", "sendgrid"}
        assert all(len(s) == 1 for s in slots.values()), slots
        assert len({next(iter(s)) for s in slots.values()}) > 1  # spread over the cluster
    finally:
        await state.close()


@pytest.fixture
def own_redis() -> Any:
    """A redis-server of this test alone (it is stopped and frozen)."""
    require_redis()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


async def test_redis_away_refuses_and_stores_nothing(own_redis: RedisServer) -> None:
    prefix = f"tob-{uuid.uuid4().hex[:6]}:"
    state = RedisState(own_redis.url, prefix=prefix, socket_timeout=0.3)
    try:
        await state.heartbeat()
        store = RedisOutbox(state, timeout=0.5)
        kept = make_entry(1)
        await store.add(kept, max_entries=10)
        own_redis.suspend()  # SIGSTOP: what the store sends is read when it thaws
        try:
            refused = make_entry(2)
            started = time.monotonic()
            with pytest.raises(OutboxUnavailable):
                await store.add(refused, max_entries=10)
            assert time.monotonic() - started < 3.0
            for op in (
                store.claim("mail", T0 + 10, 10),
                store.get(kept.id),
                store.list(),
                store.stats(T0),
                store.expire(T0),
                store.recover(T0, lambda u: 1.0),
                store.retry(kept.id, T0, 10),
                store.drop(kept.id),
            ):
                with pytest.raises(OutboxUnavailable):
                    await op
        finally:
            own_redis.resume()
        # The add may have run when Redis thawed (it had read it); the app got 503, so the
        # next operation settles it away (any operation settles what is left first).
        await asyncio.sleep(0.2)
        assert store._to_void == {refused.id: "mail"}
        assert await store.get(refused.id) is None
        assert store._to_void == {}
        assert [e.id for e in await store.list()] == [kept.id]
        await assert_consistent(state, prefix)
        stats = await store.stats(T0)
        assert stats["mail"].pending == 1
        # The refused send can never come back (a copy of the add arriving late is refused).
        with pytest.raises(OutboxUnavailable):
            await store.add(refused, max_entries=10)
        assert await store.get(refused.id) is None
    finally:
        await state.close()


async def test_redis_killed_refuses_at_once(own_redis: RedisServer) -> None:
    state = RedisState(own_redis.url, prefix=f"tob-{uuid.uuid4().hex[:6]}:", socket_timeout=0.3)
    try:
        await state.heartbeat()
        store = RedisOutbox(state, timeout=1.0)
        own_redis.kill()
        started = time.monotonic()
        with pytest.raises(OutboxUnavailable):
            await store.add(make_entry(1), max_entries=10)
        with pytest.raises(OutboxUnavailable):
            await store.claim("mail", T0 + 10, 1)
        assert time.monotonic() - started < 3.0
    finally:
        await state.close()


async def test_an_add_that_ran_without_an_answer_is_kept(
    redis_pair: Callable[..., Awaitable[RedisOutbox]], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await redis_pair()
    e = make_entry(1)
    real = a._script

    async def lost_answer(name: str, *args: Any) -> Any:
        result = await real(name, *args)
        if name == "add":
            raise TimeoutError("the answer was lost")
        return result

    monkeypatch.setattr(a, "_script", lost_answer)
    await a.add(e, max_entries=10)  # stored: the send is kept, "accepted" is true
    monkeypatch.setattr(a, "_script", real)
    assert await state_of(a, e.id) == "queued"


async def test_an_unreadable_entry_is_moved_aside(redis_pair: Callable[..., Awaitable[RedisOutbox]]) -> None:
    a = await redis_pair()
    bad, good = make_entry(1), make_entry(2)
    for e in (bad, good):
        await a.add(e, max_entries=10)
    await a.client.hset(f"{a.prefix}outbox:{{mail}}:e:{bad.id}", "headers", "not json")
    assert [x.id for x in await a.claim("mail", T0 + 10, 10)] == [good.id]
    assert a.moved_aside == 1
    assert await a.get(bad.id) is None
    assert (await a.client.hget(f"{a.prefix}outbox:{{mail}}:e:{bad.id}", "state")) == b"corrupt"
    assert (await a.stats(T0))["mail"].pending == 1


async def test_pending_entries_carry_no_ttl_and_delivered_ones_do(
    redis_pair: Callable[..., Awaitable[RedisOutbox]],
) -> None:
    a = await redis_pair()
    e, d = make_entry(1), make_entry(2)
    for x in (e, d):
        await a.add(x, max_entries=10)
    held = {x.id: x for x in await a.claim("mail", T0 + 10, 10)}
    held[d.id].state = "delivered"
    await a.finish(held[d.id])
    base = f"{a.prefix}outbox:{{mail}}:"
    assert await a.client.pttl(base + "e:" + e.id) == -1  # never evicted by volatile-lru, never lost
    ttl = await a.client.pttl(base + "e:" + d.id)
    assert KEEP_DELIVERED * 1000 < ttl <= (KEEP_DELIVERED + 86400) * 1000
    assert await a.client.hget(base + "e:" + d.id, "body") == b""


def test_pending_states_are_the_ones_the_scripts_count() -> None:
    from proxy.outbox import redis_store

    assert "local PENDING = {" + ", ".join(f"'{s}'" for s in PENDING) + "}" in redis_store.ADD
    assert "local STATES = {" + ", ".join(f"'{s}'" for s in STATES) + "}" in redis_store.ADD
