"""The retry loop: tries a call again when that is both useful and safe.

Safety first: an unsafe method (any method outside `IDEMPOTENT_METHODS`: POST, PATCH,
extension methods) that may have reached the upstream's application is retried only if
the provider deduplicates it by an idempotency key (the idempotency stage, outside this
one, has put the key into the headers). A failure that
provably never reached the application (connect error, a status the plugin calls "not
processed", e.g. 429) may be retried for any method. A timeout or reset after a keyless
POST was sent is never retried.

`RetryPolicy` is not a wrapper: the attempt loop (proxy/upstream.py) asks it, once per
call, to prepare the call (`begin_now`/`begin`: buffer a small streamed body, count the
request in the `RetryBudget`) and, after each attempt, whether to try again (`settled`,
`decide`, `wait`) or to finish (`finish`). When it gives up on a retryable failure
because attempts or the retry budget ran out, it marks the result as *exhausted* for the
failover stage outside the loop: the typed `exhausted` field of `Response` and
`ProxyError`, read with `is_exhausted()`.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
from typing import TYPE_CHECKING

from proxy.errors import ProxyError
from proxy.events import RetryScheduled, RetrySkipped
from proxy.model import Call, Response, unsafe_method
from proxy.stages.idempotency import dedupes_on_key
from proxy.state.base import SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import Retry
    from proxy.config.schema import RetryBudget as BudgetSettings
    from proxy.pipeline import StageContext
    from proxy.state.base import StateBackend

_ERROR_WORD = {"upstream_unreachable": ("connect_error", "reset"), "upstream_timeout": ("timeout",)}


def mark_exhausted(result: Response | ProxyError) -> None:
    """Record that retries for this result ran out (read by failover via `is_exhausted`)."""
    result.exhausted = True


def is_exhausted(result: Response | BaseException) -> bool:
    if isinstance(result, Response | ProxyError):
        return result.exhausted
    return False


def parse_retry_after(value: str | None, wall: float) -> float | None:
    """Seconds from a `Retry-After` value (delay-seconds or HTTP-date); None when unusable.

    A date in the past gives 0. Garbage, negative numbers and non-finite values give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        return None
    if text[0].isdigit():  # e.g. "1O" or "5s": not a date either
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses as naive; HTTP-dates are GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(when.timestamp() - wall, 0.0)


def backoff_delay(
    retry_index: int, *, initial: float, maximum: float, multiplier: float, jitter: str, rng: random.Random
) -> float:
    """Delay before retry number `retry_index` (0 for the first retry)."""
    try:
        cap = min(maximum, initial * multiplier ** min(retry_index, 1000))
    except OverflowError:
        cap = maximum
    if jitter == "full":
        return rng.uniform(0.0, cap)
    if jitter == "equal":
        return cap / 2 + rng.uniform(0.0, cap / 2)
    return cap


def _should_retry(response: Response) -> str:
    """Stripe's explicit verdict: "true" permits a retry (even of a 429), "false" forbids it."""
    return response.headers.get("Stripe-Should-Retry", "").strip().lower()


class RetryBudget:
    """The share of retries among the requests of a window (`retry.budget`), in the state
    backend: one budget for every replica with Redis. Its synchronous face (memory) is
    used when the backend has one, the async operations otherwise."""

    __slots__ = ("key", "min_per_second", "ratio", "state", "sync", "window")

    def __init__(self, state: StateBackend, key: str, settings: BudgetSettings) -> None:
        self.state = state
        self.key = key
        self.window = settings.window
        self.ratio = settings.ratio
        self.min_per_second = settings.min_per_second
        self.sync: SyncLimits | None = sync_limits(state)

    async def record(self) -> None:
        """Count one request (not a retry) in the window."""
        if self.sync is not None:
            self.sync.budget_record_now(self.key, self.window, False)
        else:
            await self.state.budget_record(self.key, window=self.window, retry=False)

    async def try_retry(self) -> bool:
        """One atomic check-and-take: concurrent callers cannot all pass the check before
        any of them records its retry."""
        if self.sync is not None:
            return self.sync.budget_try_retry_now(self.key, self.window, self.ratio, self.min_per_second)
        return await self.state.budget_try_retry(
            self.key, window=self.window, ratio=self.ratio, min_per_second=self.min_per_second
        )


class RetryPolicy:
    """`retry` of one upstream: what is retryable, whether it is safe, how long to wait.

    Called by the attempt loop (proxy/upstream.py), never wrapping anything itself.
    """

    name = "retry"

    def __init__(self, ctx: StageContext, retry: Retry) -> None:
        self.ctx = ctx
        self.retry = retry
        self.upstream = ctx.policy.upstream
        self.on_status = frozenset(v for v in retry.on if isinstance(v, int))
        self.on_words = frozenset(v for v in retry.on if isinstance(v, str))
        self.max_body = ctx.policy.limits.max_body
        self.rng = random.Random()
        self._may_retry = retry.attempts > 1
        self.budget: RetryBudget | None = None
        if retry.budget is not None:
            key = state_key(ctx.policy.upstream, "budget", ctx.policy.fingerprint("retry"))
            self.budget = RetryBudget(ctx.state, key, retry.budget)
        # The budget's synchronous face, for `begin_now` (None: no budget or async only).
        self._budget_sync = self.budget.sync if self.budget is not None else None

    # -- once per call, before the first attempt --------------------------------------------
    def begin_now(self, call: Call) -> bool:
        """The common case of `begin` without a coroutine: count the request in the budget
        (state in memory) of a call whose body needs no buffering. False, having changed
        nothing, when the call needs `await begin(call)`."""
        body = call.body
        if self._may_retry and not body.replayable and body.length is not None and body.length <= self.max_body:
            return False  # the body must be read (buffered) first: an await
        budget = self.budget
        if budget is not None:
            sync = self._budget_sync
            if sync is None:
                return False
            sync.budget_record_now(budget.key, budget.window, False)
        return True

    async def begin(self, call: Call) -> None:
        """Make the call replayable if its body is small enough to keep, and count it in
        the retry budget."""
        body = call.body
        if self._may_retry and not body.replayable and body.length is not None and body.length <= self.max_body:
            await body.read()
        if self.budget is not None:
            await self.budget.record()

    # -- after each attempt -----------------------------------------------------------------
    def settled(self, result: Response | ProxyError) -> bool:
        """The common case: an answer no status rule or `Stripe-Should-Retry` can make
        retryable (`_reason` is None for it), so there is nothing to decide."""
        return type(result) is Response and result.status < 400 and result.status not in self.on_status

    def _reason(self, result: Response | ProxyError) -> str | None:
        """Why this result deserves a retry (status or error word), or None."""
        if isinstance(result, Response):
            if result.status in self.on_status or (result.status >= 400 and _should_retry(result) == "true"):
                return str(result.status)
            return None
        words = _ERROR_WORD.get(result.code, ())
        word = result.detail if result.detail in words else (words[0] if len(words) == 1 else None)
        if word is not None and word in self.on_words:
            return word
        return None

    def _never_reached(self, result: Response | ProxyError) -> bool:
        if isinstance(result, Response):
            return self.ctx.plugin.not_processed(result.status, result.headers)
        return result.code == "upstream_unreachable" and result.detail == "connect_error"

    def _safe(self, call: Call, result: Response | ProxyError) -> bool:
        if not unsafe_method(call.method) or dedupes_on_key(self.ctx.policy, self.ctx.plugin, call):
            return True
        return self._never_reached(result)

    def _asked_wait(self, result: Response | ProxyError) -> float | None:
        if self.retry.retry_after != "honor" or not isinstance(result, Response):
            return None
        return parse_retry_after(result.headers.get("Retry-After"), self.ctx.clock.wall())

    async def decide(self, call: Call, result: Response | ProxyError, attempt: int) -> float | str | None:
        """After attempt number `attempt` ended in `result`: the delay before the next
        try (float, a `RetryScheduled` is emitted), or why not to retry (str), or None
        when the result is not retryable at all."""
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
            attempt - 1,
            initial=b.initial,
            maximum=b.max,
            multiplier=b.multiplier,
            jitter=b.jitter,
            rng=self.rng,
        )
        asked = self._asked_wait(result)
        if asked is not None:
            if asked > self.retry.max_retry_after:
                return "retry_after"  # not waited out: the upstream's answer goes back now
            delay = max(delay, asked)
        if self.ctx.clock.now() + delay >= call.deadline:
            return "deadline"
        if self.budget is not None and not await self.budget.try_retry():
            return "budget"
        self.ctx.events.emit(RetryScheduled(self.upstream, reason, delay))
        return delay

    async def wait(self, result: Response | ProxyError, delay: float) -> None:
        """Before the next try: free the connection of the failed answer, then wait."""
        if isinstance(result, Response):
            await result.close()
        await self.ctx.clock.sleep(delay)

    def finish(self, result: Response | ProxyError, attempts: int, skip: str | None) -> Response:
        """What goes out after the last attempt: the answer, or the error raised, with
        `attempts` and the typed `exhausted` / `retry_skipped` marks."""
        if skip is not None and skip != "exhausted":
            self.ctx.events.emit(RetrySkipped(self.upstream, skip))
        if skip in ("exhausted", "budget"):
            mark_exhausted(result)
        result.attempts = attempts
        if isinstance(result, Response):
            if skip is not None and skip != "exhausted":
                result.retry_skipped = skip
            return result
        raise result


def build(ctx: StageContext) -> RetryPolicy | None:
    retry = ctx.policy.retry
    if retry is None:
        return None
    return RetryPolicy(ctx, retry)
