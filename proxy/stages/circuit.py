"""Circuit breaking: fail fast while an upstream is failing, probe it, then recover.

The breaker sits inside the retry loop, so it counts every attempt. Failures are
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
from proxy.model import Call, Response
from proxy.pipeline import Flow, Guard, Handler, Result, StageContext
from proxy.state.base import CircuitAdmission, CircuitSettings, SyncLimits, state_key, sync_limits

if TYPE_CHECKING:
    from proxy.config.schema import CircuitBreaker

log = logging.getLogger("egressd.circuit")

FAILURE_CODES = frozenset({"upstream_unreachable", "upstream_timeout"})


class CircuitStage(Guard):
    name = "circuit_breaker"

    def __init__(self, ctx: StageContext, cb: CircuitBreaker) -> None:
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
        # The last state this stage saw; None until the first observation, so that a
        # rebuilt stage (reload) does not report a change it did not witness.
        self._seen: str | None = None
        # The backend's synchronous face (memory) for the guard's steps; None: async only.
        # (ctx.state is one object for the stage's life: the runtime builds a stage per load.)
        self._sync: SyncLimits | None = sync_limits(ctx.state)

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        state = self.ctx.state
        admission = await state.circuit_admit(self.key, self.settings)
        self._observe(admission.state)
        if not admission.allowed:
            self._refuse(admission)
        verdict: bool | None = None  # True: failure, False: success, None: no verdict
        try:
            response = await nxt(call)
            verdict = response.status >= 500
            return response
        except ProxyError as exc:
            if exc.code in FAILURE_CODES:
                verdict = True
            raise
        finally:
            if verdict is not None:
                transition = await state.circuit_record(self.key, self.settings, failure=verdict, trial=admission.trial)
                if transition.after != transition.before:
                    self._changed(transition.before, transition.after)
            elif admission.trial:
                await state.circuit_release(self.key, self.settings)

    # -- the same steps without coroutines, for a state in process memory (Guard) ----------
    # The ticket is the admission's `trial` flag.
    def enter(self, call: Call) -> bool | Flow:
        sync = self._sync
        if sync is None:
            return Flow.ASYNC
        admission = sync.circuit_admit_now(self.key, self.settings)
        if admission.state != self._seen:
            self._observe(admission.state)
        if not admission.allowed:
            self._refuse(admission)
        return admission.trial

    def leave(self, call: Call, trial: bool, result: Result) -> Result:
        sync = self._sync
        assert sync is not None  # enter() gave a ticket
        if isinstance(result, Response):
            failure = result.status >= 500
        elif result.code in FAILURE_CODES:
            failure = True
        else:  # refused below (e.g. rate_limited): says nothing about the upstream
            if trial:
                sync.circuit_release_now(self.key, self.settings)
            return result
        transition = sync.circuit_record_now(self.key, self.settings, failure, trial)
        if transition.after != transition.before:
            self._changed(transition.before, transition.after)
        return result

    def abandon(self, call: Call, trial: bool) -> None:
        if trial and self._sync is not None:
            self._sync.circuit_release_now(self.key, self.settings)

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


def build(ctx: StageContext) -> CircuitStage | None:
    cb = ctx.policy.circuit_breaker
    if cb is None:
        return None
    return CircuitStage(ctx, cb)
