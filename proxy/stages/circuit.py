"""Circuit breaking: fail fast while an upstream is failing, probe it, then recover.

`CircuitBreaker` is not a wrapper: the attempt loop (proxy/upstream.py) asks it to admit
each attempt (`admit_now`, or `admit` for a state backend with only async operations),
then records the attempt's verdict (`record_now`/`record`) or, for an attempt that says
nothing about the upstream, gives a half-open trial slot back (`release_now`/`release`),
in a `finally`. So it counts every attempt, retries included. Failures are
attempts that ended in `upstream_unreachable` / `upstream_timeout` or a 5xx answer; 4xx
and 429 are the upstream working as designed and count as successes. A call refused by
the rate limiter below (a local 429) says nothing about the upstream and is not counted.
The state lives in the state backend (one circuit for every replica with Redis).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NoReturn

from proxy.errors import ProxyError
from proxy.events import CircuitChanged
from proxy.model import Response
from proxy.state.base import CircuitAdmission, CircuitSettings, SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import CircuitBreaker as CircuitSettingsBlock
    from proxy.pipeline import StageContext

log = logging.getLogger("egressd.circuit")

FAILURE_CODES = frozenset({"upstream_unreachable", "upstream_timeout"})


def verdict(result: Response | ProxyError) -> bool | None:
    """True: the attempt failed; False: the upstream worked (4xx and 429 included); None:
    the result says nothing about the upstream (refused by the rate limiter, a token or
    body problem of this proxy)."""
    if isinstance(result, Response):
        return result.status >= 500
    return True if result.code in FAILURE_CODES else None


class CircuitBreaker:
    """The circuit of one upstream under one policy (its state in the state backend)."""

    name = "circuit_breaker"

    def __init__(self, ctx: StageContext, cb: CircuitSettingsBlock) -> None:
        self.ctx = ctx
        self.upstream = ctx.policy.upstream
        self.key = state_key(ctx.policy.upstream, "cb", ctx.policy.fingerprint("circuit_breaker"))
        self.settings = CircuitSettings(
            window=cb.window,
            min_requests=cb.min_requests,
            failure_rate=cb.failure_rate,
            open_for=cb.open_for,
            half_open_requests=cb.half_open_requests,
        )
        # The last state this breaker saw; None until the first observation, so that a
        # rebuilt breaker (reload) does not report a change it did not witness.
        self._seen: str | None = None
        # The backend's synchronous face (memory); None: only the async operations (Redis).
        # (ctx.state is one object for the breaker's life: the runtime builds one per load.)
        self.sync: SyncLimits | None = sync_limits(ctx.state)

    # -- synchronous: state in process memory (`self.sync` is not None) ----------------------
    def admit_now(self) -> bool:
        """Admit one attempt: returns whether it is a half-open trial; raises
        `circuit_open` when the circuit refuses it."""
        sync = self.sync
        assert sync is not None
        admission = sync.circuit_admit_now(self.key, self.settings)
        if admission.state != self._seen:
            self._observe(admission.state)
        if not admission.allowed:
            self._refuse(admission)
        return admission.trial

    def record_now(self, failure: bool, trial: bool) -> None:
        assert self.sync is not None
        transition = self.sync.circuit_record_now(self.key, self.settings, failure, trial)
        if transition.after != transition.before:
            self._changed(transition.before, transition.after)

    def release_now(self) -> None:
        """Give back a half-open trial slot whose attempt ended without a verdict."""
        assert self.sync is not None
        self.sync.circuit_release_now(self.key, self.settings)

    # -- the same steps through the async state protocol (Redis) ----------------------------
    async def admit(self) -> bool:
        admission = await self.ctx.state.circuit_admit(self.key, self.settings)
        self._observe(admission.state)
        if not admission.allowed:
            self._refuse(admission)
        return admission.trial

    async def record(self, failure: bool, trial: bool) -> None:
        transition = await self.ctx.state.circuit_record(self.key, self.settings, failure=failure, trial=trial)
        if transition.after != transition.before:
            self._changed(transition.before, transition.after)

    async def release(self) -> None:
        await self.ctx.state.circuit_release(self.key, self.settings)

    def _refuse(self, admission: CircuitAdmission) -> NoReturn:
        raise ProxyError(
            "circuit_open",
            f"circuit of upstream {self.upstream} is {admission.state.replace('_', '-')}",
            retry_after=admission.retry_after,
            detail=admission.state,
        )

    def _observe(self, current: str) -> None:
        if self._seen is not None and current != self._seen:
            self._changed(self._seen, current)
        self._seen = current

    def _changed(self, before: str, after: str) -> None:
        self._seen = after
        self.ctx.events.emit(CircuitChanged(self.upstream, after, before))
        log.warning("circuit of upstream %s: %s -> %s", self.upstream, before, after)

    async def snapshot(self) -> dict[str, object]:
        """Circuit state for the status page."""
        state = await self.ctx.state.circuit_state(self.key, self.settings)
        return {
            "state": state,
            "window": self.settings.window,
            "min_requests": self.settings.min_requests,
            "failure_rate": self.settings.failure_rate,
            "open_for": self.settings.open_for,
            "half_open_requests": self.settings.half_open_requests,
        }


def build(ctx: StageContext) -> CircuitBreaker | None:
    cb = ctx.policy.circuit_breaker
    if cb is None:
        return None
    return CircuitBreaker(ctx, cb)
