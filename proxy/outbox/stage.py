"""The outbox stage: keep a send durably and answer for the provider (contract 7.6).

Under the idempotency stage (a resend with the same key or fingerprint gets the same
"accepted" answer, replayed) and over cache, failover and the attempt loop, which the
delivery worker (proxy/outbox/worker.py) calls later with the kept send.

* `when: always`: every send the plugin calls a send (`outbox_accepts`: SendGrid
  `POST /v3/mail/send`, Mailgun `POST /v3/{domain}/messages`, any unsafe call for a
  generic upstream) is stored, then answered at once.
* A call another upstream failed over to this one is never kept here: the primary's
  policy (its own outbox) decides.
* `when: on_failure`: the send goes out now. It is kept only when it failed without
  reaching the upstream (contract 7.8): every attempt ended in a connect error or a 429
  the plugin documents as "not processed", or none was made (the rate limiter refused
  it, with or without a queue; the circuit is open; the process is draining). A send
  that may have reached the upstream is not kept: its answer (or egressd's 502/504)
  goes to the app as without an outbox, since keeping it could send it twice.
* `keep_in_doubt` (with `on_failure`, where the plugin can ask the provider): every send
  is tagged with its outbox id before its first try; one whose outcome is ambiguous (a
  5xx, a timeout after it was written), every try of which went to this upstream, is
  stored in doubt and answered "accepted"; the worker asks the provider after
  `probe_after` and resends only on a clear "not there". A provider 4xx goes to the app.

The answer goes out only after `OutboxStore.add` returned (the row is committed, or in
Redis). The body is read whole first, bounded by `limits.max_body` (413 before anything
is stored); a full outbox answers 503 `outbox_full` with `Retry-After`, a store that
cannot take it 503 `state_unavailable`; nothing is stored then.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from plugins.base import WireRequest
from proxy.errors import ProxyError
from proxy.model import AMBIGUOUS_KINDS, Call, CallStory, RequestBody, Response, unsafe_method
from proxy.outbox.store import Entry, OutboxFull, OutboxStore, OutboxUnavailable, new_id
from proxy.pipeline import Handler, StageContext

if TYPE_CHECKING:
    from plugins.base import ProviderPlugin

OUTBOX_HEADER = "X-Egressd-Outbox"
#: egressd's own refusals that prove the send was not sent (contract 7.8).
NOT_SENT_CODES = frozenset({"rate_limited", "circuit_open", "draining", "over_capacity"})
FULL_RETRY_AFTER = 30.0
_DROP_HEADERS = frozenset({"content-length", "transfer-encoding", "expect", "x-request-id"})


def reached_upstream(story: CallStory, plugin: ProviderPlugin) -> bool:
    """Whether any attempt of the call may have reached an upstream's application: an
    attempt that was written and not refused by a connect error or a documented "not
    processed" answer (429)."""
    for attempt in story.attempts:
        if attempt.kind == "connect_error":
            continue
        if attempt.kind == "answered" and plugin.not_processed(attempt.status, attempt.headers or {}):
            continue
        return True
    return story.sending > len(story.attempts)  # a try still counted as started


def not_sent(result: Response | ProxyError, story: CallStory, plugin: ProviderPlugin) -> bool:
    """A failed call that did not reach the upstream (so keeping it cannot send it twice)."""
    if reached_upstream(story, plugin):
        return False
    if isinstance(result, ProxyError):
        code, detail = result.code, result.detail
    elif result.error_code is not None:
        code, detail = result.error_code, result.detail
    else:
        return result.status == 429 and plugin.not_processed(result.status, result.headers)
    if code in NOT_SENT_CODES:
        return True
    # Connect errors: nothing was written (every attempt in the story is one).
    return code == "upstream_unreachable" and (detail == "connect_error" or bool(story.attempts))


class OutboxStage:
    name = "outbox"

    def __init__(self, ctx: StageContext, store: OutboxStore, wake: Callable[[], None]) -> None:
        policy = ctx.policy
        assert policy.outbox is not None
        self.settings = policy.outbox
        self.upstream = policy.upstream
        self.plugin = ctx.plugin
        self.clock = ctx.clock
        self.store = store
        self.wake = wake
        self.always = policy.outbox.when == "always"

    def _in_doubt(self, result: Response | ProxyError, story: CallStory) -> str | None:
        """For `keep_in_doubt`: why the call may have reached this upstream (and only this
        one: a fallback's attempt cannot be asked in this upstream's shape), or None."""
        if isinstance(result, Response) and result.error_code is None and result.status < 500:
            return None  # the provider decided (a 4xx): the app gets its answer
        ambiguous = [
            a
            for a in story.attempts
            if a.kind in AMBIGUOUS_KINDS
            or (a.kind == "answered" and a.status >= 500 and not self.plugin.not_processed(a.status, a.headers or {}))
        ]
        if not ambiguous or any(a.upstream != self.upstream for a in story.attempts):
            return None
        last = ambiguous[-1]
        return f"HTTP {last.status}" if last.kind == "answered" else last.kind

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if not unsafe_method(call.method) or not self.plugin.outbox_accepts(call.method, call.path):
            return await nxt(call)
        if call.story is not None and call.story.failover_from is not None:
            # A call another upstream failed over here: the primary's policy decides
            # whether it is kept (its own outbox, if it has one), never this one.
            return await nxt(call)
        body = await call.body.read()  # bounded by limits.max_body: 413 before anything is kept
        if self.always:
            return await self._keep(call, body)
        story = call.story
        if story is None:
            story = CallStory()
            call = call.replace(story=story)
        outbox_id: str | None = None
        if self.settings.keep_in_doubt:
            request = WireRequest(call.method, call.path, call.query, {k: v for k, v in call.headers.items()}, body)
            candidate = new_id()
            if self.plugin.outbox_probe(request, candidate) is not None:
                # Tagged now, so that the provider can be asked about this very send later.
                outbox_id = candidate
                tagged = self.plugin.outbox_tag(request, outbox_id)
                headers: CIMultiDict[str] = CIMultiDict(
                    (k, v) for k, v in tagged.headers.items() if k.lower() != "content-length"
                )
                call = call.replace(body=RequestBody(data=tagged.body, max_body=call.body.max_body)).with_headers(
                    headers
                )
        result: Response | ProxyError
        try:
            result = await nxt(call)
        except ProxyError as exc:
            result = exc
        if isinstance(result, Response) and result.status < 400:
            return result
        if outbox_id is not None:
            why = self._in_doubt(result, story)
            if why is not None:
                if isinstance(result, Response):
                    await result.close()
                return await self._keep(call, body, outbox_id=outbox_id, doubt=why, sent=story.sending)
        if not not_sent(result, story, self.plugin):
            if isinstance(result, ProxyError):
                raise result
            return result
        if isinstance(result, Response):
            await result.close()
        return await self._keep(call, body)

    async def _keep(
        self, call: Call, body: bytes, *, outbox_id: str | None = None, doubt: str | None = None, sent: int = 0
    ) -> Response:
        """Store the send, then answer for the provider. `doubt`: it may have reached the
        upstream (keep_in_doubt): stored in doubt, to be asked about after `probe_after`."""
        now = self.clock.wall()
        entry = Entry(
            id=outbox_id or new_id(),
            upstream=self.upstream,
            method=call.method,
            path=call.path,
            query=call.query,
            headers=[(k, v) for k, v in call.headers.items() if k.lower() not in _DROP_HEADERS],
            body=body,
            created=now,
            expires=now + self.settings.max_age,
            due=now,
        )
        if doubt is not None:
            entry.state, entry.due, entry.sent_to = "doubt", now + self.settings.probe_after, [self.upstream]
            entry.attempts, entry.last_error = sent, f"{doubt} on the app's own call"
        try:
            await self.store.add(entry, max_entries=self.settings.max_entries)
        except OutboxFull:
            raise ProxyError(
                "outbox_full",
                f"the outbox of {self.upstream} holds {self.settings.max_entries} sends (outbox.max_entries)",
                retry_after=FULL_RETRY_AFTER,
            ) from None
        except OutboxUnavailable as exc:
            raise ProxyError(
                "state_unavailable", f"the outbox cannot store the send now: {exc}", retry_after=1.0
            ) from None
        self.wake()
        request = WireRequest(call.method, call.path, call.query, {k: v for k, v in call.headers.items()}, body)
        answer = self.plugin.outbox_accepted(entry.id, request)
        headers: CIMultiDict[str] = CIMultiDict(answer.headers)
        headers[OUTBOX_HEADER] = f"queued; id={entry.id}"
        return Response(answer.status, headers, body=answer.body, upstream=self.upstream, outcome="queued")


def build(ctx: StageContext) -> OutboxStage | None:
    if ctx.policy.outbox is None:
        return None
    store = ctx.extras.get("outbox_store")
    wake = ctx.extras.get("outbox_wake")
    if store is None:
        from proxy.outbox.store import MemoryOutbox

        # Without a server (a pipeline built in a test): a store of its own, nobody to wake.
        store = ctx.extras["outbox_store"] = MemoryOutbox(ctx.clock.wall)
    return OutboxStage(ctx, store, wake if callable(wake) else (lambda: None))
