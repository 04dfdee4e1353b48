"""Idempotency keys, proxy-side replay and exactly-once ownership of unsafe calls.

* Key: the app's, from the policy's `header` (`Idempotency-Key`; PayPal names its own,
  `PayPal-Request-Id`). Without one and with `generate`, a uuid4 is put in that header
  and in `call.idempotency_key`, so every retry and failover below sends the same key.
* Replay (`replay_ttl` > 0, app keys only): the record is keyed by upstream, credentials
  hash and key (never by policy settings, so it survives reloads and restarts). A
  completed repeat with the same request fingerprint (method, path, query, body) gets
  the recorded answer with `Idempotent-Replayed: true`; a different fingerprint gets
  422 `idempotency_mismatch`; a repeat while the first is in flight joins it and gets
  its answer (until its own deadline).
* Fingerprint window (`fingerprint_window` > 0): keyless calls identical in method,
  path + query, credentials hash and body count as one for that long after the first
  (generated keys do not count as app keys).

What is recorded when the call ends (contract 7.2, docs/resilience.md "Exactly once"):

* a complete answer (not 5xx, not 429, not proxy-made): for the record's ttl;
* an *ambiguous* outcome (the call's story says an attempt may have acted without a
  complete answer: a timeout or reset after the request was written, or a 5xx the
  plugin does not call "not processed"): recorded too, so a resend gets the same answer
  instead of a second send, except for an app key the upstream itself deduplicates on
  (Stripe, PayPal, `upstream_dedupes`): there the resend goes upstream with the same key
  and the provider answers for it;
* anything else (nothing was sent, connect errors, 429, circuit open, "not processed"):
  the record is released, so a resend runs for real.

Claims: each call claims with an owner token of its own. Where the state backend cannot
decide a claim now (Redis slow or away, `RecordsUnavailable`), the claim is tried again
within the call's deadline (at most `CLAIM_WAIT`), then the call gets 503
`state_unavailable`; it is never decided from this replica's memory alone, unless the
upstream deduplicates on the key. A record left in flight by an owner that died (kill -9)
is *in doubt*: a resend gets 502 `upstream_unreachable` with
`X-Egressd-Error-Detail: in_doubt` and is not sent, unless the upstream deduplicates on
the key.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.answers import error_response
from proxy.credentials import credentials_hash
from proxy.errors import ProxyError
from proxy.events import IdempotencyResult
from proxy.hashing import digest
from proxy.model import AMBIGUOUS_KINDS, Call, CallStory, Response, unsafe_method
from proxy.pipeline import Handler, Stage, StageContext
from proxy.stages._answers import buffer_answer, from_snapshot, snapshot
from proxy.state.base import SCOPE_SEP, RecordsUnavailable, StoredResponse

if TYPE_CHECKING:
    from plugins.base import ProviderPlugin
    from proxy.config.schema import Policy

REPLAYED_HEADER = "Idempotent-Replayed"
POLL_MIN = 0.01
POLL_MAX = 0.2
LOCK_MARGIN = 5.0  # an owner's record outlives its deadline by this much
CLAIM_WAIT = 5.0  # the longest a call waits for a shared store that cannot decide a claim


def dedupes_on_key(policy: Policy, plugin: ProviderPlugin, call: Call) -> bool:
    """Whether the upstream itself deduplicates this call on the key it carries: the
    policy's `idempotency.upstream_dedupes` when set (and the key header is there), else
    the provider plugin's word (Stripe `Idempotency-Key`, PayPal `PayPal-Request-Id`)."""
    idem = policy.idempotency
    if idem is not None and idem.upstream_dedupes is not None:
        return idem.upstream_dedupes and bool(call.headers.get(idem.header))
    return plugin.honours_idempotency(call.method, call.path, call.headers)


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
    completed: bool = False  # `stored` is also in the record (a complete or ambiguous answer)
    error: ProxyError | None = None
    too_big: bool = False


class IdempotencyStage:
    name = "idempotency"

    def __init__(self, ctx: StageContext) -> None:
        cfg = ctx.policy.idempotency
        assert cfg is not None
        self.cfg = cfg
        self.policy = ctx.policy
        self.plugin = ctx.plugin
        self.clock = ctx.clock
        self.events = ctx.events
        self.state = ctx.state
        self.upstream = ctx.policy.upstream
        self.max_body = ctx.policy.limits.max_body
        # Upstream and kind only: no policy fingerprint, so a reload that touches this
        # block (a ttl, a size) keeps every record (contract 7.2).
        self.scope = f"{self.upstream}:idem"
        limit = getattr(ctx.state, "limit_scope", None)
        if callable(limit):
            limit(self.scope, cfg.max_entries)
        # Same-process waiters join the owner's call and get its outcome (others poll).
        self._local: dict[str, asyncio.Future[_Outcome]] = {}

    def _emit(self, result: str) -> None:
        self.events.emit(IdempotencyResult(self.upstream, result))

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if not unsafe_method(call.method) or call.path in self.plugin.app_auth_paths:
            # (the provider's own token endpoint: its answer is the app's credential and is
            # never recorded, generated a key or collapsed with another call)
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
            dedupes = dedupes_on_key(self.policy, self.plugin, call)
            return await self._guarded(call, nxt, record, fingerprint, self.cfg.replay_ttl, "replayed", dedupes)
        if app_key is None and self.cfg.fingerprint_window > 0:
            body = await call.body.read()
            creds = credentials_hash(call.headers, self.policy)
            fingerprint = digest(call.method, call.path, call.query, creds, body)
            record = f"{self.scope}{SCOPE_SEP}w:{fingerprint}"
            # A resend of a keyless call carries no key the upstream could deduplicate on.
            return await self._guarded(
                call, nxt, record, fingerprint, self.cfg.fingerprint_window, "fingerprint_duplicate", False
            )
        return await nxt(call)

    async def _claim(
        self, call: Call, record: str, fingerprint: str, ttl: float, owner: str, dedupes: bool
    ) -> tuple[str, StoredResponse | None]:
        """Claim `record`; a store that cannot decide now is asked again within the
        call's deadline (at most `CLAIM_WAIT`), then the call gets 503 state_unavailable."""
        give_up = min(call.deadline, self.clock.now() + CLAIM_WAIT)
        delay = POLL_MIN * 5
        while True:
            lock_ttl = max(call.deadline - self.clock.now(), 0.0) + LOCK_MARGIN
            try:
                claim = await self.state.idem_claim(
                    record, fingerprint, ttl=ttl, lock_ttl=lock_ttl, owner=owner, dedupes=dedupes
                )
                return claim.state, claim.response
            except RecordsUnavailable:
                if self.clock.now() + delay >= give_up:
                    abandon = getattr(self.state, "abandon_claim", None)
                    if callable(abandon):
                        await asyncio.shield(abandon(record, owner))
                    self._emit("state_unavailable")
                    raise ProxyError(
                        "state_unavailable",
                        "the shared state store cannot decide whether this call was already sent; "
                        "it was not sent (try again)",
                        retry_after=1,
                    ) from None
                await self.clock.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _guarded(
        self,
        call: Call,
        nxt: Handler,
        record: str,
        fingerprint: str,
        ttl: float,
        replay_result: str,
        dedupes: bool,
    ) -> Response:
        delay = POLL_MIN
        joined = False
        flight: asyncio.Future[_Outcome] | None = None  # a same-process owner's call we joined
        owner = uuid.uuid4().hex
        while True:
            if flight is not None and flight.done():
                outcome = flight.result()
                if outcome.stored is not None or outcome.error is not None or outcome.too_big:
                    return self._shared(outcome, replay_result)
                flight = None  # the owner was cancelled before an answer: claim again
            state, response = await self._claim(call, record, fingerprint, ttl, owner, dedupes)
            if state == "new":
                return await self._own(call, nxt, record, fingerprint, ttl, owner, dedupes)
            if state == "in_doubt":
                self._emit("in_doubt")
                raise ProxyError(
                    "upstream_unreachable",
                    f"an earlier call with the same {self._what(replay_result)} was cut off without an outcome "
                    "(egressd stopped while it was in flight); it may have taken effect upstream, so it was "
                    "not sent again",
                    detail="in_doubt",
                )
            if state == "completed" and response is not None:
                self._emit(replay_result)
                return self._replay(response, replay_result)
            if state == "mismatch":
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
            began = self.clock.now()
            await self._wait(flight, min(delay, remaining))
            if call.story is not None:  # waiting on the first call's upstream: not egressd's overhead
                call.story.held_seconds += self.clock.now() - began
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
        if outcome.completed and outcome.stored is not None:
            self._emit(replay_result)
            return self._replay(outcome.stored, replay_result)
        if outcome.error is not None:
            err = outcome.error
            raise ProxyError(err.code, err.message, retry_after=err.retry_after, status=err.status, detail=err.detail)
        if outcome.stored is None:
            raise ProxyError(
                "upstream_unreachable",
                f"an earlier call with the same {self.cfg.header} was sent and answered, but its answer was "
                "too large to keep; it was not sent again",
            )
        # Not kept (a 5xx, 429 or proxy-made answer that proves nothing was done): the copy
        # is the owner's failure, counted by its status like any answer, not as a replay.
        self._emit("shared")
        response = self._replay(outcome.stored, "shared")
        response.outcome = None
        return response

    def _what(self, replay_result: str) -> str:
        return "request (same body, within fingerprint_window)" if replay_result != "replayed" else self.cfg.header

    def _ambiguous(self, story: CallStory, error: ProxyError | None) -> bool:
        """May the upstream have acted on this call without a complete answer?"""
        if story.may_have_acted(self.upstream, self.plugin.not_processed):
            return True
        # An error no transport attempt recorded (another terminal): judge it by its kind.
        return error is not None and not story.attempts and error.detail in AMBIGUOUS_KINDS

    async def _own(
        self, call: Call, nxt: Handler, record: str, fingerprint: str, ttl: float, owner: str, dedupes: bool
    ) -> Response:
        story = call.story
        if story is None:
            story = CallStory()
            call = call.replace(story=story)
        flight: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._local[record] = flight
        outcome = _Outcome()
        keep = False  # the record stays in flight (in doubt): a cancelled call that was sent
        try:
            try:
                response = await nxt(call)
            except ProxyError as exc:
                outcome.error = exc
                if not dedupes and self._ambiguous(story, exc):
                    # The first caller's answer is what every resend gets (contract 7.7).
                    shaped = error_response(exc, request_id=call.request_id, plugin=self.plugin, upstream=self.upstream)
                    stored = snapshot(shaped, shaped.body or b"", self.clock.wall())
                    await self._complete(record, stored, ttl, fingerprint, owner, outcome)
                    outcome.stored = stored
                raise
            except asyncio.CancelledError:
                # Cancelled (shutdown; the server does not cancel an unsafe call that was
                # sent when the app leaves): if a request went out, the record stays in
                # flight, and is in doubt once its lock lapses.
                keep = story.sending > 0
                raise
            try:
                # Buffered whatever it is: a waiter that joined gets a copy, even of a 5xx.
                body = await buffer_answer(response, self.max_body)
                if body is None:
                    # Too big to record: the record stays in flight (in doubt once its lock
                    # lapses), so a resend is refused rather than sent again; an upstream
                    # that deduplicates on the key answers the resend itself.
                    outcome.too_big = True
                    keep = not dedupes and (complete_answer(response) or self._ambiguous(story, None))
                else:
                    stored = snapshot(response, body, self.clock.wall())
                    if complete_answer(response) or (not dedupes and self._ambiguous(story, None)):
                        await self._complete(record, stored, ttl, fingerprint, owner, outcome)
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
            if not outcome.completed and not keep:
                await asyncio.shield(self.state.idem_release(record, owner))

    async def _complete(
        self, record: str, stored: StoredResponse, ttl: float, fingerprint: str, owner: str, outcome: _Outcome
    ) -> None:
        await asyncio.shield(
            self.state.idem_complete(record, stored, ttl=ttl, fingerprint=fingerprint, owner=owner)
        )
        outcome.completed = True

    def _replay(self, stored: StoredResponse, result: str) -> Response:
        response = from_snapshot(stored, upstream=self.upstream)
        response.headers[REPLAYED_HEADER] = "true"
        response.outcome = "replayed"
        response.idempotency = result
        return response


def build(ctx: StageContext) -> Stage | None:
    if ctx.policy.idempotency is None:
        return None
    return IdempotencyStage(ctx)
