"""The circuit-breaker stage: what counts, failing fast, half-open trials, recovery."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import CircuitChanged, Event, EventBus
from proxy.model import Call, Response
from proxy.stages.circuit import CircuitBreaker, build
from proxy.state.memory import MemoryState
from tests.calls import AsyncOnlyState, make_call
from tests.stagekit import looped, stage_context

CB = {"window": "10s", "min_requests": 4, "failure_rate": 0.5, "open_for": "5s", "half_open_requests": 2}


def make_stage(
    cb: dict[str, Any] | None = None, *, clock: FakeClock | None = None, state: MemoryState | None = None
) -> tuple[CircuitBreaker, list[Event], FakeClock]:
    clock = clock or FakeClock(auto=False)
    policy = Policy.model_validate({"upstream": "up", "target": "http://127.0.0.1:9", "circuit_breaker": cb or CB})
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    ctx = stage_context(policy, clock, events=bus, state=state)
    return looped(build(ctx)), events, clock


class Upstream:
    def __init__(self, result: int | ProxyError = 200) -> None:
        self.result = result
        self.calls = 0

    async def __call__(self, call: Call) -> Response:
        self.calls += 1
        if isinstance(self.result, ProxyError):
            raise self.result
        return Response(self.result, CIMultiDict())


async def send(stage: CircuitBreaker, clock: FakeClock, up: Upstream) -> int | str:
    """Status, or the ProxyError code."""
    try:
        return (await stage(make_call(clock), up)).status
    except ProxyError as exc:
        return exc.code


def changes(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.previous, e.state) for e in events if isinstance(e, CircuitChanged)]


async def open_it(stage: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(4):
        await send(stage, clock, Upstream(503))
    assert (await stage.snapshot())["state"] == "open"


async def test_opens_at_failure_rate_after_min_requests() -> None:
    stage, events, clock = make_stage()
    for status in (200, 503, 200):
        await send(stage, clock, Upstream(status))
    assert (await stage.snapshot())["state"] == "closed"  # 1/3, and under min_requests
    await send(stage, clock, Upstream(500))  # 2/4 = 0.5
    assert (await stage.snapshot())["state"] == "open"
    assert changes(events) == [("closed", "open")]


async def test_logs_transitions_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    stage, _events, clock = make_stage()
    with caplog.at_level(logging.WARNING, logger="egressd.circuit"):
        await open_it(stage, clock)
    assert any("closed -> open" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


async def test_errors_count_as_failures() -> None:
    stage, _events, clock = make_stage()
    await send(stage, clock, Upstream(ProxyError("upstream_unreachable", "refused", detail="connect_error")))
    await send(stage, clock, Upstream(ProxyError("upstream_timeout", "slow", detail="timeout")))
    await send(stage, clock, Upstream(200))
    await send(stage, clock, Upstream(ProxyError("upstream_unreachable", "reset", detail="reset")))
    assert (await stage.snapshot())["state"] == "open"


async def test_4xx_and_429_do_not_open() -> None:
    stage, _events, clock = make_stage()
    for status in (400, 404, 429, 429, 422, 429, 401, 409):
        assert await send(stage, clock, Upstream(status)) == status
    assert (await stage.snapshot())["state"] == "closed"
    await send(stage, clock, Upstream(503))
    assert (await stage.snapshot())["state"] == "closed"  # 1/9: the 4xx counted as successes


async def test_local_rate_limit_is_not_counted() -> None:
    stage, _events, clock = make_stage()
    for _ in range(10):
        await send(stage, clock, Upstream(ProxyError("rate_limited", "slow down", retry_after=1)))
    for _ in range(3):
        await send(stage, clock, Upstream(503))
    assert (await stage.snapshot())["state"] == "closed"  # 3 seen < min_requests 4


async def test_open_fails_fast_without_calling_inner() -> None:
    stage, _events, clock = make_stage()
    await open_it(stage, clock)
    clock.advance(2)
    up = Upstream(200)
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), up)
    assert info.value.code == "circuit_open" and info.value.status == 503
    assert info.value.retry_after == pytest.approx(3.0)
    assert up.calls == 0


async def test_half_open_admits_exactly_the_trials_then_closes() -> None:
    stage, events, clock = make_stage()
    await open_it(stage, clock)
    clock.advance(5)
    gate = asyncio.Event()

    class Slow(Upstream):
        async def __call__(self, call: Call) -> Response:
            self.calls += 1
            await gate.wait()
            return Response(200, CIMultiDict())

    slow = Slow()
    trials = [asyncio.create_task(send(stage, clock, slow)) for _ in range(2)]
    await asyncio.sleep(0)
    extra = Upstream(200)
    results = [await send(stage, clock, extra) for _ in range(3)]
    assert results == ["circuit_open"] * 3 and extra.calls == 0
    assert slow.calls == 2
    gate.set()
    assert await asyncio.gather(*trials) == [200, 200]
    assert (await stage.snapshot())["state"] == "closed"
    assert changes(events) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert await send(stage, clock, extra) == 200


async def test_trial_failure_reopens() -> None:
    stage, events, clock = make_stage()
    await open_it(stage, clock)
    clock.advance(5)
    assert await send(stage, clock, Upstream(200)) == 200
    assert await send(stage, clock, Upstream(502)) == 502
    assert (await stage.snapshot())["state"] == "open"
    assert changes(events)[-1] == ("half_open", "open")
    up = Upstream(200)
    assert await send(stage, clock, up) == "circuit_open" and up.calls == 0


async def test_rate_limited_trial_gives_its_slot_back() -> None:
    stage, _events, clock = make_stage()
    await open_it(stage, clock)
    clock.advance(5)
    await send(stage, clock, Upstream(ProxyError("rate_limited", "local", retry_after=1)))
    await send(stage, clock, Upstream(ProxyError("rate_limited", "local", retry_after=1)))
    # both trial slots came back: two real trials can still close the circuit
    assert await send(stage, clock, Upstream(200)) == 200
    assert await send(stage, clock, Upstream(200)) == 200
    assert (await stage.snapshot())["state"] == "closed"


async def test_cancelled_trial_gives_its_slot_back() -> None:
    stage, _events, clock = make_stage({**CB, "half_open_requests": 1})
    await open_it(stage, clock)
    clock.advance(5)

    class Hang(Upstream):
        async def __call__(self, call: Call) -> Response:
            await asyncio.Event().wait()
            raise AssertionError

    task = asyncio.create_task(send(stage, clock, Hang()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await send(stage, clock, Upstream(200)) == 200
    assert (await stage.snapshot())["state"] == "closed"


async def test_snapshot_and_shared_state_across_rebuild() -> None:
    clock = FakeClock(auto=False)
    state = MemoryState(clock)
    stage, _events, _ = make_stage(clock=clock, state=state)
    await open_it(stage, clock)
    rebuilt, events2, _ = make_stage(clock=clock, state=state)  # e.g. a reload, same settings
    snap = await rebuilt.snapshot()
    assert snap["state"] == "open" and snap["half_open_requests"] == 2
    assert await send(rebuilt, clock, Upstream(200)) == "circuit_open"
    assert changes(events2) == []  # it did not witness a change


# -- in-process fast path vs the async protocol ----------------------------------------------


async def _lifecycle(state_cls: type[MemoryState]) -> tuple[list[object], list[tuple[str, str]]]:
    clock = FakeClock(auto=False)
    stage, events, clock = make_stage(clock=clock, state=state_cls(clock))
    seen: list[object] = []
    for status in (200, 503, 200, 500, 200):  # opens on the 4th
        seen.append(await send(stage, clock, Upstream(status)))
    clock.advance(5)
    seen.append(await send(stage, clock, Upstream(ProxyError("rate_limited", "local", retry_after=1))))
    seen.append(await send(stage, clock, Upstream(ProxyError("upstream_timeout", "slow"))))  # trial fails
    clock.advance(5)
    for _ in range(3):
        seen.append(await send(stage, clock, Upstream(200)))
    seen.append((await stage.snapshot())["state"])
    return seen, changes(events)


async def test_memory_fast_path_behaves_like_the_async_protocol() -> None:
    fast = await _lifecycle(MemoryState)
    assert fast == await _lifecycle(AsyncOnlyState)
    assert fast[1] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
