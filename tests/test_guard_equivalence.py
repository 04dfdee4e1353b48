"""The guards' fast path decides exactly what the nested wrappers decide.

One policy with retry (with a budget), circuit breaker and rate limit (with a queue and
`respect_upstream`) runs the same scripted story twice: through the pipeline as built
(`Guarded`, the guards' synchronous enter/leave) and through the same stages nested as
ordinary wrappers (their `__call__`). The upstream answers 200, 404, 429 with
`Retry-After`, 500, 503 and a rate-limit reset, or fails to connect or times out, chosen
per call and attempt by a seeded generator; some calls stream a body (the retry guard
hands those to its wrapper), some are cancelled mid-flight. Answers, attempts,
exhausted marks, events (with their virtual times), tallies and the circuit records must
be the same.
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
from proxy.events import EventBus
from proxy.model import Call, RequestBody, Response
from proxy.pipeline import Handler, _bind, build_pipeline
from proxy.stages.retry import is_exhausted
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
        built = build_pipeline(ctx, self.terminal)
        self.handle: Handler
        if mode == "wrappers":
            handle: Handler = self.terminal
            for stage in reversed(built.stages):
                handle = _bind(stage, handle)
            self.handle = handle
        else:
            assert built.guarded
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
        if i % 4 == 1:  # a small streamed body: the retry stage buffers it first (its wrapper)

            async def source() -> AsyncIterator[bytes]:
                yield b"abc"

            body, method = RequestBody(source=source(), length=3, max_body=100), "PUT"
        headers = CIMultiDictProxy(CIMultiDict[str]())
        now = self.clock.now()
        return Call(method, "up", "/x", "", headers, body, now + 30, now, f"r{i}")

    async def one(self, i: int) -> None:
        try:
            r = await self.handle(self.call(i))
            self.results.append((i, "answer", r.status, r.attempts, is_exhausted(r), r.notes.get("retry_skipped")))
        except ProxyError as e:
            self.results.append((i, "error", e.code, e.detail, getattr(e, "attempts", None), is_exhausted(e)))
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
    assert await one_at_a_time("guarded", seed) == await one_at_a_time("wrappers", seed)


@pytest.mark.parametrize("seed", range(6))
async def test_concurrent_calls_with_cancellations(seed: int) -> None:
    assert await all_at_once("guarded", seed) == await all_at_once("wrappers", seed)
