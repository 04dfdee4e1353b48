"""The injected clock: every stage reads time and sleeps through one of these.

Tests use `FakeClock` so that backoff, windows, TTLs and queues run in milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    def wall(self) -> float:
        """Seconds since the epoch (for HTTP-dates)."""

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    # The C functions themselves, not Python methods wrapping them: `now()` is read about
    # ten times per call on the hot path.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)


class FakeClock:
    """A virtual clock.

    Sleepers wake, in time order, when `advance()` moves the clock past their time. With
    `auto=True` the clock jumps to the earliest sleeper whenever someone sleeps and no
    earlier sleeper is pending, so code that only waits finishes at once while the
    virtual time it spent is still measurable.
    """

    def __init__(self, start: float = 1000.0, *, wall_start: float = 1_800_000_000.0, auto: bool = True) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._auto = auto
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        if self._auto:
            # Let other ready tasks run (and register their own sleeps) before jumping.
            for _ in range(3):
                await asyncio.sleep(0)
            self._wake_next()
        await fut

    def _wake_next(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        if self._sleepers:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            fut.set_result(None)

    def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            when, _, fut = heapq.heappop(self._sleepers)
            self._now = max(self._now, when)
            if not fut.done():
                fut.set_result(None)
        self._now = target
