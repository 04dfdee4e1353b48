"""Rate limiting: GCRA admission per attempt, a bounded FIFO queue, upstream back-pressure.

Every attempt (retries included: this stage sits inside the retry loop) takes one GCRA
slot from the state backend. A slot granted with a wait is a reservation, so callers
leave the queue in the order they entered it. A caller that would wait longer than
`queue.max_wait` (or past its own deadline), or that finds `queue.max_size` callers of
this process already waiting, gets 429 `rate_limited` with a `Retry-After`.

With `respect_upstream`, an upstream answer that names a wait (429 + `Retry-After`, or
`X-RateLimit-Remaining: 0` + a reset) pauses the whole budget of this upstream (every
replica with Redis) until then; docs/resilience.md ("rate_limit") lists the headers understood.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, NoReturn

from proxy.errors import ProxyError
from proxy.events import RateLimited, RateLimitWaited, UpstreamPaused
from proxy.model import Call, Response
from proxy.pipeline import Handler, StageContext
from proxy.stages.retry import parse_retry_after
from proxy.state.base import StateBackend, SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import RateLimit

DEFAULT_MAX_PAUSE = 60.0
_EPS = 1e-9
# Epoch thresholds for X-RateLimit-Reset: above these a number is a timestamp, below
# them a count of seconds from now (GitHub/Twitter send epoch seconds, others a delta).
_EPOCH_SECONDS = 1e9
_EPOCH_MILLIS = 1e12
_REMAINING_HEADERS = ("X-RateLimit-Remaining", "RateLimit-Remaining")
_RESET_HEADERS = ("X-RateLimit-Reset", "RateLimit-Reset", "X-RateLimit-Reset-After")


def upstream_wait(status: int, headers: Mapping[str, str], wall: float) -> float | None:
    """The wait an upstream answer asks every caller to observe, in seconds; None if none.

    - status 429 with `Retry-After` (delay-seconds or HTTP-date);
    - any status with `X-RateLimit-Remaining: 0` (or `RateLimit-Remaining: 0`) and a reset
      in `X-RateLimit-Reset` / `RateLimit-Reset` / `X-RateLimit-Reset-After`: a number
      >= 1e12 is epoch milliseconds, >= 1e9 epoch seconds, anything smaller seconds from now.
    """
    if status == 429:
        asked = parse_retry_after(headers.get("Retry-After"), wall)
        if asked is not None and asked > 0:
            return asked
    remaining = next((headers[h] for h in _REMAINING_HEADERS if h in headers), None)
    if remaining is None or remaining.strip() not in ("0", "0.0"):
        return None
    for name in _RESET_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw.strip())
        except ValueError:
            continue
        if not math.isfinite(value) or value < 0:
            continue
        if value >= _EPOCH_MILLIS:
            value = value / 1000.0 - wall
        elif value >= _EPOCH_SECONDS:
            value = value - wall
        return value if value > 0 else None
    return None


class RateLimitStage:
    name = "rate_limit"

    def __init__(self, ctx: StageContext, rl: RateLimit) -> None:
        self.ctx = ctx
        self.upstream = ctx.policy.upstream
        self.key = state_key(ctx.policy.upstream, "rl", ctx.policy.fingerprint("rate_limit"))
        self.interval = 1.0 / rl.rate.per_second
        self.burst = rl.burst
        self.max_wait = rl.queue.max_wait if rl.queue is not None else 0.0
        self.max_size = rl.queue.max_size if rl.queue is not None else 0
        self.respect_upstream = rl.respect_upstream
        retry = ctx.policy.retry
        self.max_pause = retry.max_retry_after if retry is not None else DEFAULT_MAX_PAUSE
        self.waiting = 0  # callers of this process sleeping in the queue now
        # `shared: false` keeps the budget in this process even when --redis is on; an
        # upstream's pause (respect_upstream) is still shared through ctx.state.
        self.limiter = ctx.state if rl.shared else getattr(ctx.state, "local", ctx.state)
        # Synchronous faces (memory backends) for the hot path; None: async protocol only.
        self._take_sync: SyncLimits | None = sync_limits(self.limiter)
        self._state: StateBackend | None = None  # ctx.state as of the last call
        self._pause_sync: SyncLimits | None = None
        self._admitted_at_once = RateLimitWaited(self.upstream, 0.0)  # immutable: sent again and again

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        take = self._take_sync
        if take is None:
            await self._admit(call, self.ctx.clock.now())
        else:
            # The limiter is in process memory: a caller that is neither paused nor queued
            # is admitted with plain calls; any other case goes on in `_admit`.
            state = self.ctx.state
            if state is not self._state:
                self._state, self._pause_sync = state, sync_limits(state)
            pause = self._pause_sync
            paused = pause.paused_for_now(self.key) if pause is not None else await state.paused_for(self.key)
            start = self.ctx.clock.now()
            if paused > 0:
                await self._admit(call, start, paused=paused)
            else:
                reserved = self._take_now(call, take, start)
                if reserved > 0:
                    await self._admit(call, start, reserved=reserved)
                else:
                    self.ctx.events.emit(self._admitted_at_once)
        response = await nxt(call)
        if self.respect_upstream:
            headers = response.headers
            # upstream_wait() is None unless one of these holds (skips the clock otherwise).
            if response.status == 429 or _REMAINING_HEADERS[0] in headers or _REMAINING_HEADERS[1] in headers:
                wait = upstream_wait(response.status, headers, self.ctx.clock.wall())
                if wait is not None:
                    wait = min(wait, self.max_pause)
                    await self.ctx.state.pause(self.key, wait)
                    self.ctx.events.emit(UpstreamPaused(self.upstream, wait))
        return response

    def _take_now(self, call: Call, take: SyncLimits, start: float) -> float:
        """One GCRA take from a limiter in memory for a caller that found no pause at
        `start`: the wait of the slot it got (0: go now); raises when refused."""
        max_wait = self.max_wait
        full = max_wait > 0 and self.waiting >= self.max_size
        if full:
            room = 0.0
        else:
            room = min(start + max_wait, call.deadline) - start
            if room < 0.0:
                room = 0.0
        decision = take.rate_take_now(self.key, self.interval, self.burst, room)
        if not decision.allowed:
            self._reject("queue_full" if full else "max_wait", decision.wait)
        return decision.wait

    async def _admit(
        self, call: Call, start: float, *, paused: float | None = None, reserved: float | None = None
    ) -> None:
        """Admit a caller that arrived at `start`, queueing it if need be. `paused`: the pause
        it already found; `reserved`: the wait of the slot it already holds."""
        clock, state = self.ctx.clock, self.ctx.state
        # The latest moment this caller may still be waiting in the queue.
        give_up = min(start + self.max_wait, call.deadline)
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
                    paused = None
                    continue
                paused = None
                full = self.max_wait > 0 and self.waiting >= self.max_size
                room = 0.0 if full else max(give_up - clock.now(), 0.0)
                decision = await self.limiter.rate_take(
                    self.key, interval=self.interval, burst=self.burst, max_wait=room
                )
                if not decision.allowed:
                    self._reject("queue_full" if full else "max_wait", decision.wait)
                if decision.wait <= 0:
                    break
                reserved = decision.wait
            await self._sleep(reserved)
            reserved = None
            # A pause that began while this caller waited holds it too (its slot is lost).
            if await state.paused_for(self.key) <= 0:
                break
        self.ctx.events.emit(RateLimitWaited(self.upstream, clock.now() - start))

    async def _sleep(self, seconds: float) -> None:
        self.waiting += 1
        try:
            await self.ctx.clock.sleep(seconds)
        finally:
            self.waiting -= 1

    def _reject(self, reason: str, retry_after: float) -> NoReturn:
        self.ctx.events.emit(RateLimited(self.upstream, reason))
        raise ProxyError(
            "rate_limited",
            f"rate limit of upstream {self.upstream} reached ({reason})",
            retry_after=retry_after,
            detail=reason,
        )

    async def snapshot(self) -> dict[str, object]:
        """Rate-limit use for the status page."""
        return {
            "rate_per_second": 1.0 / self.interval,
            "burst": self.burst,
            "waiting": self.waiting,
            "queue_max_size": self.max_size,
            "queue_max_wait": self.max_wait,
            "paused_for": await self.ctx.state.paused_for(self.key),
        }


def build(ctx: StageContext) -> RateLimitStage | None:
    rl = ctx.policy.rate_limit
    if rl is None:
        return None
    return RateLimitStage(ctx, rl)
