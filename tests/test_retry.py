"""The retry policy in the attempt loop: what is retried, when, how often, and what is never
retried."""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from multidict import CIMultiDict

from plugins.base import ProviderPlugin
from plugins.stripe import StripePlugin
from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import Event, EventBus, RetryScheduled, RetrySkipped
from proxy.model import Call, RequestBody, Response
from proxy.stages.retry import RetryPolicy, backoff_delay, build, is_exhausted, parse_retry_after
from proxy.state.memory import MemoryState
from tests import calls
from tests.stagekit import looped, stage_context

Result = Response | ProxyError


def make_stage(
    retry: dict[str, Any] | None = None,
    *,
    plugin: ProviderPlugin | None = None,
    clock: FakeClock | None = None,
    limits: dict[str, Any] | None = None,
    state_cls: type[MemoryState] = MemoryState,
) -> tuple[RetryPolicy, list[Event], FakeClock]:
    clock = clock or FakeClock()
    retry = {"attempts": 4, "backoff": {"initial": 0.1, "max": 1.0, "jitter": "none"}, **(retry or {})}
    policy = Policy.model_validate(
        {"upstream": "up", "target": "http://127.0.0.1:9", "retry": retry, "limits": limits or {}}
    )
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    ctx = stage_context(policy, clock, events=bus, plugin=plugin, state=state_cls(clock))
    return looped(build(ctx)), events, clock


def make_call(
    clock: FakeClock,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: RequestBody | None = None,
    total: float = 60.0,
) -> Call:
    return calls.make_call(
        clock, method, path="/v1/things", headers=headers, body=body, total=total, request_id="req-1"
    )


def resp(status: int, headers: dict[str, str] | None = None, body: bytes = b"{}") -> Response:
    return Response(status, CIMultiDict(headers or {}), body=body, upstream="up")


def timeout() -> ProxyError:
    return ProxyError("upstream_timeout", "attempt timed out", detail="timeout")


def unreachable(detail: str) -> ProxyError:
    return ProxyError("upstream_unreachable", f"upstream {detail}", detail=detail)


class Upstream:
    """A terminal handler that answers from a script and records what it saw."""

    def __init__(self, clock: FakeClock, script: Sequence[Result]) -> None:
        self.clock = clock
        self.script = list(script)
        self.calls: list[tuple[float, Call, bytes]] = []
        self.closed = 0

    async def __call__(self, call: Call) -> Response:
        body = b"".join([chunk async for chunk in call.body.chunks()])
        self.calls.append((self.clock.now(), call, body))
        result = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(result, ProxyError):
            raise result
        answer = Response(result.status, result.headers.copy(), body=result.body, upstream="up")

        async def release() -> None:
            self.closed += 1

        answer.release = release
        return answer

    @property
    def times(self) -> list[float]:
        return [t for t, _, _ in self.calls]


def skipped(events: list[Event]) -> list[str]:
    return [e.reason for e in events if isinstance(e, RetrySkipped)]


def scheduled(events: list[Event]) -> list[RetryScheduled]:
    return [e for e in events if isinstance(e, RetryScheduled)]


# -- retry safety -------------------------------------------------------------------------


async def test_timed_out_keyless_post_is_sent_exactly_once() -> None:
    stage, events, clock = make_stage({"on": [503, "timeout", "connect_error", "reset"]})
    up = Upstream(clock, [timeout(), resp(200)])
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock, "POST", body=RequestBody(data=b"a=1")), up)
    assert info.value.code == "upstream_timeout"
    assert len(up.calls) == 1
    assert skipped(events) == ["unsafe"]
    assert not is_exhausted(info.value)


@pytest.mark.parametrize("method", ["PURGE", "LOCK", "post", "get", "CONNECT"])
async def test_methods_outside_the_allow_list_are_unsafe(method: str) -> None:
    stage, events, clock = make_stage({"on": ["timeout"]})
    up = Upstream(clock, [timeout(), resp(200)])
    with pytest.raises(ProxyError):
        await stage(make_call(clock, method), up)
    assert len(up.calls) == 1
    assert skipped(events) == ["unsafe"]


async def test_reset_after_keyless_post_is_not_retried() -> None:
    stage, events, clock = make_stage({"on": ["reset"]})
    up = Upstream(clock, [unreachable("reset"), resp(200)])
    with pytest.raises(ProxyError):
        await stage(make_call(clock, "PATCH"), up)
    assert len(up.calls) == 1
    assert skipped(events) == ["unsafe"]


async def test_keyless_post_503_is_not_retried_by_generic_plugin() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [resp(503), resp(200)])
    answer = await stage(make_call(clock, "POST"), up)
    assert answer.status == 503 and answer.attempts == 1
    assert answer.retry_skipped == "unsafe"


async def test_connect_error_post_is_retried_because_it_never_arrived() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [unreachable("connect_error"), resp(201)])
    answer = await stage(make_call(clock, "POST", body=RequestBody(data=b"x")), up)
    assert answer.status == 201 and answer.attempts == 2
    assert [b for _, _, b in up.calls] == [b"x", b"x"]


async def test_429_post_is_retried_because_not_processed() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [resp(429), resp(200)])
    answer = await stage(make_call(clock, "POST"), up)
    assert answer.status == 200 and answer.attempts == 2


async def test_three_503_then_200_one_success_with_one_key() -> None:
    stage, events, clock = make_stage(plugin=StripePlugin())
    up = Upstream(clock, [resp(503), resp(503), resp(503), resp(200, body=b'{"id":"ch_1"}')])
    call = make_call(clock, "POST", headers={"Idempotency-Key": "key-1"}, body=RequestBody(data=b"amount=5"))
    answer = await stage(call, up)
    assert answer.status == 200 and answer.body == b'{"id":"ch_1"}'
    assert answer.attempts == 4
    assert {c.headers["Idempotency-Key"] for _, c, _ in up.calls} == {"key-1"}
    assert {c.headers["X-Request-Id"] for _, c, _ in up.calls} == {"req-1"}
    assert [b for _, _, b in up.calls] == [b"amount=5"] * 4
    assert up.closed == 3  # every failed answer was released before the retry
    assert [e.reason for e in scheduled(events)] == ["503", "503", "503"]
    assert not is_exhausted(answer)


async def test_keyed_timeout_is_retried_with_stripe() -> None:
    stage, _events, clock = make_stage(plugin=StripePlugin())
    up = Upstream(clock, [timeout(), resp(200)])
    answer = await stage(make_call(clock, "POST", headers={"Idempotency-Key": "k"}), up)
    assert answer.status == 200 and answer.attempts == 2


async def test_get_timeout_is_retried() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [timeout(), unreachable("connect_error"), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.attempts == 3


async def test_words_not_in_on_are_not_retried() -> None:
    stage, events, clock = make_stage({"on": [503]})
    up = Upstream(clock, [timeout(), resp(200)])
    with pytest.raises(ProxyError):
        await stage(make_call(clock), up)
    assert len(up.calls) == 1
    assert skipped(events) == []


async def test_protocol_error_and_4xx_are_not_retried() -> None:
    stage, _events, clock = make_stage({"on": [503, "connect_error", "timeout", "reset"]})
    up = Upstream(clock, [unreachable("protocol_error")])
    with pytest.raises(ProxyError):
        await stage(make_call(clock), up)
    up = Upstream(clock, [resp(400)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 400 and len(up.calls) == 1 and answer.attempts == 1


# -- exhaustion ---------------------------------------------------------------------------


async def test_exhausted_response_is_marked() -> None:
    stage, _events, clock = make_stage({"attempts": 3})
    up = Upstream(clock, [resp(503)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 503 and answer.attempts == 3 and len(up.calls) == 3
    assert answer.exhausted is True and is_exhausted(answer)


async def test_exhausted_error_is_marked() -> None:
    stage, _events, clock = make_stage({"attempts": 2})
    up = Upstream(clock, [unreachable("connect_error")])
    with pytest.raises(ProxyError) as info:
        await stage(make_call(clock), up)
    assert is_exhausted(info.value)
    assert info.value.attempts == 2 and info.value.exhausted


# -- backoff and Retry-After ---------------------------------------------------------------


async def test_backoff_grows_and_caps() -> None:
    stage, _events, clock = make_stage({"attempts": 6, "backoff": {"initial": 0.1, "max": 0.5, "jitter": "none"}})
    up = Upstream(clock, [resp(503)])
    start = clock.now()
    await stage(make_call(clock), up)
    gaps = [b - a for a, b in zip([start, *up.times], up.times, strict=False)][1:]
    assert gaps == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_backoff_jitter_variants() -> None:
    rng = random.Random(7)
    kw: dict[str, Any] = {"initial": 1.0, "maximum": 8.0, "multiplier": 2.0, "rng": rng}
    for n, cap in ((0, 1.0), (2, 4.0), (5, 8.0), (10_000, 8.0)):
        assert backoff_delay(n, jitter="none", **kw) == cap
        full = [backoff_delay(n, jitter="full", **kw) for _ in range(200)]
        assert all(0 <= d <= cap for d in full) and min(full) < cap / 4
        equal = [backoff_delay(n, jitter="equal", **kw) for _ in range(200)]
        assert all(cap / 2 <= d <= cap for d in equal)


async def test_retry_after_seconds_delays_the_retry() -> None:
    stage, events, clock = make_stage()
    up = Upstream(clock, [resp(503, {"Retry-After": "2"}), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 200
    assert up.times[1] - up.times[0] >= 2.0
    assert scheduled(events)[0].delay == pytest.approx(2.0)


async def test_retry_after_http_date() -> None:
    clock = FakeClock()
    stage, _events, _ = make_stage(clock=clock)
    date = email.utils.formatdate(clock.wall() + 3, usegmt=True)
    up = Upstream(clock, [resp(429, {"Retry-After": date}), resp(200)])
    await stage(make_call(clock), up)
    assert up.times[1] - up.times[0] >= 3.0 - 1e-6


async def test_retry_after_ignore_uses_backoff() -> None:
    stage, _events, clock = make_stage({"retry_after": "ignore"})
    up = Upstream(clock, [resp(503, {"Retry-After": "5"}), resp(200)])
    await stage(make_call(clock), up)
    assert up.times[1] - up.times[0] == pytest.approx(0.1)


async def test_garbage_retry_after_is_ignored() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [resp(503, {"Retry-After": "soon, maybe"}), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 200
    assert up.times[1] - up.times[0] == pytest.approx(0.1)


async def test_huge_retry_after_returns_answer_at_once() -> None:
    stage, events, clock = make_stage({"max_retry_after": 30.0})
    up = Upstream(clock, [resp(503, {"Retry-After": "3600"}), resp(200)])
    start = clock.now()
    answer = await stage(make_call(clock, total=7200), up)
    assert answer.status == 503 and answer.attempts == 1
    assert clock.now() == start
    assert skipped(events) == ["retry_after"]
    assert answer.retry_skipped == "retry_after"


async def test_wait_past_total_deadline_returns_answer_at_once() -> None:
    stage, events, clock = make_stage()
    up = Upstream(clock, [resp(503, {"Retry-After": "20"}), resp(200)])
    start = clock.now()
    answer = await stage(make_call(clock, total=10), up)
    assert answer.status == 503 and len(up.calls) == 1
    assert clock.now() == start
    assert skipped(events) == ["deadline"]


async def test_never_sleeps_past_deadline_with_backoff() -> None:
    stage, _events, clock = make_stage({"attempts": 10, "backoff": {"initial": 1.0, "max": 1.0, "jitter": "none"}})
    up = Upstream(clock, [resp(502)])
    call = make_call(clock, total=3.5)
    await stage(call, up)
    assert clock.now() <= call.deadline
    assert len(up.calls) == 4  # at 0, 1, 2, 3; the next one would start at 4 > 3.5


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("-3", None),
        ("nan", None),
        ("", None),
        ("5s", None),
        ("tomorrow", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # in the past
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, 1_800_000_000.0) == expected


def test_parse_retry_after_future_date() -> None:
    wall = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(wall + 90, usegmt=True), wall) == pytest.approx(90)
    assert parse_retry_after(None, wall) is None


# -- Stripe-Should-Retry -------------------------------------------------------------------


async def test_stripe_should_retry_false_forbids() -> None:
    stage, events, clock = make_stage(plugin=StripePlugin())
    up = Upstream(clock, [resp(503, {"Stripe-Should-Retry": "false"}), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 503 and len(up.calls) == 1
    assert skipped(events) == ["should_retry_false"]


async def test_stripe_should_retry_true_permits() -> None:
    stage, _events, clock = make_stage({"on": [503]}, plugin=StripePlugin())
    up = Upstream(
        clock, [resp(429, {"Stripe-Should-Retry": "true"}), resp(409, {"Stripe-Should-Retry": "true"}), resp(200)]
    )
    answer = await stage(make_call(clock, "POST", headers={"Idempotency-Key": "k"}), up)
    assert answer.status == 200 and answer.attempts == 3


# -- budget --------------------------------------------------------------------------------


async def test_budget_exhaustion_stops_retries() -> None:
    stage, events, clock = make_stage({"attempts": 5, "budget": {"ratio": 0.5, "min_per_second": 0, "window": "10s"}})
    up = Upstream(clock, [resp(503)])
    first = await stage(make_call(clock), up)
    # one request in the window: 0.5 * 1 allows one retry, not two
    assert first.attempts == 2
    assert skipped(events) == ["budget"]
    assert is_exhausted(first)
    assert first.retry_skipped == "budget"


async def test_budget_floor_allows_retries_at_low_traffic() -> None:
    stage, _events, clock = make_stage({"attempts": 3, "budget": {"ratio": 0.1, "min_per_second": 1}})
    up = Upstream(clock, [resp(503), resp(503), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 200 and answer.attempts == 3


class RoundTripState(MemoryState):
    """A MemoryState whose every budget operation yields once, like a Redis round trip."""

    async def budget_record(self, key: str, *, window: float, retry: bool) -> None:
        await asyncio.sleep(0)
        await super().budget_record(key, window=window, retry=retry)

    async def budget_try_retry(self, key: str, *, window: float, ratio: float, min_per_second: float) -> bool:
        await asyncio.sleep(0)
        return await super().budget_try_retry(key, window=window, ratio=ratio, min_per_second=min_per_second)


async def test_budget_holds_under_concurrent_retries() -> None:
    stage, _events, clock = make_stage(
        {"attempts": 2, "budget": {"ratio": 0.1, "min_per_second": 0, "window": "10s"}}, state_cls=RoundTripState
    )
    up = Upstream(clock, [resp(503)])
    answers = await asyncio.gather(*(stage(make_call(clock), up) for _ in range(50)))
    retried = sum(1 for a in answers if a.attempts == 2)
    assert retried <= 5  # 0.1 * 50 requests
    assert len(up.calls) == 50 + retried


# -- bodies --------------------------------------------------------------------------------


async def _stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_streamed_unknown_length_body_is_not_retried_and_visible() -> None:
    stage, events, clock = make_stage()
    up = Upstream(clock, [resp(503), resp(200)])
    body = RequestBody(source=_stream(b"a", b"b"), length=None, max_body=1000)
    answer = await stage(make_call(clock, "PUT", body=body), up)
    assert answer.status == 503 and answer.attempts == 1 and len(up.calls) == 1
    assert up.calls[0][2] == b"ab"
    assert skipped(events) == ["not_replayable"]
    assert answer.retry_skipped == "not_replayable"


async def test_streamed_body_of_known_small_length_is_buffered_and_retried() -> None:
    stage, _events, clock = make_stage()
    up = Upstream(clock, [resp(503), resp(200)])
    body = RequestBody(source=_stream(b"he", b"llo"), length=5, max_body=1000)
    answer = await stage(make_call(clock, "PUT", body=body), up)
    assert answer.status == 200 and [b for _, _, b in up.calls] == [b"hello", b"hello"]


async def test_known_length_over_max_body_is_not_buffered() -> None:
    stage, events, clock = make_stage(limits={"max_body": 4})
    up = Upstream(clock, [resp(503), resp(200)])
    body = RequestBody(source=_stream(b"abc"), length=10)
    answer = await stage(make_call(clock, "PUT", body=body), up)
    assert answer.attempts == 1 and not body.buffered
    assert skipped(events) == ["not_replayable"]


async def test_single_attempt_policy_does_not_buffer() -> None:
    stage, _events, clock = make_stage({"attempts": 1})
    up = Upstream(clock, [resp(200)])
    body = RequestBody(source=_stream(b"abc"), length=3)
    await stage(make_call(clock, "PUT", body=body), up)
    assert not body.buffered


# -- the three limit stages together ----------------------------------------------------------


async def test_retry_circuit_ratelimit_chain_honours_upstream_pause() -> None:
    from proxy.pipeline import build_pipeline
    from proxy.stages.ratelimit import RateLimiter

    clock = FakeClock()
    policy = Policy.model_validate(
        {
            "upstream": "up",
            "target": "http://127.0.0.1:9",
            "retry": {"attempts": 3, "backoff": {"initial": 0.1, "jitter": "none"}},
            "circuit_breaker": {"min_requests": 2},
            "rate_limit": {"rate": "50/s", "queue": {"max_wait": "5s"}},
        }
    )
    events: list[Event] = []
    bus = EventBus()
    bus.subscribe(events.append)
    ctx = stage_context(policy, clock, events=bus, plugin=StripePlugin())
    up = Upstream(clock, [resp(429, {"Retry-After": "2"}), resp(200)])
    pipeline = build_pipeline(ctx, up)
    assert pipeline.stage_names == ("retry", "circuit_breaker", "rate_limit")
    answer = await pipeline.handle(make_call(clock, "POST"))
    assert answer.status == 200 and answer.attempts == 2
    assert up.times[1] - up.times[0] >= 2.0
    limiter = pipeline.stages[2]
    assert isinstance(limiter, RateLimiter)
    assert (await limiter.snapshot())["paused_for"] == 0


@pytest.mark.parametrize(("dedupes", "sends"), [(True, 2), (False, 1), (None, 1)])
async def test_policy_can_declare_that_a_generic_upstream_dedupes_by_key(dedupes: bool | None, sends: int) -> None:
    """A timed-out keyed POST to a generic upstream is resent only when the policy says it dedupes."""
    clock = FakeClock()
    idem: dict[str, Any] = {"replay_ttl": "0s"}
    if dedupes is not None:
        idem["upstream_dedupes"] = dedupes
    policy = Policy.model_validate(
        {
            "upstream": "up",
            "target": "http://127.0.0.1:9",
            "idempotency": idem,
            "retry": {"attempts": 3, "backoff": {"initial": 0.01, "jitter": "none"}, "on": ["timeout"]},
        }
    )
    stage = looped(build(stage_context(policy, clock)))
    up = Upstream(clock, [timeout(), resp(200)])
    call = make_call(clock, "POST", headers={"Idempotency-Key": "k-1"}, body=RequestBody(data=b"a=1"))
    if sends == 2:
        assert (await stage(call, up)).status == 200
    else:
        with pytest.raises(ProxyError):
            await stage(call, up)
    assert len(up.calls) == sends


# -- the settled first answer and the in-process budget ----------------------------------------


async def test_first_try_success_is_returned_as_is() -> None:
    stage, events, clock = make_stage()
    up = Upstream(clock, [resp(200, {"Stripe-Should-Retry": "true"}), resp(200)])
    answer = await stage(make_call(clock), up)
    assert answer.status == 200 and answer.attempts == 1 and len(up.calls) == 1
    assert events == [] and not is_exhausted(answer) and answer.retry_skipped is None


@pytest.mark.parametrize("state_cls", [MemoryState, RoundTripState])
async def test_budget_same_through_fast_path_and_protocol(state_cls: type[MemoryState]) -> None:
    stage, _events, clock = make_stage(
        {"attempts": 2, "budget": {"ratio": 0.2, "min_per_second": 0, "window": "10s"}}, state_cls=state_cls
    )
    up = Upstream(clock, [resp(503)])
    attempts = [(await stage(make_call(clock), up)).attempts for _ in range(20)]
    assert attempts.count(2) == 4  # 0.2 * 20 requests, taken as they come
