"""The retry loop: tries a call again when that is both useful and safe.

Safety first: an unsafe method (any method outside `IDEMPOTENT_METHODS`: POST, PATCH,
extension methods) that may have reached the upstream's application is retried only if
the provider deduplicates it by an idempotency key (the idempotency stage, outside this
one, has put the key into the headers). A failure that
provably never reached the application (connect error, a status the plugin calls "not
processed", e.g. 429) may be retried for any method. A timeout or reset after a keyless
POST was sent is never retried.

When the stage gives up on a retryable failure because attempts or the retry budget ran
out, it marks the result as *exhausted* for the failover stage outside it; read that
with `is_exhausted()` (a note on a `Response`, an attribute on a `ProxyError`).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import math
import random
from typing import TYPE_CHECKING, Literal

from proxy.errors import ProxyError
from proxy.events import RetryScheduled, RetrySkipped
from proxy.model import Call, Response, unsafe_method
from proxy.pipeline import Flow, Guard, Handler, Result, StageContext
from proxy.stages.idempotency import dedupes_on_key
from proxy.state.base import SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import Retry

_ERROR_WORD = {"upstream_unreachable": ("connect_error", "reset"), "upstream_timeout": ("timeout",)}


def mark_exhausted(result: Response | ProxyError) -> None:
    """Record that retries for this result ran out (read by failover via `is_exhausted`)."""
    if isinstance(result, Response):
        result.notes["exhausted"] = True
    else:
        result.exhausted = True  # type: ignore[attr-defined]


def is_exhausted(result: Response | BaseException) -> bool:
    if isinstance(result, Response):
        return bool(result.notes.get("exhausted"))
    return bool(getattr(result, "exhausted", False))


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


class RetryStage(Guard):
    name = "retry"

    def __init__(self, ctx: StageContext, retry: Retry) -> None:
        self.ctx = ctx
        self.retry = retry
        self.upstream = ctx.policy.upstream
        self.on_status = frozenset(v for v in retry.on if isinstance(v, int))
        self.on_words = frozenset(v for v in retry.on if isinstance(v, str))
        self.max_body = ctx.policy.limits.max_body
        self.budget_key = state_key(ctx.policy.upstream, "budget", ctx.policy.fingerprint("retry"))
        self.rng = random.Random()
        # The state's synchronous face (memory) for the guard's steps; None: async only.
        # (ctx.state is one object for the stage's life: the runtime builds a stage per load.)
        self._sync: SyncLimits | None = sync_limits(ctx.state)
        self._may_retry = retry.attempts > 1
        self._budget_settings = retry.budget

    # -- what is retryable -----------------------------------------------------------------
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

    # -- the loop --------------------------------------------------------------------------
    async def __call__(self, call: Call, nxt: Handler) -> Response:
        body = call.body
        if self._needs_buffering(call):
            await body.read()  # small enough to keep: makes the call replayable
        budget = self._budget_settings
        if budget is not None:
            await self.ctx.state.budget_record(self.budget_key, window=budget.window, retry=False)
        result: Response | ProxyError
        try:
            result = await nxt(call)
        except ProxyError as exc:
            result = exc
        settled = self.leave(call, None, result)
        if isinstance(settled, Response):
            return settled
        return await self.resume(call, result, nxt)

    def _needs_buffering(self, call: Call) -> bool:
        body = call.body
        return self._may_retry and not body.replayable and body.length is not None and body.length <= self.max_body

    def enter(self, call: Call) -> Flow | None:
        """Count the request in the budget (state in memory) for a call whose body needs no
        buffering; anything else goes to `__call__`."""
        body = call.body  # `_needs_buffering`, inline (one call less on every request)
        if self._may_retry and not body.replayable and body.length is not None and body.length <= self.max_body:
            return Flow.ASYNC  # the body must be read (buffered) first: an await
        budget = self._budget_settings
        if budget is not None:
            if self._sync is None:
                return Flow.ASYNC
            self._sync.budget_record_now(self.budget_key, budget.window, False)
        return None

    def leave(self, call: Call, ticket: None, result: Result) -> Result | Literal[Flow.RESUME]:
        # The common case: an answer no status rule or `Stripe-Should-Retry` can make
        # retryable (`_reason` is None for it), so there is nothing to decide.
        if type(result) is Response and result.status < 400 and result.status not in self.on_status:
            result.attempts = 1
            return result
        return Flow.RESUME

    async def resume(self, call: Call, result: Result, nxt: Handler) -> Response:
        """Go on after the first attempt ended in `result`: retry while useful and safe."""
        attempt = 1
        while True:
            skip = await self._why_not_retry(call, result, attempt)
            if not isinstance(skip, float):
                return self._finish(result, attempt, skip)
            await self._before_retry(result, skip)
            attempt += 1
            try:
                result = await nxt(call)
            except ProxyError as exc:
                result = exc

    async def _why_not_retry(self, call: Call, result: Response | ProxyError, attempt: int) -> float | str | None:
        """The delay before the next try (float), or why not to retry (str), or None."""
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
        budget = self.retry.budget
        if budget is not None:
            # One atomic check-and-take: concurrent callers cannot all pass the check
            # before any of them records its retry.
            sync = self._sync
            if sync is not None:
                allowed = sync.budget_try_retry_now(self.budget_key, budget.window, budget.ratio, budget.min_per_second)
            else:
                allowed = await self.ctx.state.budget_try_retry(
                    self.budget_key,
                    window=budget.window,
                    ratio=budget.ratio,
                    min_per_second=budget.min_per_second,
                )
            if not allowed:
                return "budget"
        self.ctx.events.emit(RetryScheduled(self.upstream, reason, delay))
        return delay

    async def _before_retry(self, result: Response | ProxyError, delay: float) -> None:
        if isinstance(result, Response):
            await result.close()  # free the connection of the failed answer
        await self.ctx.clock.sleep(delay)

    def _finish(self, result: Response | ProxyError, attempts: int, skip: str | None) -> Response:
        if skip is not None and skip != "exhausted":
            self.ctx.events.emit(RetrySkipped(self.upstream, skip))
        if skip in ("exhausted", "budget"):
            mark_exhausted(result)
        if isinstance(result, Response):
            result.attempts = attempts
            if skip is not None and skip != "exhausted":
                result.notes["retry_skipped"] = skip
            return result
        result.attempts = attempts  # type: ignore[attr-defined]
        raise result


def build(ctx: StageContext) -> RetryStage | None:
    retry = ctx.policy.retry
    if retry is None:
        return None
    return RetryStage(ctx, retry)
