"""Backend-parameterised suite for idempotency records, the routing ledger, cache and kv.

Tests go only through the `StateBackend` protocol (proxy/state/base.py documents the
rules), and run against every backend in `state_backend_factory`: memory, sqlite (the data
dir), redis and redis-cluster.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.clock import Clock, FakeClock
from proxy.state.base import StateBackend, StoredResponse
from proxy.state.memory import MemoryState

BackendFactory = Callable[[Clock], StateBackend]
# `state_backend_factory` (memory, redis, redis-cluster) lives in tests/conftest.py.


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(auto=False)


@pytest.fixture
def backend(state_backend_factory: BackendFactory, clock: FakeClock) -> StateBackend:
    return state_backend_factory(clock)


def answer(body: bytes = b'{"id":"ch_1"}', status: int = 200) -> StoredResponse:
    return StoredResponse(
        status=status,
        headers=(("Content-Type", "application/json"), ("X-Thing", "a"), ("X-Thing", "b")),
        body=body,
        stored_at=1_800_000_000.0,
    )


# -- idempotency ledger -------------------------------------------------------------------


async def test_claim_new_then_in_flight(backend: StateBackend) -> None:
    first = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    second = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    assert first.state == "new"
    assert second.state == "in_flight"
    assert second.response is None


async def test_claim_different_fingerprint_is_mismatch(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp-a", ttl=60, lock_ttl=10)
    assert (await backend.idem_claim("s|k1", "fp-b", ttl=60, lock_ttl=10)).state == "mismatch"
    await backend.idem_complete("s|k1", answer(), ttl=60)
    assert (await backend.idem_claim("s|k1", "fp-b", ttl=60, lock_ttl=10)).state == "mismatch"


async def test_complete_then_claim_returns_stored_answer(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    await backend.idem_complete("s|k1", answer(), ttl=60)
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    assert claim.state == "completed"
    assert claim.response == answer()


async def test_completed_record_expires_after_ttl(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    await backend.idem_complete("s|k1", answer(), ttl=60)
    clock.advance(59)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "completed"
    clock.advance(2)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "new"


async def test_in_flight_lock_lapse_makes_the_record_in_doubt(backend: StateBackend, clock: FakeClock) -> None:
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
    clock.advance(9)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
    clock.advance(2)
    # the owner's lock lapsed without an outcome: the upstream may or may not have acted
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")).state == "in_doubt"
    # the owner itself comes too late: the record is in doubt for it as well
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "in_doubt"


async def test_in_doubt_lasts_until_the_record_lifetime_ends(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    clock.advance(58)  # 69 s: lock (10) + ttl (60) not over yet
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    clock.advance(2)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "new"


async def test_in_doubt_with_another_fingerprint_is_mismatch(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    assert (await backend.idem_claim("s|k1", "other", ttl=60, lock_ttl=10, owner="b")).state == "mismatch"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    claim = await backend.idem_claim("s|k1", "other", ttl=60, lock_ttl=10, owner="b", dedupes=True)
    assert claim.state == "mismatch"


async def test_dedupes_takes_over_a_lapsed_claim(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    # within the owner's lock, dedupes changes nothing
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b", dedupes=True)
    assert claim.state == "in_flight"
    clock.advance(11)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b", dedupes=True)).state == "new"
    # b owns it now: a new in-flight record with its own lock
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")).state == "in_flight"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "new"
    await backend.idem_complete("s|k1", answer(), ttl=60, fingerprint="fp", owner="b")
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")
    assert claim.state == "completed" and claim.response == answer()


async def test_dedupes_takes_over_a_record_already_in_doubt(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c", dedupes=True)).state == "new"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="d")).state == "in_flight"
    # the new owner's release frees it (nothing is in doubt any more)
    await backend.idem_release("s|k1", "c")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="d")).state == "new"


async def test_claims_are_idempotent_per_owner(backend: StateBackend) -> None:
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
    # no owner never matches another claim
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "in_flight"
    # the owner with another fingerprint is still a mismatch
    assert (await backend.idem_claim("s|k1", "fp2", ttl=60, lock_ttl=10, owner="a")).state == "mismatch"


async def test_owner_claiming_again_renews_its_lock(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(8)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
    clock.advance(8)  # 16 s after the first claim, 8 after the second
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
    clock.advance(3)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"


async def test_owner_claiming_again_after_its_lock_lapsed_keeps_it(backend: StateBackend, clock: FakeClock) -> None:
    # nobody else looked in between: the record is still the owner's in-flight claim
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"


async def test_release_frees_in_flight_but_not_completed(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    await backend.idem_release("s|k1")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "new"
    await backend.idem_complete("s|k1", answer(), ttl=60)
    await backend.idem_release("s|k1")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "completed"


async def test_complete_without_claim_stores_nothing(backend: StateBackend) -> None:
    await backend.idem_complete("s|k1", answer(), ttl=60)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)).state == "new"


async def test_complete_after_the_record_vanished_stores_it_under_the_fingerprint(backend: StateBackend) -> None:
    # the record is gone (evicted, a store emptied): the answer is still kept
    await backend.idem_complete("s|k1", answer(), ttl=60, fingerprint="fp", owner="a")
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")
    assert claim.state == "completed" and claim.response == answer()
    assert (await backend.idem_claim("s|k1", "other", ttl=60, lock_ttl=10, owner="b")).state == "mismatch"


async def test_complete_after_lock_lapse_and_expiry(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(71)  # the whole record expired
    await backend.idem_complete("s|k1", answer(), ttl=60, fingerprint="fp", owner="a")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "completed"
    clock.advance(61)
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "new"


async def test_first_completion_wins(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    await backend.idem_complete("s|k1", answer(b"first"), ttl=60, fingerprint="fp", owner="a")
    await backend.idem_complete("s|k1", answer(b"second"), ttl=60, fingerprint="fp", owner="b")
    await backend.idem_complete("s|k1", answer(b"third"), ttl=60)
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")
    assert claim.state == "completed" and claim.response == answer(b"first")


async def test_complete_of_any_owners_in_flight_or_in_doubt_record(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    await backend.idem_complete("s|k1", answer(b"by-b"), ttl=60, owner="b")  # another owner's completion
    claim = await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")
    assert claim.state == "completed" and claim.response == answer(b"by-b")

    await backend.idem_claim("s|k2", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    assert (await backend.idem_claim("s|k2", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    await backend.idem_complete("s|k2", answer(b"late"), ttl=60, fingerprint="fp", owner="a")
    claim = await backend.idem_claim("s|k2", "fp", ttl=60, lock_ttl=10, owner="b")
    assert claim.state == "completed" and claim.response == answer(b"late")


async def test_complete_never_answers_another_fingerprint(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    await backend.idem_complete("s|k1", answer(), ttl=60, fingerprint="other", owner="x")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"


async def test_release_only_by_its_owner(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    await backend.idem_release("s|k1", "b")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
    await backend.idem_release("s|k1", "a")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "new"
    # "" matches any owner whose lock still runs
    await backend.idem_release("s|k1")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="c")).state == "new"


async def test_release_leaves_in_doubt_and_lapsed_records(backend: StateBackend, clock: FakeClock) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="a")
    clock.advance(11)
    await backend.idem_release("s|k1")  # a lapsed claim of an unknown owner stays
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    await backend.idem_release("s|k1", "a")  # in doubt now: not an in-flight record any more
    await backend.idem_release("s|k1")
    assert (await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"


async def test_release_of_unknown_key_is_harmless(backend: StateBackend) -> None:
    await backend.idem_release("s|nothing")


async def test_keys_are_independent(backend: StateBackend) -> None:
    await backend.idem_claim("s|k1", "fp", ttl=60, lock_ttl=10)
    assert (await backend.idem_claim("s|k2", "fp", ttl=60, lock_ttl=10)).state == "new"


# -- the failover routing ledger -------------------------------------------------------


async def test_ledger_roundtrip_overwrite_and_expiry(backend: StateBackend, clock: FakeClock) -> None:
    assert await backend.ledger_get("stripe:ledger|pi_1") is None
    await backend.ledger_set("stripe:ledger|pi_1", b'{"owner":"paypal"}', ttl=30)
    assert await backend.ledger_get("stripe:ledger|pi_1") == b'{"owner":"paypal"}'
    await backend.ledger_set("stripe:ledger|pi_1", b'{"owner":"stripe"}', ttl=30)
    assert await backend.ledger_get("stripe:ledger|pi_1") == b'{"owner":"stripe"}'
    clock.advance(29.9)
    assert await backend.ledger_get("stripe:ledger|pi_1") is not None
    clock.advance(0.2)
    assert await backend.ledger_get("stripe:ledger|pi_1") is None


async def test_ledger_binary_values_and_separate_from_kv(backend: StateBackend) -> None:
    value = bytes(range(256))
    await backend.ledger_set("same", value, ttl=30)
    await backend.kv_set("same", b"kv", ttl=30)
    assert await backend.ledger_get("same") == value
    assert await backend.kv_get("same") == b"kv"
    await backend.ledger_set("gone", b"x", ttl=0)
    assert await backend.ledger_get("gone") is None


# -- cache --------------------------------------------------------------------------------


async def test_cache_roundtrip_and_expiry(backend: StateBackend, clock: FakeClock) -> None:
    assert await backend.cache_get("c|a") is None
    await backend.cache_set("c|a", answer(b"x"), ttl=30)
    got = await backend.cache_get("c|a")
    assert got == answer(b"x")
    assert got is not None and got.headers[1:] == (("X-Thing", "a"), ("X-Thing", "b"))
    clock.advance(29.9)
    assert await backend.cache_get("c|a") is not None
    clock.advance(0.2)
    assert await backend.cache_get("c|a") is None


async def test_cache_set_overwrites(backend: StateBackend) -> None:
    await backend.cache_set("c|a", answer(b"1"), ttl=30)
    await backend.cache_set("c|a", answer(b"2"), ttl=30)
    got = await backend.cache_get("c|a")
    assert got is not None and got.body == b"2"


async def test_cache_binary_body(backend: StateBackend) -> None:
    body = bytes(range(256)) * 4
    await backend.cache_set("c|bin", answer(body), ttl=30)
    got = await backend.cache_get("c|bin")
    assert got is not None and got.body == body


# -- kv -----------------------------------------------------------------------------------


async def test_kv_roundtrip_and_expiry(backend: StateBackend, clock: FakeClock) -> None:
    assert await backend.kv_get("kv1") is None
    await backend.kv_set("kv1", b"value", ttl=5)
    assert await backend.kv_get("kv1") == b"value"
    await backend.kv_set("kv1", b"other", ttl=5)
    assert await backend.kv_get("kv1") == b"other"
    clock.advance(5.1)
    assert await backend.kv_get("kv1") is None


# -- memory-only bounds -------------------------------------------------------------------


async def test_memory_max_records_evicts_least_recent(clock: FakeClock) -> None:
    state = MemoryState(clock, max_records=3)
    for i in range(5):
        await state.cache_set(f"c|{i}", answer(), ttl=60)
    assert await state.cache_get("c|0") is None
    assert await state.cache_get("c|4") is not None
    # an evicted (completed) idempotency record means the repeat is new again
    for i in range(4):
        await state.idem_claim(f"i|{i}", "fp", ttl=60, lock_ttl=10)
        await state.idem_complete(f"i|{i}", answer(), ttl=60)
    assert (await state.idem_claim("i|0", "fp", ttl=60, lock_ttl=10)).state == "new"


async def test_memory_never_evicts_in_flight_claims(clock: FakeClock) -> None:
    state = MemoryState(clock, max_records=2)
    state.limit_scope("i", 2)
    await state.idem_claim("i|done", "fp", ttl=60, lock_ttl=10)
    await state.idem_complete("i|done", answer(), ttl=60)
    for i in range(4):  # four live claims: past both caps
        assert (await state.idem_claim(f"i|{i}", "fp", ttl=60, lock_ttl=10)).state == "new"
    # the completed record went first; no live claim was dropped (the cap is exceeded)
    assert (await state.idem_claim("i|done", "fp", ttl=60, lock_ttl=10)).state == "new"
    for i in range(4):
        assert (await state.idem_claim(f"i|{i}", "fp", ttl=60, lock_ttl=10)).state == "in_flight"
    # once they complete they are ordinary records again: back under the cap
    for i in range(4):
        await state.idem_complete(f"i|{i}", answer(), ttl=60)
    await state.idem_release("i|done")
    await state.idem_claim("i|new", "fp", ttl=60, lock_ttl=10)
    assert len(state._idem) == 2
    assert (await state.idem_claim("i|new", "fp", ttl=60, lock_ttl=10)).state == "in_flight"
    # a lapsed claim is not live any more: it may go
    clock.advance(11)
    await state.idem_claim("i|later", "fp", ttl=60, lock_ttl=10)
    await state.idem_claim("i|later2", "fp", ttl=60, lock_ttl=10)
    assert (await state.idem_claim("i|new", "fp", ttl=60, lock_ttl=10)).state == "new"


async def test_memory_scope_limit(clock: FakeClock) -> None:
    state = MemoryState(clock)
    state.limit_scope("up:cache:abc", 2)
    for i in range(4):
        await state.cache_set(f"up:cache:abc|{i}", answer(), ttl=60)
        await state.cache_set(f"other|{i}", answer(), ttl=60)
    assert await state.cache_get("up:cache:abc|0") is None
    assert await state.cache_get("up:cache:abc|1") is None
    assert await state.cache_get("up:cache:abc|3") is not None
    assert await state.cache_get("other|0") is not None  # unlimited scope
