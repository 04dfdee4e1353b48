"""Rate limiting: GCRA admission per attempt, a bounded FIFO queue, upstream back-pressure.

`RateLimiter` is not a wrapper: the attempt loop (proxy/upstream.py) asks it to admit
each attempt (`admit_now`, the synchronous common case; `admit`, the queue, pauses and
refusals and the async state backends), and shows it each answer (`pause_asked`, then
`pause_now`/`pause`). Every attempt, retries included, takes one GCRA slot from the
state backend. A slot granted with a wait is a reservation, so callers
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

from multidict import istr

from proxy.errors import ProxyError
from proxy.events import RateLimited, RateLimitWaited, UpstreamPaused
from proxy.model import Call, Response
from proxy.stages.retry import parse_retry_after
from proxy.state.base import StateBackend, SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import RateLimit
    from proxy.pipeline import StageContext
    from proxy.runtime import Drain

DEFAULT_MAX_PAUSE = 60.0
_EPS = 1e-9
# Epoch thresholds for X-RateLimit-Reset: above these a number is a timestamp, below
# them a count of seconds from now (GitHub/Twitter send epoch seconds, others a delta).
_EPOCH_SECONDS = 1e9
_EPOCH_MILLIS = 1e12
# istr: looked up in a CIMultiDict without case-folding the name again on every call.
_REMAINING_HEADERS = (istr("X-RateLimit-Remaining"), istr("RateLimit-Remaining"))
_RESET_HEADERS = (istr("X-RateLimit-Reset"), istr("RateLimit-Reset"), istr("X-RateLimit-Reset-After"))


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


class RateLimiter:
    """The rate limit of one upstream under one policy."""

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
        self._released = -1e18  # clock.now() at which the last queued caller of this process left
        # The process's drain (proxy/runtime.py): a caller still queued when it ends gets
        # 503 `draining` (contract 7.3). None outside a server (tests of the stage alone).
        self.drain: Drain | None = ctx.extras.get("drain")
        # Where the GCRA slots come from: `shared: false` keeps the budget in this process
        # even when --redis is on; an upstream's pause (respect_upstream) is still shared
        # through ctx.state.
        self.slots: StateBackend = ctx.state if rl.shared else getattr(ctx.state, "local", ctx.state)
        # Synchronous faces (memory backends); None: that state has only async operations.
        # (ctx.state is one object for the limiter's life: the runtime builds one per load.)
        self.take_sync: SyncLimits | None = sync_limits(self.slots)
        self.pause_sync: SyncLimits | None = sync_limits(ctx.state)
        # Calls admitted at once are tallied, not sent as events (proxy/events.py).
        self._admitted_at_once = ctx.events.tally(RateLimitWaited(self.upstream, 0.0))

    # -- admission ---------------------------------------------------------------------------
    def admit_now(self) -> bool:
        """Admit an attempt that finds no pause and a free slot now (both states in
        memory). False, having changed nothing, for anything else (a pause, a wait in the
        queue, a refusal with its reason, an async state): then `await admit(call)`."""
        take, pause = self.take_sync, self.pause_sync
        if take is None or pause is None:
            return False
        if take is pause:  # one backend holds both the pause and the budget
            if not take.rate_take_free_now(self.key, self.interval, self.burst):
                return False
        elif (
            pause.paused_for_now(self.key) > 0
            or not take.rate_take_now(self.key, self.interval, self.burst, 0.0).allowed
        ):
            return False  # (max_wait 0: a slot that is free now is taken, else nothing changes)
        self._admitted_at_once.n += 1
        return True

    async def admit(self, call: Call) -> None:
        """Admit an attempt, queueing it if need be; raises `rate_limited` to refuse it.
        Each state operation uses the synchronous face of its state where there is one."""
        clock = self.ctx.clock
        start = clock.now()
        # The latest moment this caller may still be waiting in the queue.
        give_up = min(start + self.max_wait, call.deadline)
        paused: float | None = None
        reserved: float | None = None
        slept = False
        queued = False  # slept for a reserved slot (not only for a pause)
        while True:
            if reserved is None:
                if paused is None:
                    paused = await self._paused_for()
                if paused > 0:
                    if self.max_wait <= 0 or clock.now() + paused > give_up + _EPS:
                        self._reject("paused", paused)
                    if self.waiting >= self.max_size:
                        self._reject("queue_full", paused)
                    await self._sleep(paused)
                    slept = True
                    paused = None
                    continue
                paused = None
                full = self.max_wait > 0 and self.waiting >= self.max_size
                room = 0.0 if full else max(give_up - clock.now(), 0.0)
                take = self.take_sync
                if take is not None:
                    decision = take.rate_take_now(self.key, self.interval, self.burst, room)
                else:
                    decision = await self.slots.rate_take(
                        self.key, interval=self.interval, burst=self.burst, max_wait=room
                    )
                if not decision.allowed:
                    self._reject("queue_full" if full else "max_wait", decision.wait)
                if decision.wait <= _EPS:  # due now (float residue of the TAT sums is no wait)
                    break
                reserved = decision.wait
            await self._sleep(reserved)
            slept = queued = True
            reserved = None
            # A pause that began while this caller waited holds it too (its slot is lost).
            if await self._paused_for() <= 0:
                break
        if queued:
            # Queued callers leave one interval apart even when the loop woke several at
            # once (a stall made their slots all pass): the upstream never sees the burst
            # a stall would make of them (a provider counting in short windows answers 429).
            now = clock.now()
            leave = max(now, self._released + self.interval)
            self._released = leave
            if leave - now > _EPS:
                await self._sleep(leave - now)
        if slept:
            waited = clock.now() - start
            if call.story is not None:
                call.story.held_seconds += waited  # a wait the policy asked for: not egressd's overhead
            self.ctx.events.emit(RateLimitWaited(self.upstream, waited))
        else:  # admitted without a wait (the time a state backend took is no queue wait)
            self._admitted_at_once.n += 1

    async def _paused_for(self) -> float:
        pause = self.pause_sync
        if pause is not None:
            return pause.paused_for_now(self.key)
        return await self.ctx.state.paused_for(self.key)

    async def _sleep(self, seconds: float) -> None:
        self.waiting += 1
        try:
            drain = self.drain
            if drain is None:
                await self.ctx.clock.sleep(seconds)
            elif not await drain.sleep(self.ctx.clock, seconds):
                # Never sent: the app may send it again, to another replica (Retry-After).
                raise ProxyError(
                    "draining",
                    f"egressd is shutting down: the call was still waiting in the rate-limit queue of "
                    f"upstream {self.upstream} when the drain ended",
                    retry_after=1,
                )
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

    # -- the upstream's answer -----------------------------------------------------------------
    def pause_asked(self, response: Response) -> float | None:
        """The pause this answer asks for (capped), with `respect_upstream`; else None."""
        if not self.respect_upstream:
            return None
        headers = response.headers
        # upstream_wait() is None unless one of these holds (skips the clock otherwise).
        if response.status == 429 or _REMAINING_HEADERS[0] in headers or _REMAINING_HEADERS[1] in headers:
            wait = upstream_wait(response.status, headers, self.ctx.clock.wall())
            if wait is not None:
                return min(wait, self.max_pause)
        return None

    def pause_now(self, seconds: float) -> None:
        """Pause the upstream's whole budget (state in memory: `pause_sync` is not None)."""
        assert self.pause_sync is not None
        self.pause_sync.pause_now(self.key, seconds)
        self.ctx.events.emit(UpstreamPaused(self.upstream, seconds))

    async def pause(self, seconds: float) -> None:
        await self.ctx.state.pause(self.key, seconds)
        self.ctx.events.emit(UpstreamPaused(self.upstream, seconds))

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


def build(ctx: StageContext) -> RateLimiter | None:
    rl = ctx.policy.rate_limit
    if rl is None:
        return None
    return RateLimiter(ctx, rl)
