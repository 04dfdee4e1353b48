"""The attempt loop decides exactly what the three nested wrappers it replaced decided.

One policy with retry (with a budget), circuit breaker and rate limit (with a queue and
`respect_upstream`) runs the same scripted story twice: through the pipeline as built
(the attempt loop of proxy/upstream.py) and through `Reference`, a frozen copy of the
old nested wrappers (retry outside circuit outside rate limit, each an `async (call,
next)` coroutine over the async state protocol), kept here as the definition of the
observable behaviour. The upstream answers 200, 404, 429 with `Retry-After`, 500, 503
and a rate-limit reset, or fails to connect or times out, chosen per call and attempt
by a seeded generator; some calls stream a body (the retry policy buffers it first),
some are cancelled mid-flight. Answers, attempts, exhausted marks, events (with their
virtual times), tallies and the circuit records must be the same.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import (
    CircuitChanged,
    EventBus,
    RateLimited,
    RateLimitWaited,
    RetryScheduled,
    RetrySkipped,
    UpstreamPaused,
)
from proxy.model import Call, RequestBody, Response, unsafe_method
from proxy.pipeline import Handler, StageContext, build_pipeline
from proxy.stages.idempotency import dedupes_on_key
from proxy.stages.ratelimit import upstream_wait
from proxy.stages.retry import backoff_delay, is_exhausted, parse_retry_after
from proxy.state.base import CircuitSettings, state_key
from proxy.state.memory import MemoryState
from tests.stagekit import stage_context

POLICY = {
    "upstream": "up",
    "target": "https://up.example",
    "retry": {
        "attempts": 3,
        "backoff": {"initial": 0.1, "max": 1.0, "jitter": "none"},
        "on": [429, 500, 503, "connect_error", "timeout"],
        "budget": {"ratio": 0.3, "min_per_second": 0.5},
    },
    "circuit_breaker": {
        "window": "2s",
        "min_requests": 4,
        "failure_rate": 0.5,
        "open_for": "1s",
        "half_open_requests": 2,
    },
    "rate_limit": {"rate": "5/s", "burst": 2, "queue": {"max_size": 2, "max_wait": "0.5s"}},
}


# -- the reference: the old nested wrappers, frozen (their code as of the Guard era) ----------

_ERROR_WORD = {"upstream_unreachable": ("connect_error", "reset"), "upstream_timeout": ("timeout",)}
_FAILURE_CODES = frozenset({"upstream_unreachable", "upstream_timeout"})
_EPS = 1e-9


def _should_retry(response: Response) -> str:
    return response.headers.get("Stripe-Should-Retry", "").strip().lower()


class RefRetry:
    def __init__(self, ctx: StageContext) -> None:
        retry = ctx.policy.retry
        assert retry is not None and retry.budget is not None
        self.ctx, self.retry, self.budget = ctx, retry, retry.budget
        self.upstream = ctx.policy.upstream
        self.on_status = frozenset(v for v in retry.on if isinstance(v, int))
        self.on_words = frozenset(v for v in retry.on if isinstance(v, str))
        self.max_body = ctx.policy.limits.max_body
        self.budget_key = state_key(ctx.policy.upstream, "budget", ctx.policy.fingerprint("retry"))
        self.rng = random.Random()

    def _reason(self, result: Response | ProxyError) -> str | None:
        if isinstance(result, Response):
            if result.status in self.on_status or (result.status >= 400 and _should_retry(result) == "true"):
                return str(result.status)
            return None
        words = _ERROR_WORD.get(result.code, ())
        word = result.detail if result.detail in words else (words[0] if len(words) == 1 else None)
        return word if word is not None and word in self.on_words else None

    def _safe(self, call: Call, result: Response | ProxyError) -> bool:
        if not unsafe_method(call.method) or dedupes_on_key(self.ctx.policy, self.ctx.plugin, call):
            return True
        if isinstance(result, Response):
            return self.ctx.plugin.not_processed(result.status, result.headers)
        return result.code == "upstream_unreachable" and result.detail == "connect_error"

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        body = call.body
        if self.retry.attempts > 1 and not body.replayable and body.length is not None and body.length <= self.max_body:
            await body.read()
        await self.ctx.state.budget_record(self.budget_key, window=self.budget.window, retry=False)
        attempt = 1
        result: Response | ProxyError
        try:
            result = await nxt(call)
        except ProxyError as exc:
            result = exc
        while True:
            skip = await self._why_not_retry(call, result, attempt)
            if not isinstance(skip, float):
                return self._finish(result, attempt, skip)
            if isinstance(result, Response):
                await result.close()
            await self.ctx.clock.sleep(skip)
            attempt += 1
            try:
                result = await nxt(call)
            except ProxyError as exc:
                result = exc

    async def _why_not_retry(self, call: Call, result: Response | ProxyError, attempt: int) -> float | str | None:
        reason = self._reason(result)
        if reason is None:
            return None
        if not self._safe(call, result):
            return "unsafe"
        if isinstance(result, Response) and _should_retry(result) == "false":
            return "should_retry_false"
        if attempt >= self.retry.attempts:
            return "exhausted"
        if not call.body.replayable:
            return "not_replayable"
        b = self.retry.backoff
        delay = backoff_delay(
            attempt - 1, initial=b.initial, maximum=b.max, multiplier=b.multiplier, jitter=b.jitter, rng=self.rng
        )
        if self.retry.retry_after == "honor" and isinstance(result, Response):
            asked = parse_retry_after(result.headers.get("Retry-After"), self.ctx.clock.wall())
            if asked is not None:
                if asked > self.retry.max_retry_after:
                    return "retry_after"
                delay = max(delay, asked)
        if self.ctx.clock.now() + delay >= call.deadline:
            return "deadline"
        budget = self.budget
        if not await self.ctx.state.budget_try_retry(
            self.budget_key, window=budget.window, ratio=budget.ratio, min_per_second=budget.min_per_second
        ):
            return "budget"
        self.ctx.events.emit(RetryScheduled(self.upstream, reason, delay))
        return delay

    def _finish(self, result: Response | ProxyError, attempts: int, skip: str | None) -> Response:
        if skip is not None and skip != "exhausted":
            self.ctx.events.emit(RetrySkipped(self.upstream, skip))
        if skip in ("exhausted", "budget"):
            result.exhausted = True
        result.attempts = attempts
        if isinstance(result, Response):
            if skip is not None and skip != "exhausted":
                result.retry_skipped = skip
            return result
        raise result


class RefCircuit:
    def __init__(self, ctx: StageContext) -> None:
        cb = ctx.policy.circuit_breaker
        assert cb is not None
        self.ctx, self.upstream = ctx, ctx.policy.upstream
        self.key = state_key(ctx.policy.upstream, "cb", ctx.policy.fingerprint("circuit_breaker"))
        self.settings = CircuitSettings(
            window=cb.window,
            min_requests=cb.min_requests,
            failure_rate=cb.failure_rate,
            open_for=cb.open_for,
            half_open_requests=cb.half_open_requests,
        )
        self._seen: str | None = None

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        state = self.ctx.state
        admission = await state.circuit_admit(self.key, self.settings)
        if self._seen is not None and admission.state != self._seen:
            self._changed(self._seen, admission.state)
        self._seen = admission.state
        if not admission.allowed:
            raise ProxyError(
                "circuit_open",
                f"circuit of upstream {self.upstream} is {admission.state.replace('_', '-')}",
                retry_after=admission.retry_after,
                detail=admission.state,
            )
        verdict: bool | None = None
        try:
            response = await nxt(call)
            verdict = response.status >= 500
            return response
        except ProxyError as exc:
            if exc.code in _FAILURE_CODES:
                verdict = True
            raise
        finally:
            if verdict is not None:
                t = await state.circuit_record(self.key, self.settings, failure=verdict, trial=admission.trial)
                if t.after != t.before:
                    self._changed(t.before, t.after)
            elif admission.trial:
                await state.circuit_release(self.key, self.settings)

    def _changed(self, before: str, after: str) -> None:
        self._seen = after
        self.ctx.events.emit(CircuitChanged(self.upstream, after, before))


class RefRateLimit:
    def __init__(self, ctx: StageContext) -> None:
        rl = ctx.policy.rate_limit
        assert rl is not None and rl.queue is not None and ctx.policy.retry is not None
        self.ctx, self.upstream = ctx, ctx.policy.upstream
        self.key = state_key(ctx.policy.upstream, "rl", ctx.policy.fingerprint("rate_limit"))
        self.interval = 1.0 / rl.rate.per_second
        self.burst = rl.burst
        self.max_wait, self.max_size = rl.queue.max_wait, rl.queue.max_size
        self.max_pause = ctx.policy.retry.max_retry_after
        self.waiting = 0
        self.at_once = ctx.events.tally(RateLimitWaited(self.upstream, 0.0))

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        await self._admit(call, self.ctx.clock.now())
        response = await nxt(call)
        wait = upstream_wait(response.status, response.headers, self.ctx.clock.wall())
        if wait is not None:
            wait = min(wait, self.max_pause)
            await self.ctx.state.pause(self.key, wait)
            self.ctx.events.emit(UpstreamPaused(self.upstream, wait))
        return response

    async def _admit(self, call: Call, start: float) -> None:
        clock, state = self.ctx.clock, self.ctx.state
        give_up = min(start + self.max_wait, call.deadline)
        paused: float | None = None
        reserved: float | None = None
        slept = False
        while True:
            if reserved is None:
                if paused is None:
                    paused = await state.paused_for(self.key)
                if paused > 0:
                    if self.max_wait <= 0 or clock.now() + paused > give_up + _EPS:
                        self._reject("paused", paused)
                    if self.waiting >= self.max_size:
                        self._reject("queue_full", paused)
                    await self._sleep(paused)
                    slept, paused = True, None
                    continue
                paused = None
                full = self.max_wait > 0 and self.waiting >= self.max_size
                room = 0.0 if full else max(give_up - clock.now(), 0.0)
                decision = await state.rate_take(self.key, interval=self.interval, burst=self.burst, max_wait=room)
                if not decision.allowed:
                    self._reject("queue_full" if full else "max_wait", decision.wait)
                if decision.wait <= _EPS:
                    break
                reserved = decision.wait
            await self._sleep(reserved)
            slept, reserved = True, None
            if await state.paused_for(self.key) <= 0:
                break
        if slept:
            self.ctx.events.emit(RateLimitWaited(self.upstream, clock.now() - start))
        else:
            self.at_once.n += 1

    async def _sleep(self, seconds: float) -> None:
        self.waiting += 1
        try:
            await self.ctx.clock.sleep(seconds)
        finally:
            self.waiting -= 1

    def _reject(self, reason: str, retry_after: float) -> None:
        self.ctx.events.emit(RateLimited(self.upstream, reason))
        raise ProxyError(
            "rate_limited",
            f"rate limit of upstream {self.upstream} reached ({reason})",
            retry_after=retry_after,
            detail=reason,
        )


def reference(ctx: StageContext, terminal: Handler) -> Handler:
    """retry(circuit(rate_limit(terminal))), as the old pipeline nested them."""
    retry, circuit, limit = RefRetry(ctx), RefCircuit(ctx), RefRateLimit(ctx)

    async def limited(call: Call) -> Response:
        return await limit(call, terminal)

    async def guarded(call: Call) -> Response:
        return await circuit(call, limited)

    async def run(call: Call) -> Response:
        return await retry(call, guarded)

    return run


def outcome(rng: random.Random) -> tuple[str, Any, Any]:
    r = rng.random()
    if r < 0.5:
        return ("status", 200, {})
    if r < 0.65:
        return ("status", 500, {})
    if r < 0.72:
        return ("status", 503, {})
    if r < 0.78:
        return ("status", 429, {"Retry-After": str(rng.choice([0, 1]))})
    if r < 0.84:
        return ("status", 404, {})
    if r < 0.9:
        return ("error", "upstream_unreachable", "connect_error")
    if r < 0.95:
        return ("error", "upstream_timeout", "timeout")
    return ("status", 200, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0.3"})


class Story:
    def __init__(self, mode: str, seed: int) -> None:
        self.clock = FakeClock(auto=False)
        self.bus = EventBus()
        self.events: list[tuple[float, object]] = []
        self.bus.subscribe(lambda e: self.events.append((round(self.clock.now(), 6), e)))
        self.state = MemoryState(self.clock)
        ctx = stage_context(Policy.model_validate(POLICY), self.clock, events=self.bus, state=self.state)
        self.seed = seed
        self.tries: dict[str, int] = {}
        self.handle: Handler
        if mode == "reference":
            self.handle = reference(ctx, self.terminal)
        else:
            built = build_pipeline(ctx, self.terminal)
            assert built.stage_names == ("retry", "circuit_breaker", "rate_limit")
            self.handle = built.handle
        self.results: list[tuple[object, ...]] = []

    async def terminal(self, call: Call) -> Response:
        n = self.tries[call.request_id] = self.tries.get(call.request_id, 0) + 1
        kind, a, b = outcome(random.Random(f"{self.seed}-{call.request_id}-{n}"))
        self.events.append((round(self.clock.now(), 6), ("sent", call.request_id)))
        await self.clock.sleep(0.01)
        if kind == "status":
            return Response(a, CIMultiDict(b))
        raise ProxyError(a, "scripted", detail=b)

    def call(self, i: int) -> Call:
        body = RequestBody.empty()
        method = "GET"
        if i % 4 == 1:  # a small streamed body: the retry policy buffers it first (`begin`)

            async def source() -> AsyncIterator[bytes]:
                yield b"abc"

            body, method = RequestBody(source=source(), length=3, max_body=100), "PUT"
        headers = CIMultiDictProxy(CIMultiDict[str]())
        now = self.clock.now()
        return Call(method, "up", "/x", "", headers, body, now + 30, now, f"r{i}")

    async def one(self, i: int) -> None:
        try:
            r = await self.handle(self.call(i))
            self.results.append((i, "answer", r.status, r.attempts, is_exhausted(r), r.retry_skipped))
        except ProxyError as e:
            self.results.append((i, "error", e.code, e.detail, e.attempts, is_exhausted(e)))
        except asyncio.CancelledError:
            self.results.append((i, "cancelled"))

    async def settle(self) -> None:
        for _ in range(30):
            await asyncio.sleep(0)

    def outcome(self) -> tuple[object, ...]:
        circuits = sorted((k, c.state, c.trials_admitted, c.trials_passed) for k, c in self.state._circuits.items())
        tallies = [(t.event, t.n) for t in self.bus.tallies()]
        return sorted(self.results), self.events, tallies, circuits


async def one_at_a_time(mode: str, seed: int) -> tuple[object, ...]:
    story = Story(mode, seed)
    rng = random.Random(seed + 1)
    for i in range(300):
        task = asyncio.ensure_future(story.one(i))
        while True:
            await story.settle()
            if task.done():
                break
            due = [when for when, _, fut in story.clock._sleepers if not fut.done()]
            story.clock.advance(min(due) - story.clock.now())
        story.clock.advance(rng.choice([0.01, 0.05, 0.2, 0.7]))
    return story.outcome()


async def all_at_once(mode: str, seed: int) -> tuple[object, ...]:
    story = Story(mode, seed)
    rng = random.Random(seed + 1)
    tasks: list[asyncio.Future[None]] = []
    for i in range(150):
        tasks.append(asyncio.ensure_future(story.one(i)))
        await story.settle()
        if i % 7 == 3 and i > 10:
            tasks[i - 2].cancel()
            await story.settle()
        for _ in range(rng.choice([0, 1, 5, 15])):
            story.clock.advance(0.02)
            await story.settle()
    for _ in range(3000):
        if all(t.done() for t in tasks):
            break
        story.clock.advance(0.02)
        await story.settle()
    await asyncio.gather(*tasks)
    return story.outcome()


@pytest.mark.parametrize("seed", range(12))
async def test_one_call_at_a_time(seed: int) -> None:
    assert await one_at_a_time("loop", seed) == await one_at_a_time("reference", seed)


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_calls_with_cancellations(seed: int) -> None:
    assert await all_at_once("loop", seed) == await all_at_once("reference", seed)
