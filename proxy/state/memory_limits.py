"""Rate limiting, upstream pauses, retry budgets and circuit breakers in process memory.

`MemoryLimits` is a mixin: `MemoryState` sets `self.clock` and then calls
`MemoryLimits.__init__(self)`. Each public operation below is self-contained (reads one
key's record, decides, writes it back, never awaits in between), so each maps onto one
Redis Lua script with the same arithmetic; `proxy/state/base.py` documents the
semantics both backends share.

Memory stays bounded: a record that carries no information any more (a GCRA TAT in the
past, an expired pause, a window whose buckets all slid out, a closed circuit with an
empty window) is equivalent to "no record", so a sweep drops it. The sweep runs at most
once per `SWEEP_EVERY` seconds of clock time, from inside the operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from proxy.clock import Clock
from proxy.state.base import CircuitAdmission, CircuitSettings, CircuitTransition, RateDecision, SyncLimits

# Sliding windows (retry budget, circuit breaker) are kept as this many buckets of
# window/BUCKETS seconds each: memory per key is constant whatever the request rate,
# and a Redis hash of BUCKETS fields does the same.
BUCKETS = 10
SWEEP_EVERY = 60.0
# A refused half-open caller is told to come back after this long (trial calls are
# usually quick; the real answer comes from the trials themselves).
HALF_OPEN_RETRY_AFTER = 1.0
# Float slack so that "wait exactly max_wait" and "exactly on time" are admitted.
_EPS = 1e-9


@dataclass(slots=True)
class _Window:
    """Counts in buckets of `width` seconds; bucket index = floor(now / width).

    `total_a` / `total_b` are the running sums over the buckets held (kept up to date by
    `add` and `_prune`), so reading the totals costs nothing whatever the traffic.
    """

    width: float
    buckets: dict[int, list[int]] = field(default_factory=dict)  # index -> [a, b]
    total_a: int = 0
    total_b: int = 0
    pruned_at: int | None = None  # the bucket index of the last prune
    # The bucket `add` wrote last and the times it covers: most adds land in it again.
    current: list[int] | None = None
    current_from: float = 0.0
    current_until: float = 0.0

    def _prune(self, now: float) -> int:
        current = math.floor(now / self.width)
        if current != self.pruned_at:  # within one bucket nothing more can slide out
            self.pruned_at = current
            oldest = current - BUCKETS + 1
            for index in [i for i in self.buckets if i < oldest]:
                counts = self.buckets.pop(index)
                self.total_a -= counts[0]
                self.total_b -= counts[1]
        return current

    def add(self, now: float, a: int, b: int) -> None:
        counts = self.current
        if counts is None or not self.current_from <= now < self.current_until:
            # A new bucket (the prune can only matter here: within one bucket nothing slides out).
            index = self._prune(now)
            counts = self.buckets.get(index)
            if counts is None:
                counts = self.buckets[index] = [0, 0]
            self.current = counts
            self.current_from, self.current_until = _bucket_span(index, self.width)
        counts[0] += a
        counts[1] += b
        self.total_a += a
        self.total_b += b

    def totals(self, now: float) -> tuple[int, int]:
        self._prune(now)
        return self.total_a, self.total_b

    def empty(self, now: float) -> bool:
        self._prune(now)
        return not self.buckets


def _bucket_span(index: int, width: float) -> tuple[float, float]:
    """[lo, hi): exactly the times t with floor(t / width) == index. `index * width` can be
    an ulp off that edge (1.7 / 0.1 floors to 17, yet 1.7 < 17 * 0.1), so each bound is
    moved by ulps until it agrees with the division the window (and the Redis script)
    files a time by."""
    lo, hi = index * width, (index + 1) * width
    while math.floor(lo / width) < index:
        lo = math.nextafter(lo, math.inf)
    while math.floor(math.nextafter(lo, -math.inf) / width) >= index:
        lo = math.nextafter(lo, -math.inf)
    while math.floor(hi / width) <= index:
        hi = math.nextafter(hi, math.inf)
    while math.floor(math.nextafter(hi, -math.inf) / width) > index:
        hi = math.nextafter(hi, -math.inf)
    return lo, hi


@dataclass(slots=True)
class _Circuit:
    state: str = "closed"  # closed | open | half_open
    open_until: float = 0.0  # open: when trials may start
    window: _Window | None = None  # closed: [total, failures]
    window_setting: float = 0.0  # the `window` (seconds) the window above was made for
    trials_admitted: int = 0  # half_open: trial slots handed out
    trials_passed: int = 0  # half_open: trials that succeeded
    last_trial_at: float = 0.0  # half_open: when the last slot was handed out


class MemoryLimits:
    """The rate/pause/budget/circuit part of `StateBackend`, in process memory."""

    clock: Clock

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}
        self._pauses: dict[str, float] = {}
        self._budgets: dict[str, _Window] = {}
        self._circuits: dict[str, _Circuit] = {}
        self._last_sweep = self.clock.now()

    # -- housekeeping ----------------------------------------------------------------------
    def _maybe_sweep(self, now: float) -> None:
        if now - self._last_sweep < SWEEP_EVERY:
            return
        self._last_sweep = now
        self.sweep_limits(now)

    def sweep_limits(self, now: float | None = None) -> None:
        """Drop every record that is equivalent to having none (bounds memory)."""
        now = self.clock.now() if now is None else now
        for key in [k for k, tat in self._tat.items() if tat <= now]:
            del self._tat[key]
        for key in [k for k, until in self._pauses.items() if until <= now]:
            del self._pauses[key]
        for key in [k for k, w in self._budgets.items() if w.empty(now)]:
            del self._budgets[key]
        for key in [k for k, c in self._circuits.items() if _idle_circuit(c, now)]:
            del self._circuits[key]

    def limits_size(self) -> int:
        """How many records are held (for tests and the status page)."""
        return len(self._tat) + len(self._pauses) + len(self._budgets) + len(self._circuits)

    # -- the synchronous face ---------------------------------------------------------------
    @property
    def sync_limits(self) -> SyncLimits | None:
        """This backend as plain (non-async) calls, for the stages' in-process fast path.

        Each `*_now` method below is the whole operation (the async protocol methods only
        wrap them), so a stage may call it directly instead of awaiting a coroutine. None
        when a subclass overrides an async operation (e.g. a test double that yields in
        it): then only the async protocol tells the whole story.
        """
        cls = type(self)
        for name in _ASYNC_OPERATIONS:
            if getattr(cls, name) is not getattr(MemoryLimits, name):
                return None
        return self

    # -- rate limiting (GCRA) --------------------------------------------------------------
    def rate_take_now(self, key: str, interval: float, burst: int, max_wait: float) -> RateDecision:
        """GCRA with emission interval `interval` and `burst` calls allowed back to back.

        TAT (theoretical arrival time) is stored per key. A call may go at
        `allow_at = max(TAT, now) - (burst - 1) * interval`. If it would wait at most
        `max_wait`, the slot is reserved (TAT += interval) and the wait returned; a later
        caller therefore always gets a later slot (FIFO). Otherwise nothing changes.
        """
        now = self.clock.now()
        if now - self._last_sweep >= SWEEP_EVERY:
            self._maybe_sweep(now)
        tolerance = (burst - 1) * interval if burst > 1 else 0.0
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        wait = tat - tolerance - now
        if wait < 0.0:
            wait = 0.0
        if wait <= max_wait + _EPS:
            self._tat[key] = tat + interval
            return _ADMIT_NOW if wait == 0.0 else RateDecision(True, wait)
        return RateDecision(False, wait)

    def rate_take_free_now(self, key: str, interval: float, burst: int) -> bool:
        """The common case of `paused_for_now` + `rate_take_now(max_wait=0)` in one step:
        take a slot that is free now unless `key` is paused. False changes nothing."""
        now = self.clock.now()
        if self._pauses:
            until = self._pauses.get(key)
            if until is not None and until > now:
                return False
        if now - self._last_sweep >= SWEEP_EVERY:
            self._maybe_sweep(now)
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        if tat - ((burst - 1) * interval if burst > 1 else 0.0) - now > _EPS:
            return False  # the next free slot is later: a wait, which only rate_take can grant
        self._tat[key] = tat + interval
        return True

    async def rate_take(self, key: str, *, interval: float, burst: int, max_wait: float) -> RateDecision:
        return self.rate_take_now(key, interval, burst, max_wait)

    def pause_now(self, key: str, seconds: float) -> None:
        if seconds <= 0:
            return
        now = self.clock.now()
        self._maybe_sweep(now)
        until = now + seconds
        if until > self._pauses.get(key, 0.0):
            self._pauses[key] = until

    async def pause(self, key: str, seconds: float) -> None:
        self.pause_now(key, seconds)

    def paused_for_now(self, key: str) -> float:
        until = self._pauses.get(key)
        if until is None:
            return 0.0
        left = until - self.clock.now()
        if left <= 0:
            del self._pauses[key]
            return 0.0
        return left

    async def paused_for(self, key: str) -> float:
        return self.paused_for_now(key)

    # -- retry budget ----------------------------------------------------------------------
    def _budget(self, key: str, window: float) -> _Window:
        width = window / BUCKETS
        w = self._budgets.get(key)
        if w is None or w.width != width:
            w = self._budgets[key] = _Window(width)
        return w

    def budget_record_now(self, key: str, window: float, retry: bool) -> None:
        now = self.clock.now()
        self._maybe_sweep(now)
        # [requests, retries]
        self._budget(key, window).add(now, 0 if retry else 1, 1 if retry else 0)

    async def budget_record(self, key: str, *, window: float, retry: bool) -> None:
        self.budget_record_now(key, window, retry)

    def budget_try_retry_now(self, key: str, window: float, ratio: float, min_per_second: float) -> bool:
        """Take one retry from the budget if retries in the window stay under
        `ratio * requests + min_per_second * window`; True when taken (and recorded)."""
        now = self.clock.now()
        self._maybe_sweep(now)
        w = self._budgets.get(key)
        requests, retries = (0, 0) if w is None or w.width != window / BUCKETS else w.totals(now)
        if retries >= ratio * requests + min_per_second * window:
            return False
        self._budget(key, window).add(now, 0, 1)
        return True

    async def budget_try_retry(self, key: str, *, window: float, ratio: float, min_per_second: float) -> bool:
        return self.budget_try_retry_now(key, window, ratio, min_per_second)

    # -- circuit breaker -------------------------------------------------------------------
    def circuit_admit_now(self, key: str, settings: CircuitSettings) -> CircuitAdmission:
        """closed: admit. open: refuse until `open_for` is over, then turn half-open.

        half_open: hand out exactly `half_open_requests` trial slots; extra callers are
        refused. If every slot is out and no verdict came for `open_for` (trial callers
        vanished), the unanswered slots are handed out again.
        """
        c = self._circuits.get(key)
        if c is None or c.state == "closed":
            return _ADMIT_CLOSED  # (the sweep runs from circuit_record_now, which follows)
        now = self.clock.now()
        if now - self._last_sweep >= SWEEP_EVERY:
            self._maybe_sweep(now)
        if c.state == "open":
            if now < c.open_until:
                return CircuitAdmission(False, "open", False, c.open_until - now)
            c.state = "half_open"
            c.window = None
            c.trials_admitted = c.trials_passed = 0
        if c.trials_admitted >= settings.half_open_requests and now - c.last_trial_at >= settings.open_for:
            c.trials_admitted = c.trials_passed  # the unanswered trials are lost
        if c.trials_admitted < settings.half_open_requests:
            c.trials_admitted += 1
            c.last_trial_at = now
            return CircuitAdmission(True, "half_open", True, 0.0)
        return CircuitAdmission(False, "half_open", False, HALF_OPEN_RETRY_AFTER)

    async def circuit_admit(self, key: str, settings: CircuitSettings) -> CircuitAdmission:
        return self.circuit_admit_now(key, settings)

    def circuit_record_now(self, key: str, settings: CircuitSettings, failure: bool, trial: bool) -> CircuitTransition:
        """Count one result. Trials decide a half-open circuit; others feed the window.

        Results that arrive in a state they were not admitted in (a slow call admitted
        while closed that ends after the circuit opened, a trial that ends after another
        trial reopened the circuit) are ignored.
        """
        now = self.clock.now()
        if now - self._last_sweep >= SWEEP_EVERY:
            self._maybe_sweep(now)
        c = self._circuits.get(key)
        if c is None:
            c = self._circuits[key] = _Circuit()
        before = c.state
        if trial:
            if before != "half_open":
                return _UNCHANGED[before]
            if failure:
                _open(c, now, settings)
            else:
                c.trials_passed += 1
                if c.trials_passed >= settings.half_open_requests:
                    c.state = "closed"
                    c.window = None  # a fresh window
                    c.trials_admitted = c.trials_passed = 0
            return CircuitTransition(before, c.state)
        if before != "closed":
            return _UNCHANGED[before]
        w = c.window
        if w is None or c.window_setting != settings.window:
            w = c.window = _Window(settings.window / BUCKETS)
            c.window_setting = settings.window
        counts = w.current
        if counts is not None and w.current_from <= now < w.current_until:
            # `_Window.add` for the bucket it wrote last, inline: this runs on every call.
            counts[0] += 1
            w.total_a += 1
            if failure:
                counts[1] += 1
                w.total_b += 1
        else:
            w.add(now, 1, 1 if failure else 0)  # [total, failures]; add() prunes, so the sums are current
        total, failures = w.total_a, w.total_b
        if total >= settings.min_requests and failures >= settings.failure_rate * total - _EPS:
            _open(c, now, settings)
            return CircuitTransition(before, c.state)
        return _UNCHANGED_CLOSED

    async def circuit_record(
        self, key: str, settings: CircuitSettings, *, failure: bool, trial: bool
    ) -> CircuitTransition:
        return self.circuit_record_now(key, settings, failure, trial)

    def circuit_release_now(self, key: str, settings: CircuitSettings) -> None:
        """Give back a half-open trial slot whose call ended without a verdict."""
        c = self._circuits.get(key)
        if c is not None and c.state == "half_open" and c.trials_admitted > c.trials_passed:
            c.trials_admitted -= 1

    async def circuit_release(self, key: str, settings: CircuitSettings) -> None:
        self.circuit_release_now(key, settings)

    async def circuit_state(self, key: str, settings: CircuitSettings) -> str:
        """The state a caller would meet now (an open circuit past `open_for` reads half_open)."""
        c = self._circuits.get(key)
        if c is None:
            return "closed"
        if c.state == "open" and self.clock.now() >= c.open_until:
            return "half_open"
        return c.state


# Shared immutable answers for the common cases (the values are frozen dataclasses).
_ADMIT_NOW = RateDecision(True, 0.0)
_ADMIT_CLOSED = CircuitAdmission(True, "closed", False, 0.0)
_UNCHANGED = {s: CircuitTransition(s, s) for s in ("closed", "open", "half_open")}
_UNCHANGED_CLOSED = _UNCHANGED["closed"]
_ASYNC_OPERATIONS = (
    "rate_take",
    "pause",
    "paused_for",
    "budget_record",
    "budget_try_retry",
    "circuit_admit",
    "circuit_record",
    "circuit_release",
    "circuit_state",
)


def _open(c: _Circuit, now: float, settings: CircuitSettings) -> None:
    c.state = "open"
    c.open_until = now + settings.open_for
    c.window = None
    c.trials_admitted = c.trials_passed = 0


def _idle_circuit(c: _Circuit, now: float) -> bool:
    return c.state == "closed" and (c.window is None or c.window.empty(now))
