"""Failover: when the primary fails in a way the policy lists, rewrite the call into the
fallback provider's shape, send it under the fallback's own policy, translate the answer
back, and remember which provider owns the objects created there.

Honesty rules, in the order they are checked:

* A call that may already have taken effect at the primary is never failed over, unless
  the primary's plugin can ask the primary (`ambiguity_probe`) and the answer says it
  was not processed. Ambiguity is a property of the whole call (its `CallStory`), not
  of the last attempt: an unsafe method (any method outside `IDEMPOTENT_METHODS`) any of
  whose attempts timed out or was cut short after it was written, or was answered with
  a 5xx its plugin does not call "not processed" (`not_processed`): a 500 may follow
  partial execution, and a 502/504 from a gateway says nothing about the application
  behind it. So a call whose second attempt meets an open circuit after a first that
  503'd is still ambiguous. This holds for status codes listed in `on` too.
* A call the translator cannot express faithfully (`Refused`) is not failed over; the app
  gets the primary's own error with `X-Egressd-Failover: refused; reason=...`.
* A fallback without its own `auth` is never sent the app's primary credentials.

Follow-up calls on objects created on the fallback (synthetic ids, see the routing ledger
below) go to the fallback whether or not the primary is healthy: the primary does not
know those ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from plugins.base import FailoverContext, Refused, Translated, WireAnswer, WireRequest, shown_names
from proxy.answers import error_response
from proxy.config.schema import Failover
from proxy.errors import ProxyError
from proxy.events import FailoverResult
from proxy.model import AMBIGUOUS_KINDS, Call, CallStory, RequestBody, Response, unsafe_method
from proxy.pipeline import Handler, StageContext, UpstreamHandle
from proxy.stages.retry import is_exhausted

log = logging.getLogger("egressd.failover")

LEDGER_TTL = 400 * 86400.0  # refunds may come months later


def _attempts(result: Response | ProxyError) -> int:
    """Attempts the retry stage counted for a result (0 when it did not count)."""
    return result.attempts


def ledger_key(source: str, object_id: str) -> str:
    """Routing-ledger key: which upstream owns `object_id` created for calls routed to `source`."""
    return f"{source}:route:{object_id}"


def _condition(result: Response | ProxyError, on_codes: frozenset[int], on_words: frozenset[str]) -> str | None:
    """The listed condition this result meets, or None."""
    if isinstance(result, Response):
        if result.status in on_codes:
            return str(result.status)
        if "exhausted" in on_words and is_exhausted(result) and result.status >= 500:
            return "exhausted"
        return None
    if result.code == "circuit_open" and "circuit_open" in on_words:
        return "circuit_open"
    if result.detail == "connect_error" and "connect_error" in on_words:
        return "connect_error"
    if result.code == "upstream_timeout" and result.detail != "connect_error" and "timeout" in on_words:
        return "timeout"
    if is_exhausted(result) and "exhausted" in on_words:
        return "exhausted"
    if result.status in on_codes:
        return str(result.status)
    return None


class FailoverStage:
    name = "failover"

    def __init__(self, ctx: StageContext, rules: list[Failover]) -> None:
        self.ctx = ctx
        self.rules = rules
        self.source = ctx.policy.upstream
        self.max_body = ctx.policy.limits.max_body
        self._on = [
            (
                frozenset(v for v in r.on if isinstance(v, int)),
                frozenset(v for v in r.on if isinstance(v, str)),
            )
            for r in rules
        ]

    # -- the stage ---------------------------------------------------------------------------
    async def __call__(self, call: Call, nxt: Handler) -> Response:
        story = call.story
        if story is None:
            story = CallStory()
            call = call.replace(story=story)
        elif story.failover_from is not None:
            return await nxt(call)  # a call made by another upstream's failover: never chain
        body = call.body
        if not body.buffered and (body.length is None or body.length <= self.max_body):
            await body.read()  # translation needs the whole body; bounded by limits.max_body
        request = self._wire(call)

        sticky = await self._sticky(call, request)
        if sticky is not None:
            return sticky

        result: Response | ProxyError
        try:
            result = await nxt(call)
        except ProxyError as exc:
            result = exc
        matched = [
            (rule, cond)
            for rule, (codes, words) in zip(self.rules, self._on, strict=True)
            if (cond := _condition(result, codes, words)) is not None
        ]
        if not matched or not body.buffered:
            return self._pass(result)

        if unsafe_method(call.method) and self._ambiguous(result, story):
            probed = await self._probe(call, nxt, request)
            if isinstance(probed, Response):
                await self._close(result)  # the probe's answer replaces the primary's
                return probed
            if probed != "not_processed":
                return self._refused(
                    call,
                    result,
                    matched[0][0].to,
                    "ambiguous",
                    "the primary may have processed it",
                    self._ambiguity(result, story),
                )

        primary_attempts = _attempts(result)
        first_refusal: tuple[str, str, str, tuple[str, ...]] | None = None
        for rule, _cond in matched:
            outcome = await self._run(call, request, rule, {}, result, primary_attempts)
            if isinstance(outcome, Response):
                await self._close(result)
                return outcome
            if first_refusal is None:
                first_refusal = (rule.to, outcome.reason, outcome.detail, outcome.names)
        assert first_refusal is not None
        return self._refused(call, result, *first_refusal)

    # -- pieces ------------------------------------------------------------------------------
    def _wire(self, call: Call) -> WireRequest:
        return WireRequest(
            call.method.upper(),
            call.path,
            call.query,
            {k: v for k, v in call.headers.items()},
            call.body.data if call.body.buffered else b"",
        )

    def _pass(self, result: Response | ProxyError) -> Response:
        if isinstance(result, ProxyError):
            raise result
        return result

    @staticmethod
    async def _close(result: Response | ProxyError) -> None:
        if isinstance(result, Response):
            await result.close()

    def _ambiguous(self, result: Response | ProxyError, story: CallStory) -> bool:
        """May the primary have acted on this (unsafe) call, in any of its attempts?"""
        if story.may_have_acted(self.source, self.ctx.plugin.not_processed):
            return True
        # The result itself, for answers that no transport attempt recorded (a terminal
        # other than the transport).
        if isinstance(result, ProxyError):
            return result.detail in AMBIGUOUS_KINDS
        if result.error_code is not None:
            return False  # made by the proxy: only the attempt log tells what was sent
        return result.status >= 500 and not self.ctx.plugin.not_processed(result.status, result.headers)

    async def _probe(self, call: Call, nxt: Handler, request: WireRequest) -> Response | str:
        """Ask the primary whether an ambiguous call took effect: its authoritative
        answer (a Response), or the verdict "not_processed" / "unknown"."""
        probe = self.ctx.plugin.ambiguity_probe(request)
        if probe is None or self.ctx.clock.now() >= call.deadline:
            return "unknown"
        headers = CIMultiDict(call.headers)
        for k, v in probe.headers.items():
            headers[k] = v
        # The probe's attempts go in the call's own story: if it too is cut short, the
        # whole call stays ambiguous.
        probe_call = call.replace(
            method=probe.method, path=probe.path, query=probe.query, body=RequestBody(data=probe.body)
        ).with_headers(headers)
        try:
            response = await nxt(probe_call)
        except ProxyError:
            return "unknown"
        try:
            data = await response.read(self.max_body)  # closes the answer whatever happens
        except ProxyError:
            return "unknown"  # the probe's own failure never replaces the primary's error
        verdict = self.ctx.plugin.probe_verdict(WireAnswer(response.status, dict(response.headers), data))
        if verdict == "processed":
            response.failover = "skipped; reason=ambiguous; probe=answered"
            return response
        return verdict

    async def _sticky(self, call: Call, request: WireRequest) -> Response | None:
        ids = self.ctx.plugin.references(request)
        if not ids:
            return None
        records: dict[str, Mapping[str, Any]] = {}
        for object_id in ids:
            raw = await self.ctx.state.ledger_get(ledger_key(self.source, object_id))
            if raw is not None:
                try:
                    records[object_id] = json.loads(raw)
                except ValueError:
                    continue
        owners = {str(r.get("owner")) for r in records.values()}
        if not owners:
            return None
        owner = sorted(owners)[0]
        rule = next((r for r in self.rules if r.to == owner), None) or Failover(to=owner, on=["circuit_open"])
        outcome = await self._run(call, request, rule, records, None, 0)
        if isinstance(outcome, Response):
            return outcome
        # The message names what blocked it (`_refused` adds the reason and names), never
        # the refusal's log text, which may quote ids from the request.
        error = ProxyError("bad_request", f"{request.method} {request.path} cannot be expressed at {owner}")
        return self._refused(call, error, owner, outcome.reason, outcome.detail, outcome.names)

    def _context(
        self, call: Call, rule: Failover, target: UpstreamHandle, records: Mapping[str, Mapping[str, Any]]
    ) -> FailoverContext:
        return FailoverContext(
            source=self.source,
            target=target.name,
            payment_methods=dict(rule.crosswalk.payment_methods),
            templates=dict(rule.crosswalk.templates),
            allow_lossy=rule.allow_lossy,
            idempotency_key=call.idempotency_key
            or call.headers.get(self.ctx.plugin.idempotency_header or "Idempotency-Key"),
            request_id=call.request_id,
            now=self.ctx.clock.wall(),
            records=records,
            source_settings=dict(self.ctx.plugin.settings),
            target_settings=dict(target.plugin.settings),
            live="sandbox" not in target.policy.target and not target.policy.target.startswith("http://"),
        )

    async def _run(
        self,
        call: Call,
        request: WireRequest,
        rule: Failover,
        records: Mapping[str, Mapping[str, Any]],
        primary: Response | ProxyError | None,
        primary_attempts: int,
    ) -> Response | Refused:
        """Fail over under `rule`: a translated Response, or the Refused reason.

        `primary_attempts` (attempts already made at the primary) is added to the
        fallback's in `X-Egressd-Attempts`."""
        target = self.ctx.lookup(rule.to)
        if target is None:
            return Refused("fallback_unavailable", f"upstream {rule.to} is not loaded")
        translator = self.ctx.plugin.failover_to(target.plugin)
        if translator is None:
            return Refused("no_translation", f"no translation from {self.ctx.plugin.name} to {target.plugin.name}")
        if target.policy.auth is None:
            return Refused("fallback_without_auth", f"upstream {rule.to} has no auth of its own")
        run = translator(request, self._context(call, rule, target, records))
        attempts = primary_attempts
        try:
            step = next(run)
        except Refused as refused:
            return refused
        except StopIteration as stop:
            return await self._finish(stop.value, target, attempts)
        while True:
            try:
                answer, n = await self._send(call, target, step)
            except ProxyError as exc:
                run.close()
                return self._failed(call, exc, target.name, attempts + max(_attempts(exc), 1))
            attempts += n
            try:
                step = run.send(answer)
            except StopIteration as stop:
                return await self._finish(stop.value, target, attempts)
            except Refused as refused:  # after a send: the fallback may have acted
                stopped = ProxyError("upstream_unreachable", f"failover to {target.name} stopped: {refused}")
                return self._failed(call, stopped, target.name, attempts)

    async def _send(self, call: Call, target: UpstreamHandle, step: WireRequest) -> tuple[WireAnswer, int]:
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in step.headers.items():
            headers[k] = v
        headers["X-Request-Id"] = call.request_id
        idem = target.plugin.idempotency_header
        key = step.headers.get(idem) if idem else None
        fcall = Call(
            method=step.method,
            upstream=target.name,
            path=step.path,
            query=step.query,
            headers=CIMultiDictProxy(headers),
            body=RequestBody(data=step.body),
            deadline=call.deadline,
            started=call.started,
            request_id=call.request_id,
            route=call.route or self.source,
            idempotency_key=key,
            story=CallStory(failover_from=self.source),
        )
        try:
            response = await target.handle(fcall)
        finally:
            # The fallback's tries belong to the whole call's story too (the idempotency
            # stage above judges the call's outcome over all of them).
            if call.story is not None and fcall.story is not None:
                call.story.attempts.extend(fcall.story.attempts)
                call.story.upstream_seconds += fcall.story.upstream_seconds
                call.story.held_seconds += fcall.story.held_seconds
        data = await response.read(target.policy.limits.max_body)
        if response.error_code is not None and response.status >= 500:
            error = ProxyError(
                response.error_code, f"fallback {target.name}: {response.error_code}", status=response.status
            )
            error.attempts = response.attempts
            raise error
        return WireAnswer(response.status, {k: v for k, v in response.headers.items()}, data), max(response.attempts, 1)

    async def _finish(self, translated: Translated, target: UpstreamHandle, attempts: int) -> Response:
        for object_id, record in translated.ledger:
            await self.ctx.state.ledger_set(
                ledger_key(self.source, object_id), json.dumps(record, default=str).encode(), ttl=LEDGER_TTL
            )
        answer = translated.answer
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in answer.headers.items():
            headers[k] = v
        self.ctx.events.emit(FailoverResult(self.source, target.name, "used"))
        return Response(
            answer.status,
            headers,
            body=answer.body,
            upstream=target.name,
            attempts=attempts,
            failover=f"used; from={self.source}",
        )

    def _failed(self, call: Call, exc: ProxyError, target: str, attempts: int) -> Response:
        self.ctx.events.emit(FailoverResult(self.source, target, "failed", exc.code))
        shaped = ProxyError(exc.code, f"failover to {target} failed: {exc.message}", status=exc.status)
        response = error_response(shaped, request_id=call.request_id, plugin=self.ctx.plugin, upstream=target)
        response.attempts = attempts
        response.failover = f"failed; to={target}; reason={exc.code}"
        response.detail = exc.detail
        return response

    def _ambiguity(self, result: Response | ProxyError, story: CallStory) -> list[str]:
        """What made an unsafe call ambiguous, for `detail=`: the kinds of attempts that
        may have reached the primary (`timeout`, `reset`, `protocol_error`) and the 5xx
        statuses not documented as "not processed" (`503`), in the order they happened."""
        names: list[str] = []
        for attempt in story.attempts:
            if attempt.kind in AMBIGUOUS_KINDS:
                names.append(attempt.kind)
            elif attempt.kind == "answered" and attempt.status >= 500:
                if attempt.upstream != self.source or not self.ctx.plugin.not_processed(
                    attempt.status, attempt.headers or {}
                ):
                    names.append(str(attempt.status))
        if not names:  # an answer no transport attempt recorded (see `_ambiguous`)
            if isinstance(result, ProxyError):
                names.append(result.detail if result.detail in AMBIGUOUS_KINDS else result.code)
            else:
                names.append(str(result.status))
        return list(dict.fromkeys(names))

    def _refused(
        self,
        call: Call,
        primary: Response | ProxyError,
        target: str,
        reason: str,
        detail: str = "",
        names: Iterable[str] = (),
    ) -> Response:
        """The primary's result, told why the failover was refused: `X-Egressd-Failover:
        refused; reason=REASON; detail=NAMES` (contract 7.4/7.7) and, when egressd makes
        the answer, the same words at the end of the provider-shaped error message."""
        names = tuple(names)
        self.ctx.events.emit(FailoverResult(self.source, target, "refused", reason))
        log.info(
            "failover refused",
            extra={"upstream": self.source, "to": target, "reason": reason, "detail": detail, "names": ",".join(names)},
        )
        shown = shown_names(names)
        if isinstance(primary, Response):
            response = primary  # the primary's own answer (body and status) stays as it is
        else:
            told = ProxyError(
                primary.code,
                f"{primary.message}; {refusal_message(target, reason, shown)}",
                retry_after=primary.retry_after,
                status=primary.status,
                detail=primary.detail,
            )
            response = error_response(told, request_id=call.request_id, plugin=self.ctx.plugin, upstream=self.source)
            response.detail = primary.detail
        response.failover = refusal_header(reason, shown)
        return response


def refusal_header(reason: str, shown: list[str]) -> str:
    """`refused; reason=REASON[; detail=NAME,NAME]` (names already encoded, `shown_names`)."""
    return f"refused; reason={reason}" + (f"; detail={','.join(shown)}" if shown else "")


def refusal_message(target: str, reason: str, shown: list[str]) -> str:
    """The same words for the app's error message: `failover to paypal refused: lossy (expand)`."""
    return f"failover to {target} refused: {reason}" + (f" ({', '.join(shown)})" if shown else "")


def build(ctx: StageContext) -> FailoverStage | None:
    rules = list(ctx.policy.failover)
    if not rules:
        return None
    return FailoverStage(ctx, rules)
