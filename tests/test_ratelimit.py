"""The rate-limit stage: GCRA accuracy, FIFO queue, rejections, upstream back-pressure."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import Event, EventBus, RateLimited, RateLimitWaited, UpstreamPaused
from proxy.model import Call, Response
from proxy.stages.ratelimit import RateLimiter, build, upstream_wait
from proxy.state.memory import MemoryState
from tests import calls
from tests.calls import AsyncOnlyState
from tests.stagekit import looped, stage_context

WALL = 1_800_000_000.0


def make_stage(
    rate_limit: dict[str, Any],
    *,
    clock: FakeClock | None = None,
    retry: dict[str, Any] | None = None,
    state_cls: type[MemoryState] = MemoryState,
) -> tuple[RateLimiter, list[Event], FakeClock]:
    clock = clock or FakeClock(wall_start=WALL)
    policy = Policy.model_validate(
        {"upstream": "up", "target": "http://127.0.0.1:9", "rate_limit": rate_limit, "retry": retry}
    )
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    ctx = stage_context(policy, clock, events=bus, state=state_cls(clock))
    return looped(build(ctx)), events, clock


def at_once(stage: RateLimiter) -> int:
    """Calls the stage admitted without a wait: a tally of the bus, not events."""
    return stage.ctx.events.tally(RateLimitWaited("up", 0.0)).n


def make_call(clock: FakeClock, *, total: float = 3600.0, rid: str = "r") -> Call:
    return calls.make_call(clock, total=total, request_id=rid)


class Upstream:
    def __init__(self, clock: FakeClock, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.clock = clock
        self.status = status
        self.headers = headers or {}
        self.seen: list[tuple[float, str]] = []

    async def __call__(self, call: Call) -> Response:
        self.seen.append((self.clock.now(), call.request_id))
        return Response(self.status, CIMultiDict(self.headers))


async def ok(call: Call) -> Response:
    return Response(200, CIMultiDict())


async def run_for(clock: FakeClock, seconds: float, step: float = 0.25) -> None:
    """Move a manual clock forward in steps, letting woken tasks run at each step."""
    for _ in range(round(seconds / step)):
        clock.advance(step)
        for _ in range(5):
            await asyncio.sleep(0)


def rejected(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, RateLimited)]


# -- accuracy and order --------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "workers"), [(20, 40), (500, 200)])
async def test_admitted_rate_is_accurate_with_many_callers(rate: int, workers: int) -> None:
    stage, events, clock = make_stage({"rate": f"{rate}/s", "burst": 1, "queue": {"max_wait": "1h"}})
    up = Upstream(clock)
    start = clock.now()
    end = start + 10.0

    async def worker(n: int) -> None:
        i = 0
        while clock.now() < end:
            await stage(make_call(clock, rid=f"{n}-{i}"), up)
            i += 1

    await asyncio.gather(*(worker(n) for n in range(workers)))
    admitted = [t for t, _ in up.seen if start <= t < end]
    assert abs(len(admitted) / 10.0 - rate) <= 0.05 * rate
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    assert min(gaps) >= 1.0 / rate - 1e-9  # smooth: never two inside one interval
    waited = [e.seconds for e in events if isinstance(e, RateLimitWaited)]
    assert min(waited) > 0  # a zero wait is tallied, never sent (proxy/events.py)
    assert len(waited) + at_once(stage) == len(up.seen) and at_once(stage) >= 1


async def test_queue_is_fifo() -> None:
    stage, _events, clock = make_stage({"rate": "10/s", "burst": 2, "queue": {"max_wait": "1m"}})
    up = Upstream(clock)
    order = [f"c{i}" for i in range(30)]
    await asyncio.gather(*(stage(make_call(clock, rid=rid), up) for rid in order))
    assert [rid for _, rid in up.seen] == order
    times = [t for t, _ in up.seen]
    assert times[0] == times[1]  # the burst of 2
    assert times[-1] - times[0] == pytest.approx(28 * 0.1)


# -- rejections ----------------------------------------------------------------------------


async def test_without_queue_over_rate_is_rejected_at_once() -> None:
    stage, events, clock = make_stage({"rate": "1/s"})
    await stage(make_call(clock), ok)
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), ok)
    assert info.value.code == "rate_limited" and info.value.status == 429
    assert info.value.retry_after == pytest.approx(1.0)
    assert rejected(events) == ["max_wait"]


async def test_max_wait_rejection_has_retry_after() -> None:
    clock = FakeClock(auto=False, wall_start=WALL)
    stage, events, _ = make_stage({"rate": "1/s", "queue": {"max_wait": "2s"}}, clock=clock)
    up = Upstream(clock)
    tasks = [asyncio.create_task(stage(make_call(clock, rid=str(i)), up)) for i in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), up)
    assert info.value.retry_after == pytest.approx(3.0)
    assert rejected(events) == ["max_wait"]
    await run_for(clock, 2.0)
    await asyncio.gather(*tasks)
    assert [t - 1000.0 for t, _ in up.seen] == pytest.approx([0, 1, 2])


async def test_queue_max_size_rejection() -> None:
    clock = FakeClock(auto=False, wall_start=WALL)
    stage, events, _ = make_stage({"rate": "1/s", "queue": {"max_wait": "1m", "max_size": 2}}, clock=clock)
    up = Upstream(clock)
    tasks = [asyncio.create_task(stage(make_call(clock, rid=str(i)), up)) for i in range(3)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert stage.waiting == 2
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), up)
    assert info.value.retry_after == pytest.approx(3.0)
    assert rejected(events) == ["queue_full"]
    await run_for(clock, 2.0)
    await asyncio.gather(*tasks)
    assert stage.waiting == 0
    assert (await stage.snapshot())["waiting"] == 0


async def test_does_not_wait_past_call_deadline() -> None:
    stage, _events, clock = make_stage({"rate": "1/s", "queue": {"max_wait": "5s"}})
    await stage(make_call(clock), ok)
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock, total=0.5), ok)
    assert info.value.retry_after == pytest.approx(1.0)
    await stage(make_call(clock, total=1.5), ok)  # a caller with time enough still gets in


# -- upstream back-pressure ------------------------------------------------------------------


async def test_upstream_429_pauses_everyone() -> None:
    stage, events, clock = make_stage({"rate": "100/s"})
    answer = await stage(make_call(clock), Upstream(clock, 429, {"Retry-After": "3"}))
    assert answer.status == 429
    assert [e.seconds for e in events if isinstance(e, UpstreamPaused)] == [3.0]
    clock.advance(1.0)
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), ok)
    assert info.value.retry_after == pytest.approx(2.0)
    assert rejected(events) == ["paused"]
    assert (await stage.snapshot())["paused_for"] == pytest.approx(2.0)
    clock.advance(2.0)
    await stage(make_call(clock), ok)


async def test_queued_callers_wait_out_a_pause() -> None:
    stage, events, clock = make_stage({"rate": "100/s", "queue": {"max_wait": "5s"}})
    await stage(make_call(clock), Upstream(clock, 429, {"Retry-After": "3"}))
    start = clock.now()
    up = Upstream(clock)
    await asyncio.gather(*(stage(make_call(clock, rid=str(i)), up) for i in range(3)))
    assert all(t >= start + 3.0 for t, _ in up.seen)
    waited = [e.seconds for e in events if isinstance(e, RateLimitWaited)][1:]
    assert min(waited) >= 3.0


async def test_pause_longer_than_max_wait_rejects() -> None:
    stage, _events, clock = make_stage({"rate": "100/s", "queue": {"max_wait": "2s"}})
    await stage(make_call(clock), Upstream(clock, 429, {"Retry-After": "10"}))
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), ok)
    assert info.value.retry_after == pytest.approx(10.0)


async def test_pause_is_capped_by_max_retry_after() -> None:
    stage, events, clock = make_stage({"rate": "100/s"}, retry={"max_retry_after": "20s"})
    await stage(make_call(clock), Upstream(clock, 429, {"Retry-After": "86400"}))
    assert [e.seconds for e in events if isinstance(e, UpstreamPaused)] == [20.0]


async def test_respect_upstream_off_does_not_pause() -> None:
    stage, events, clock = make_stage({"rate": "100/s", "burst": 5, "respect_upstream": False})
    await stage(make_call(clock), Upstream(clock, 429, {"Retry-After": "3"}))
    await stage(make_call(clock), ok)
    assert not [e for e in events if isinstance(e, UpstreamPaused)]


async def test_pause_from_ratelimit_headers() -> None:
    stage, events, clock = make_stage({"rate": "100/s"})
    headers = {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(WALL + 7))}
    await stage(make_call(clock), Upstream(clock, 200, headers))
    assert [e.seconds for e in events if isinstance(e, UpstreamPaused)] == [pytest.approx(7.0)]


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (429, {"Retry-After": "4"}, 4.0),
        (429, {"Retry-After": "Thu, 15 Jan 2027 08:00:05 GMT"}, 5.0),  # WALL is 08:00:00
        (503, {"Retry-After": "4"}, None),  # not a rate-limit signal
        (429, {"Retry-After": "junk"}, None),
        (429, {}, None),
        (429, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"}, 12.0),
        (200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(WALL + 30)}, 30.0),
        (200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int((WALL + 2) * 1000))}, 2.0),
        (200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "9"}, 9.0),
        (200, {"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": "12"}, None),
        (200, {"X-RateLimit-Remaining": "0"}, None),
        (200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(WALL - 5)}, None),
    ],
)
def test_upstream_wait(status: int, headers: dict[str, str], expected: float | None) -> None:
    got = upstream_wait(status, CIMultiDict(headers), WALL)
    assert got == (pytest.approx(expected) if expected is not None else None)


# -- shared vs per-replica budgets with a real Redis ------------------------------------------


@pytest.mark.parametrize(("shared", "second_status"), [(True, 429), (False, 200)])
async def test_shared_flag_decides_whether_replicas_split_one_budget(
    redis_server: Any, run_app: Any, start_proxy: Any, shared: bool, second_status: int
) -> None:
    """Two replicas on one Redis: `shared: true` is one budget, `shared: false` one each."""
    import uuid

    from aiohttp import web

    from proxy.state.resilient import open_shared_state
    from tests.conftest import proxy_url

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/x", ok)
    up = await run_app(app)
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    policy = [{"upstream": "up", "target": up.url, "rate_limit": {"rate": "1/m", "burst": 1, "shared": shared}}]
    replicas = []
    for _ in range(2):
        state = open_shared_state(redis_server.url, prefix=prefix)
        await state.connect()
        replicas.append(await start_proxy(policy, state=state))
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(replicas[0]) + "/up/x") as resp:
            assert resp.status == 200
        async with session.get(proxy_url(replicas[1]) + "/up/x") as resp:
            assert resp.status == second_status


# -- in-process fast path vs the async protocol ----------------------------------------------


async def _queue_story(state_cls: type[MemoryState]) -> tuple[list[object], list[Event], int]:
    """Burst, a queue, a full queue, an upstream pause met on arrival and while queued."""
    stage, events, clock = make_stage(
        {"rate": "2/s", "burst": 2, "queue": {"max_size": 3, "max_wait": "3s"}}, state_cls=state_cls
    )
    busy = Upstream(clock, 429, {"Retry-After": "1"})
    up = Upstream(clock)

    async def one(rid: str, handler: Any = up) -> object:
        try:
            return ((await stage(make_call(clock, rid=rid), handler)).status, clock.now())
        except ProxyError as exc:
            return (exc.code, exc.detail, exc.retry_after, clock.now())

    results = list(await asyncio.gather(*(one(f"r{i}") for i in range(7))))
    results.append(await one("p", busy))  # pauses everyone for 1 s
    results.extend(await asyncio.gather(*(one(f"q{i}") for i in range(3))))
    results.append(await one("late"))
    return results, events, at_once(stage)


async def test_memory_fast_path_behaves_like_the_async_protocol() -> None:
    fast = await _queue_story(MemoryState)
    assert fast == await _queue_story(AsyncOnlyState)
    results, events, admitted_at_once = fast
    assert [r[0] for r in results[:7]].count(200) == 5 and rejected(events)[:2] == ["queue_full", "queue_full"]
    assert any(isinstance(e, UpstreamPaused) for e in events)
    waits = [e.seconds for e in events if isinstance(e, RateLimitWaited)]
    assert admitted_at_once == 2 and min(waits) > 0  # the burst of 2; every later call queued


async def test_fast_path_for_local_budget_with_a_shared_async_state() -> None:
    """`shared: false` takes from the `local` memory state through its synchronous face,
    never its async `rate_take`; pauses still come from ctx.state (async only here)."""

    class Shared(AsyncOnlyState):
        def __init__(self, clock: FakeClock) -> None:
            super().__init__(clock)
            self.local = MemoryState(clock)
            self.async_takes = 0
            take = self.local.rate_take

            async def counted(key: str, *, interval: float, burst: int, max_wait: float) -> Any:
                self.async_takes += 1
                return await take(key, interval=interval, burst=burst, max_wait=max_wait)

            # On the instance: the class keeps its synchronous face (`sync_limits`).
            self.local.rate_take = counted  # type: ignore[method-assign]

    stage, events, clock = make_stage({"rate": "1/s", "burst": 1, "shared": False}, state_cls=Shared)
    state = stage.ctx.state
    assert isinstance(state, Shared)
    assert stage.slots is state.local and stage.take_sync is not None and stage.pause_sync is None
    assert (await stage(make_call(clock), ok)).status == 200
    with pytest.raises(ProxyError) as err:
        await stage(make_call(clock), ok)
    assert err.value.detail == "max_wait"
    await state.pause(stage.key, 5)
    clock.advance(1)
    with pytest.raises(ProxyError) as err:
        await stage(make_call(clock), ok)
    assert err.value.detail == "paused"
    assert [type(e).__name__ for e in events] == ["RateLimited", "RateLimited"] and at_once(stage) == 1
    assert state.async_takes == 0  # every slot was taken synchronously


async def test_fast_path_admits_without_the_async_protocol() -> None:
    """With the state in memory, an attempt that finds a free slot is admitted by
    `admit_now` alone: no coroutine of the limiter and no async state operation."""
    stage, events, clock = make_stage({"rate": "10/s", "burst": 2})
    calls: list[str] = []

    async def admit(call: Call) -> None:
        calls.append(call.request_id)
        raise AssertionError("the slow path")

    stage.part.admit = admit  # type: ignore[attr-defined]
    for rid in ("a", "b"):
        assert (await stage(make_call(clock, rid=rid), ok)).status == 200
    assert calls == [] and at_once(stage) == 2 and events == []


def test_metrics_fold_zero_waits_into_the_histogram() -> None:
    from proxy.observe.metrics import Metrics

    metrics = Metrics()
    for seconds in (0.0, 0.0, 0.0, 0.2):
        metrics(RateLimitWaited("up", seconds))
    text = metrics.render().decode()
    assert 'egressd_rate_limit_wait_seconds_bucket{le="0.0",upstream="up"} 3.0' in text
    assert 'egressd_rate_limit_wait_seconds_bucket{le="0.25",upstream="up"} 4.0' in text
    assert 'egressd_rate_limit_wait_seconds_count{upstream="up"} 4.0' in text
    assert 'egressd_rate_limit_wait_seconds_sum{upstream="up"} 0.2' in text
    metrics(RateLimitWaited("up", 0.0))
    value = metrics.registry.get_sample_value("egressd_rate_limit_wait_seconds_count", {"upstream": "up"})
    assert value == 5.0  # any collection of the registry folds them in


def test_zero_waits_come_from_the_bus_tally_at_collection() -> None:
    """Calls admitted at once are a tally of the bus, read by the metrics when scraped."""
    from proxy.observe.metrics import Metrics

    bus = EventBus()
    metrics = Metrics(tallies=bus.tallies)
    bus.subscribe(metrics)
    tally = bus.tally(RateLimitWaited("up", 0.0))
    assert bus.tally(RateLimitWaited("up", 0.0)) is tally  # one per event value: a reload counts on
    tally.n += 3
    bus.emit(RateLimitWaited("up", 0.5))

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"upstream": "up"})

    assert sample("egressd_rate_limit_wait_seconds_count") == 4.0
    assert (
        metrics.registry.get_sample_value("egressd_rate_limit_wait_seconds_bucket", {"upstream": "up", "le": "0.0"})
        == 3.0
    )
    tally.n += 2
    assert sample("egressd_rate_limit_wait_seconds_count") == 6.0  # only what it gained since
    assert sample("egressd_rate_limit_wait_seconds_count") == 6.0


def test_status_board_counts_tallied_admissions_as_rate_limit_use() -> None:
    from proxy.observe.status import USE_WINDOW, StatusBoard

    bus = EventBus()
    board = StatusBoard(tallies=bus.tallies)
    bus.subscribe(board)
    bus.tally(RateLimitWaited("up", 0.0)).n += 90
    bus.emit(RateLimitWaited("up", 2.0))  # one call that waited
    rl = {"rate_per_second": 10.0, "burst": 1, "waiting": 0}
    snap = board.upstream_snapshot("up", {"rate_limit": rl})["rate_limit"]
    assert snap["admitted_per_second_1m"] == round(91 / USE_WINDOW, 3) and snap["waited"] == 1
    snap = board.upstream_snapshot("up", {"rate_limit": rl})["rate_limit"]
    assert snap["admitted_per_second_1m"] == round(91 / USE_WINDOW, 3)  # read once, not twice


async def test_a_slot_due_within_float_residue_is_no_wait() -> None:
    """Repeated `tat += interval` leaves ~1e-13 s residue: a call whose slot is that close to
    now goes at once (tallied) on both paths, with no RateLimitWaited."""
    clock = FakeClock(auto=False)
    stage, events, _ = make_stage(
        {"rate": "10/s", "burst": 1, "queue": {"max_wait": "1s", "max_size": 10}}, clock=clock
    )
    tasks = [asyncio.ensure_future(stage(make_call(clock, rid=str(i)), ok)) for i in range(3)]  # 1 now, 2 queued
    for _ in range(3):  # the queued two leave at their slots (no stall: see the next test)
        for _ in range(10):
            await asyncio.sleep(0)
        clock.advance(0.1)
    await asyncio.gather(*tasks)
    events.clear()
    before = at_once(stage)
    late = asyncio.ensure_future(stage(make_call(clock, rid="late"), ok))
    for _ in range(10):
        await asyncio.sleep(0)
    clock.advance(1e-6)
    assert (await late).status == 200
    assert [e for e in events if isinstance(e, RateLimitWaited)] == [] and at_once(stage) == before + 1


async def test_queued_calls_leave_one_interval_apart_after_a_stall() -> None:
    """A loop that stalls past several slots must not release those callers together: they
    leave one interval apart (a provider counting in short windows would answer 429)."""
    clock = FakeClock(auto=False)
    stage, _, _ = make_stage({"rate": "10/s", "burst": 1, "queue": {"max_wait": "2s", "max_size": 10}}, clock=clock)
    sent: list[float] = []

    async def record(call: Call) -> Response:
        sent.append(clock.now())
        return await ok(call)

    start = clock.now()
    tasks = [asyncio.ensure_future(stage(make_call(clock, rid=str(i)), record)) for i in range(4)]
    for _ in range(10):
        await asyncio.sleep(0)
    clock.advance(0.5)  # the stall: every queued slot (0.1, 0.2, 0.3) has passed
    for _ in range(40):
        for _ in range(10):
            await asyncio.sleep(0)
        clock.advance(0.01)
    await asyncio.gather(*tasks)
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(sent)]
    assert sent[0] == start and len(sent) == 4
    assert gaps[0] >= 0.5 - 1e-6 and all(g >= 0.1 - 1e-6 for g in gaps[1:]), gaps


def test_tallies_of_equal_looking_events_of_two_types_are_apart() -> None:
    from proxy.events import UpstreamPaused

    bus = EventBus()
    other = bus.tally(UpstreamPaused("up", 0.0))  # equal to RateLimitWaited("up", 0.0) as a tuple
    tally = bus.tally(RateLimitWaited("up", 0.0))
    assert tally is not other and type(tally.event) is RateLimitWaited
