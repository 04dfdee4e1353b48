"""StateBackend rate/pause/budget/circuit semantics, run against every backend.

Only the protocol of proxy/state/base.py is used here, so a new backend (redis) joins
by adding a parameter to `state_backend_factory`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from proxy.clock import Clock, FakeClock
from proxy.state.base import CircuitAdmission, CircuitSettings, StateBackend
from proxy.state.memory import MemoryState

BackendFactory = Callable[[Clock], StateBackend]
# `state_backend_factory` (memory, redis, redis-cluster) lives in tests/conftest.py.


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(auto=False)


@pytest.fixture
def backend(state_backend_factory: BackendFactory, clock: FakeClock) -> StateBackend:
    return state_backend_factory(clock)


CB = CircuitSettings(window=10.0, min_requests=4, failure_rate=0.5, open_for=5.0, half_open_requests=2)


# -- GCRA ---------------------------------------------------------------------------------


async def test_rate_burst_then_spacing(backend: StateBackend, clock: FakeClock) -> None:
    for _ in range(3):
        d = await backend.rate_take("k", interval=0.1, burst=3, max_wait=0)
        assert d.allowed and d.wait == 0
    d = await backend.rate_take("k", interval=0.1, burst=3, max_wait=0)
    assert not d.allowed
    assert d.wait == pytest.approx(0.1)
    clock.advance(0.1)
    d = await backend.rate_take("k", interval=0.1, burst=3, max_wait=0)
    assert d.allowed and d.wait == pytest.approx(0)


async def test_rate_reserves_with_wait_in_order(backend: StateBackend, clock: FakeClock) -> None:
    waits = []
    for _ in range(5):
        d = await backend.rate_take("k", interval=0.5, burst=1, max_wait=10)
        assert d.allowed
        waits.append(d.wait)
    assert waits == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])


async def test_rate_refusal_reserves_nothing(backend: StateBackend, clock: FakeClock) -> None:
    assert (await backend.rate_take("k", interval=1.0, burst=1, max_wait=0)).allowed
    for _ in range(3):
        d = await backend.rate_take("k", interval=1.0, burst=1, max_wait=0.5)
        assert not d.allowed and d.wait == pytest.approx(1.0)
    d = await backend.rate_take("k", interval=1.0, burst=1, max_wait=1.0)
    assert d.allowed and d.wait == pytest.approx(1.0)


async def test_rate_keys_are_independent(backend: StateBackend) -> None:
    assert (await backend.rate_take("a", interval=1.0, burst=1, max_wait=0)).allowed
    assert (await backend.rate_take("b", interval=1.0, burst=1, max_wait=0)).allowed
    assert not (await backend.rate_take("a", interval=1.0, burst=1, max_wait=0)).allowed


async def test_rate_idle_key_recovers_full_burst(backend: StateBackend, clock: FakeClock) -> None:
    for _ in range(4):
        await backend.rate_take("k", interval=1.0, burst=2, max_wait=100)
    clock.advance(100)
    assert (await backend.rate_take("k", interval=1.0, burst=2, max_wait=0)).allowed
    assert (await backend.rate_take("k", interval=1.0, burst=2, max_wait=0)).allowed
    assert not (await backend.rate_take("k", interval=1.0, burst=2, max_wait=0)).allowed


async def test_rate_long_run_is_exact(backend: StateBackend, clock: FakeClock) -> None:
    admitted = 0
    for _ in range(1000):  # 1000 ticks of 10 ms, 10 tries each, at 20/s
        for _ in range(10):
            if (await backend.rate_take("k", interval=0.05, burst=1, max_wait=0)).allowed:
                admitted += 1
        clock.advance(0.01)
    assert 199 <= admitted <= 201


# -- pauses -------------------------------------------------------------------------------


async def test_pause_counts_down_and_never_shortens(backend: StateBackend, clock: FakeClock) -> None:
    assert await backend.paused_for("k") == 0
    await backend.pause("k", 5)
    clock.advance(1)
    assert await backend.paused_for("k") == pytest.approx(4)
    await backend.pause("k", 1)  # shorter: ignored
    assert await backend.paused_for("k") == pytest.approx(4)
    await backend.pause("k", 10)
    assert await backend.paused_for("k") == pytest.approx(10)
    clock.advance(10)
    assert await backend.paused_for("k") == 0
    assert await backend.paused_for("other") == 0


# -- retry budget -------------------------------------------------------------------------


async def test_budget_ratio_and_floor(backend: StateBackend, clock: FakeClock) -> None:
    kw = {"window": 10.0, "ratio": 0.2, "min_per_second": 0.1}  # floor: 1 retry per window
    for _ in range(10):
        await backend.budget_record("b", window=10.0, retry=False)
    # 0.2 * 10 + 0.1 * 10 = 3 retries, each taken by the call that checks
    for _ in range(3):
        assert await backend.budget_try_retry("b", **kw)
    assert not await backend.budget_try_retry("b", **kw)
    assert not await backend.budget_try_retry("b", **kw)  # a refusal takes nothing


async def test_budget_floor_alone(backend: StateBackend, clock: FakeClock) -> None:
    kw = {"window": 10.0, "ratio": 0.2, "min_per_second": 0.1}
    assert await backend.budget_try_retry("fresh", **kw)  # the floor with no requests yet
    assert not await backend.budget_try_retry("fresh", **kw)


async def test_budget_try_retry_is_atomic_under_concurrency(backend: StateBackend, clock: FakeClock) -> None:
    kw = {"window": 10.0, "ratio": 0.5, "min_per_second": 0.0}
    for _ in range(10):
        await backend.budget_record("b", window=10.0, retry=False)
    taken = await asyncio.gather(*(backend.budget_try_retry("b", **kw) for _ in range(40)))
    assert sum(taken) == 5  # check-then-record in two steps lets all 40 through


async def test_budget_window_slides(backend: StateBackend, clock: FakeClock) -> None:
    kw = {"window": 10.0, "ratio": 0.5, "min_per_second": 0.0}
    for _ in range(2):
        await backend.budget_record("b", window=10.0, retry=False)
    await backend.budget_record("b", window=10.0, retry=True)
    assert not await backend.budget_try_retry("b", **kw)
    clock.advance(11)
    assert not await backend.budget_try_retry("b", **kw)  # no requests, no floor
    await backend.budget_record("b", window=10.0, retry=False)
    await backend.budget_record("b", window=10.0, retry=False)
    assert await backend.budget_try_retry("b", **kw)  # the old retry slid out
    assert not await backend.budget_try_retry("b", **kw)  # ... and this one counted


# -- circuit breaker ----------------------------------------------------------------------


async def _record(backend: StateBackend, *, failure: bool, trial: bool = False) -> tuple[str, str]:
    t = await backend.circuit_record("c", CB, failure=failure, trial=trial)
    return t.before, t.after


async def _open_circuit(backend: StateBackend) -> None:
    for failure in (True, False, True, False):
        await _record(backend, failure=failure)
    assert await backend.circuit_state("c", CB) == "open"


async def test_circuit_needs_min_requests(backend: StateBackend) -> None:
    for _ in range(3):
        assert await _record(backend, failure=True) == ("closed", "closed")
    assert await _record(backend, failure=True) == ("closed", "open")


async def test_circuit_opens_at_failure_rate(backend: StateBackend) -> None:
    for failure in (False, False, False, True, False, True):
        assert await _record(backend, failure=failure) == ("closed", "closed")  # 2/6 < 0.5
    assert await _record(backend, failure=True) == ("closed", "closed")  # 3/7
    assert await _record(backend, failure=True) == ("closed", "open")  # 4/8


async def test_circuit_open_refuses_until_open_for(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    a = await backend.circuit_admit("c", CB)
    assert not a.allowed and a.state == "open" and a.retry_after == pytest.approx(5)
    clock.advance(3)
    a = await backend.circuit_admit("c", CB)
    assert not a.allowed and a.retry_after == pytest.approx(2)
    clock.advance(2)
    assert await backend.circuit_state("c", CB) == "half_open"


async def test_circuit_half_open_admits_exactly_trials(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    clock.advance(5)
    admissions = [await backend.circuit_admit("c", CB) for _ in range(4)]
    assert [(a.allowed, a.trial, a.state) for a in admissions] == [
        (True, True, "half_open"),
        (True, True, "half_open"),
        (False, False, "half_open"),
        (False, False, "half_open"),
    ]
    assert admissions[2].retry_after > 0
    assert await _record(backend, failure=False, trial=True) == ("half_open", "half_open")
    assert not (await backend.circuit_admit("c", CB)).allowed  # one trial still out
    assert await _record(backend, failure=False, trial=True) == ("half_open", "closed")
    assert await backend.circuit_state("c", CB) == "closed"
    # a fresh window: three failures after closing do not reopen (min_requests 4)
    for _ in range(3):
        assert await _record(backend, failure=True) == ("closed", "closed")


async def test_circuit_trial_failure_reopens(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    clock.advance(5)
    assert (await backend.circuit_admit("c", CB)).trial
    assert (await backend.circuit_admit("c", CB)).trial
    assert await _record(backend, failure=True, trial=True) == ("half_open", "open")
    # the other trial's late verdict changes nothing
    assert await _record(backend, failure=False, trial=True) == ("open", "open")
    a = await backend.circuit_admit("c", CB)
    assert not a.allowed and a.retry_after == pytest.approx(5)


async def test_circuit_release_gives_back_a_trial_slot(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    clock.advance(5)
    assert (await backend.circuit_admit("c", CB)).trial
    assert (await backend.circuit_admit("c", CB)).trial
    assert not (await backend.circuit_admit("c", CB)).allowed
    await backend.circuit_release("c", CB)
    again = await backend.circuit_admit("c", CB)
    assert again.allowed and again.trial


async def test_circuit_lost_trials_are_handed_out_again(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    clock.advance(5)
    await backend.circuit_admit("c", CB)
    await backend.circuit_admit("c", CB)
    clock.advance(5)  # no verdict for open_for: those trial callers are gone
    assert (await backend.circuit_admit("c", CB)).trial


async def test_circuit_ignores_stale_results_while_open(backend: StateBackend) -> None:
    await _open_circuit(backend)
    assert await _record(backend, failure=False) == ("open", "open")
    assert await backend.circuit_state("c", CB) == "open"


async def test_circuit_window_slides(backend: StateBackend, clock: FakeClock) -> None:
    for _ in range(3):
        await _record(backend, failure=True)
    clock.advance(11)  # those failures slid out of the 10 s window
    for failure in (True, False, False):
        await _record(backend, failure=failure)
    assert await _record(backend, failure=False) == ("closed", "closed")  # 1/4


async def test_concurrent_half_open_admissions(backend: StateBackend, clock: FakeClock) -> None:
    await _open_circuit(backend)
    clock.advance(5)
    results = await asyncio.gather(*(backend.circuit_admit("c", CB) for _ in range(20)))
    assert sum(a.allowed for a in results) == CB.half_open_requests


# -- memory backend: bounded -------------------------------------------------------------


async def test_memory_drops_idle_records(clock: FakeClock) -> None:
    state = MemoryState(clock)
    for i in range(100):
        await state.rate_take(f"k{i}", interval=1.0, burst=1, max_wait=0)
        await state.pause(f"k{i}", 1)
        await state.budget_record(f"k{i}", window=5.0, retry=False)
        await state.circuit_record(f"k{i}", CB, failure=False, trial=False)
    assert state.limits_size() == 400
    clock.advance(120)
    await state.rate_take("fresh", interval=1.0, burst=1, max_wait=0)  # triggers the sweep
    assert state.limits_size() == 1


# -- the synchronous face of the memory backend --------------------------------------------


def test_memory_sync_limits_only_when_async_operations_are_its_own(clock: FakeClock) -> None:
    state = MemoryState(clock)
    assert state.sync_limits is state

    class Yielding(MemoryState):
        async def circuit_admit(self, key: str, settings: CircuitSettings) -> CircuitAdmission:
            await asyncio.sleep(0)
            return await super().circuit_admit(key, settings)

    assert Yielding(clock).sync_limits is None  # the stages must await the override


async def test_memory_sync_operations_match_the_async_ones(clock: FakeClock) -> None:
    """The same script through `*_now` and through the protocol leaves the same answers."""
    a, b = MemoryState(clock), MemoryState(clock)
    sync = a.sync_limits
    assert sync is not None
    answers: list[tuple[object, object]] = []
    for step in range(200):
        failure = step % 3 == 0
        answers.append(
            (sync.rate_take_now("r", 0.1, 3, 0.25), await b.rate_take("r", interval=0.1, burst=3, max_wait=0.25))
        )
        answers.append((sync.paused_for_now("r"), await b.paused_for("r")))
        adm_a, adm_b = sync.circuit_admit_now("c", CB), await b.circuit_admit("c", CB)
        answers.append((adm_a, adm_b))
        if adm_a.allowed:
            if step % 7 == 0 and adm_a.trial:
                sync.circuit_release_now("c", CB)
                await b.circuit_release("c", CB)
            else:
                answers.append(
                    (
                        sync.circuit_record_now("c", CB, failure, adm_a.trial),
                        await b.circuit_record("c", CB, failure=failure, trial=adm_b.trial),
                    )
                )
        sync.budget_record_now("b", 10.0, False)
        await b.budget_record("b", window=10.0, retry=False)
        answers.append(
            (
                sync.budget_try_retry_now("b", 10.0, 0.2, 0.0),
                await b.budget_try_retry("b", window=10.0, ratio=0.2, min_per_second=0.0),
            )
        )
        if step == 50:
            await a.pause("r", 2.0)
            await b.pause("r", 2.0)
        clock.advance(0.37)
    assert all(x == y for x, y in answers), [p for p in answers if p[0] != p[1]][:3]
    assert {type(x).__name__ for x, _ in answers} >= {"RateDecision", "CircuitAdmission", "CircuitTransition"}


async def test_rate_take_free_now_is_pause_check_then_take_without_wait(clock: FakeClock) -> None:
    """The guard's one-step fast path equals `paused_for` and `rate_take(max_wait=0)`, and
    a refusal changes nothing (the next caller's slot is where it was)."""
    a, b = MemoryState(clock), MemoryState(clock)
    sync = a.sync_limits
    assert sync is not None
    answers: list[tuple[bool, bool]] = []
    for step in range(300):
        if step in (40, 41, 200):
            sync.pause_now("r", 0.5)
            await b.pause("r", 0.5)
        free = (await b.paused_for("r")) <= 0 and (await b.rate_take("r", interval=0.1, burst=3, max_wait=0.0)).allowed
        answers.append((sync.rate_take_free_now("r", 0.1, 3), free))
        clock.advance(0.03 if step % 5 else 0.2)
    assert all(x == y for x, y in answers)
    assert {x for x, _ in answers} == {True, False}
    assert a._tat == b._tat


async def test_window_running_totals_equal_the_bucket_sums(clock: FakeClock) -> None:
    from proxy.state.memory_limits import _Window

    w = _Window(1.0)
    for step in range(500):
        w.add(clock.now(), 1, step % 2)
        clock.advance(0.13 * (step % 5))
        total, failures = w.totals(clock.now())
        assert total == sum(c[0] for c in w.buckets.values())
        assert failures == sum(c[1] for c in w.buckets.values())
    clock.advance(100)
    assert w.totals(clock.now()) == (0, 0) and w.empty(clock.now())


def test_bucket_span_is_exactly_the_times_that_floor_to_the_index() -> None:
    """The window's cached bucket covers the times `floor(t / width)` files under it, not
    `[i * width, (i + 1) * width)`, which can be an ulp off (1.7 / 0.1 floors to 17, yet
    1.7 < 17 * 0.1)."""
    import math
    import random

    from proxy.state.memory_limits import _bucket_span

    rng = random.Random(7)
    for width in (0.1, 0.3, 1.0, 0.7, 6.0, 1 / 3):
        times = [1.7, 4.3, 2.65, *(rng.uniform(0, 5000) for _ in range(2000))]
        times += [k * width for k in range(1, 400)]  # the edges themselves
        for t in times:
            index = math.floor(t / width)
            lo, hi = _bucket_span(index, width)
            assert lo <= t < hi
            assert math.floor(lo / width) == index and math.floor(math.nextafter(lo, -math.inf) / width) < index
            assert math.floor(math.nextafter(hi, -math.inf) / width) == index and math.floor(hi / width) > index


def test_a_result_at_a_bucket_edge_is_filed_where_floor_puts_it() -> None:
    """1.6 then 1.7 with buckets of 0.1 s: the 1.7 failure belongs to bucket 17 and is still
    in the window at 2.65 (buckets 17..26), so two failures of two calls open the circuit."""
    clock = FakeClock(start=1.6, auto=False)
    state = MemoryState(clock)
    settings = CircuitSettings(window=1.0, min_requests=2, failure_rate=1.0, open_for=5.0, half_open_requests=1)
    state.circuit_record_now("k", settings, False, False)
    clock._now = 1.7  # exactly (1.6 + 0.1 is 1.7000000000000002)
    state.circuit_record_now("k", settings, True, False)
    clock._now = 2.65
    assert state.circuit_record_now("k", settings, True, False).after == "open"
