"""Idempotency keys and proxy-side replay for unsafe calls (POST, PATCH).

* Key: the app's, from the policy's `header` (`Idempotency-Key`; PayPal names its own,
  `PayPal-Request-Id`). Without one and with `generate`, a uuid4 is put in that header
  and in `call.idempotency_key`, so every retry and failover below sends the same key.
* Replay (`replay_ttl` > 0, app keys only): the ledger record is scoped by upstream,
  configuration, credentials hash and key. A completed repeat with the same request
  fingerprint (method, path, query, body) gets the stored answer with
  `Idempotent-Replayed: true`; a different fingerprint gets 422 `idempotency_mismatch`;
  a repeat while the first is in flight waits for it (until its own deadline).
* Fingerprint window (`fingerprint_window` > 0): keyless calls identical in method,
  path + query, credentials hash and body count as one for that long after the first
  completed (generated keys do not count as app keys).

What is stored: any answer except 5xx, 429 and proxy-made ones (`error_code`), up to
`limits.max_body` bytes. Anything else (and a connection failure) releases the record,
so the app's own retry runs for real.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from proxy.credentials import credentials_hash
from proxy.errors import ProxyError
from proxy.events import IdempotencyResult
from proxy.hashing import digest
from proxy.model import Call, Response, unsafe_method
from proxy.pipeline import Handler, Stage, StageContext
from proxy.stages._answers import buffer_answer, from_snapshot, snapshot
from proxy.state.base import SCOPE_SEP, StoredResponse, state_key

REPLAYED_HEADER = "Idempotent-Replayed"
POLL_MIN = 0.01
POLL_MAX = 0.2
LOCK_MARGIN = 5.0  # an owner's record outlives its deadline by this much


def complete_answer(response: Response) -> bool:
    """An answer worth keeping: the upstream decided (not 5xx, not 429, not proxy-made)."""
    return response.error_code is None and response.status < 500 and response.status != 429


@dataclass(slots=True)
class _Outcome:
    """How an owner's call ended, for the same-process waiters that joined it.

    `stored`: a copy of its answer (kept in the ledger or not); `error`: the ProxyError it
    raised; `too_big`: it answered, but the answer was too big to copy. All unset: the
    owner was cancelled before an answer, so the waiters claim the key again.
    """

    stored: StoredResponse | None = None
    completed: bool = False  # `stored` is also in the ledger
    error: ProxyError | None = None
    too_big: bool = False


class IdempotencyStage:
    name = "idempotency"

    def __init__(self, ctx: StageContext) -> None:
        cfg = ctx.policy.idempotency
        assert cfg is not None
        self.cfg = cfg
        self.policy = ctx.policy
        self.clock = ctx.clock
        self.events = ctx.events
        self.state = ctx.state
        self.upstream = ctx.policy.upstream
        self.max_body = ctx.policy.limits.max_body
        self.scope = state_key(self.upstream, "idem", ctx.policy.fingerprint("idempotency"))
        limit = getattr(ctx.state, "limit_scope", None)
        if callable(limit):
            limit(self.scope, cfg.max_entries)
        # Same-process waiters join the owner's call and get its outcome (others poll).
        self._local: dict[str, asyncio.Future[_Outcome]] = {}

    def _emit(self, result: str) -> None:
        self.events.emit(IdempotencyResult(self.upstream, result))

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if not unsafe_method(call.method):
            return await nxt(call)
        header = self.cfg.header
        app_key = call.headers.get(header) or None
        key = app_key or call.idempotency_key
        if key is None and self.cfg.generate:
            key = str(uuid.uuid4())
            self._emit("generated")
        if key is not None:
            if call.headers.get(header) != key:
                headers = CIMultiDict(call.headers)
                headers[header] = key
                call = call.with_headers(headers)
            if call.idempotency_key != key:
                call = call.replace(idempotency_key=key)

        if app_key is not None and self.cfg.replay_ttl > 0:
            body = await call.body.read()
            creds = credentials_hash(call.headers, self.policy)
            record = f"{self.scope}{SCOPE_SEP}k:{digest(creds, app_key)}"
            fingerprint = digest(call.method, call.path, call.query, body)
            return await self._guarded(call, nxt, record, fingerprint, self.cfg.replay_ttl, "replayed")
        if app_key is None and self.cfg.fingerprint_window > 0:
            body = await call.body.read()
            creds = credentials_hash(call.headers, self.policy)
            fingerprint = digest(call.method, call.path, call.query, creds, body)
            record = f"{self.scope}{SCOPE_SEP}w:{fingerprint}"
            return await self._guarded(
                call, nxt, record, fingerprint, self.cfg.fingerprint_window, "fingerprint_duplicate"
            )
        return await nxt(call)

    async def _guarded(
        self, call: Call, nxt: Handler, record: str, fingerprint: str, ttl: float, replay_result: str
    ) -> Response:
        delay = POLL_MIN
        joined = False
        flight: asyncio.Future[_Outcome] | None = None  # a same-process owner's call we joined
        while True:
            if flight is not None and flight.done():
                outcome = flight.result()
                if outcome.stored is not None or outcome.error is not None or outcome.too_big:
                    return self._shared(outcome, replay_result)
                flight = None  # the owner was cancelled before an answer: claim again
            lock_ttl = max(call.deadline - self.clock.now(), 0.0) + LOCK_MARGIN
            claim = await self.state.idem_claim(record, fingerprint, ttl=ttl, lock_ttl=lock_ttl)
            if claim.state == "new":
                return await self._own(call, nxt, record, ttl)
            if claim.state == "completed" and claim.response is not None:
                self._emit(replay_result)
                return self._replay(claim.response, replay_result)
            if claim.state == "mismatch":
                self._emit("mismatch")
                raise ProxyError(
                    "idempotency_mismatch",
                    f"{self.cfg.header} was already used with a different request "
                    "(method, path or body); use a new key for a new request",
                )
            # in flight: join it if its owner is in this process, else poll for its result
            if not joined:
                joined = True
                self._emit("joined")
            remaining = call.deadline - self.clock.now()
            if remaining <= 0:
                raise ProxyError(
                    "upstream_timeout", "an earlier call with the same idempotency key is still in flight"
                )
            flight = self._local.get(record, flight)
            await self._wait(flight, min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)

    async def _wait(self, flight: asyncio.Future[_Outcome] | None, seconds: float) -> None:
        """Sleep `seconds`, or less if the joined owner's call ends first."""
        if flight is None or flight.done():
            await self.clock.sleep(seconds)
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waiting: set[asyncio.Future[Any]] = {sleeper, flight}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sleeper.done():
                sleeper.cancel()

    def _shared(self, outcome: _Outcome, replay_result: str) -> Response:
        """A joined waiter's answer: a copy of the owner's (never a send of its own)."""
        if outcome.error is not None:
            err = outcome.error
            raise ProxyError(err.code, err.message, retry_after=err.retry_after, status=err.status, detail=err.detail)
        if outcome.stored is None:
            raise ProxyError(
                "upstream_unreachable",
                f"an earlier call with the same {self.cfg.header} was sent and answered, but its answer was "
                "too large to keep; it was not sent again",
            )
        if outcome.completed:
            self._emit(replay_result)
            return self._replay(outcome.stored, replay_result)
        # Not kept (a 5xx, 429 or proxy-made answer): the copy is the owner's failure, and
        # is counted by its status like any answer, not as a replay.
        self._emit("shared")
        response = self._replay(outcome.stored, "shared")
        del response.notes["outcome"]
        return response

    async def _own(self, call: Call, nxt: Handler, record: str, ttl: float) -> Response:
        flight: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._local[record] = flight
        outcome = _Outcome()
        try:
            try:
                response = await nxt(call)
            except ProxyError as exc:
                outcome.error = exc
                raise
            try:
                # Buffered whatever it is: a waiter that joined gets a copy, even of a 5xx.
                body = await buffer_answer(response, self.max_body)
                if body is None:
                    outcome.too_big = True
                else:
                    stored = snapshot(response, body, self.clock.wall())
                    if complete_answer(response):
                        await self.state.idem_complete(record, stored, ttl=ttl)
                        outcome.completed = True
                    outcome.stored = stored
            except BaseException:
                await response.close()
                raise
            return response
        finally:
            # Waiters that joined get the outcome first; only callers that arrive after
            # the release below may send the call again.
            if self._local.get(record) is flight:
                del self._local[record]
            if not flight.done():
                flight.set_result(outcome)
            if not outcome.completed:
                await asyncio.shield(self.state.idem_release(record))

    def _replay(self, stored: StoredResponse, result: str) -> Response:
        response = from_snapshot(stored, upstream=self.upstream)
        response.headers[REPLAYED_HEADER] = "true"
        response.notes["outcome"] = "replayed"
        response.notes["idempotency"] = result
        return response


def build(ctx: StageContext) -> Stage | None:
    if ctx.policy.idempotency is None:
        return None
    return IdempotencyStage(ctx)
