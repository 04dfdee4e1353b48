"""The webhook listener (`--webhook-listen`, contract 7.5): the one listener meant to face
the internet. It serves `POST /<upstream>` (and any path below it) for upstreams with a
`webhooks` block, and nothing else: no proxying, no admin, never a request to anywhere
but the provider's own verify API (PayPal) through that upstream's pipeline.

One POST's way: limits (the upstream's `limits.max_body`: 413, nothing read past it) ->
verify with the provider's scheme (the plugin; PayPal: its verify API, through the paypal
upstream's attempt loop and auth) -> split into events -> store, recording the event ids
(a repeat within `dedupe_for` is answered 200 and not stored) -> 200, once the store has
committed. A refusal is 400 with a short reason word and stores nothing; a check that
could not be made (PayPal's API away, the store away) is 503, so the provider retries.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from plugins.webhooks import InboundEvent, RemoteCheck, Verdict
from proxy.config.schema import UPSTREAM_NAME_RE
from proxy.errors import ProxyError
from proxy.events import EventBus, WebhookResult
from proxy.headers import strip_hop_by_hop
from proxy.model import Call, RequestBody
from proxy.webhooks.store import WebhookEntry, WebhookStore, WebhooksUnavailable, new_id

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.clock import Clock
    from proxy.runtime import Runtime, UpstreamRuntime

log = logging.getLogger("egressd.webhooks")

REMOTE_ANSWER_LIMIT = 64 * 1024
#: Headers never stored nor passed to the app: hop-by-hop ones (proxy/headers.py), Host,
#: the framing of this request, and egressd's own (a sender must not be able to forge
#: `X-Egressd-Translated-From` or `X-Egressd-Webhook-Id`).
_NOT_KEPT = ("Host", "Content-Length", "Expect")
#: How many times a POST whose ids raced with another is tried again with what is left.
_ADD_TRIES = 3


def _answer(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=text + "\n",
        content_type="text/plain",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **headers},
    )


def kept_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> list[tuple[str, str]]:
    """The provider's end-to-end headers, as stored and delivered (contract 7.8)."""
    clean = strip_hop_by_hop(headers, drop=_NOT_KEPT)
    return [(k, v) for k, v in clean.items() if not k.lower().startswith("x-egressd-")]


class WebhookListener:
    """The handler behind the webhook listener (proxy/server.py starts it)."""

    def __init__(
        self,
        runtime: Runtime,
        store: WebhookStore,
        clock: Clock,
        events: EventBus,
        *,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self.events = events
        self.wake = wake

    def malformed(self, request: web.BaseRequest, description: str) -> web.StreamResponse:
        """A request the HTTP parser refused (bad bytes, a head limit): 400, nothing stored."""
        return _answer(400, "bad_request")

    def _count(self, upstream: str, result: str, n: int = 1) -> None:
        if n > 0:
            self.events.emit(WebhookResult(upstream, result, n))

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        segment = request.raw_path.split("?", 1)[0].lstrip("/").split("/", 1)[0]
        rt = self.runtime.get(segment) if UPSTREAM_NAME_RE.fullmatch(segment) else None
        hooks = rt.policy.webhooks if rt is not None else None
        if rt is None or hooks is None:
            return _answer(404, "not_found")
        if request.method != "POST":
            return _answer(405, "method_not_allowed", Allow="POST")
        limit = rt.policy.limits.max_body
        if request.content_length is not None and request.content_length > limit:
            self._count(rt.name, "rejected")
            return _answer(413, "body_too_large", Connection="close")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                self._count(rt.name, "rejected")
                return _answer(413, "body_too_large", Connection="close")
            chunks.append(chunk)
        body = b"".join(chunks)
        headers = request.headers
        now = self.clock.wall()
        secrets = hooks.webhook_secrets()
        verdict = rt.plugin.verify_webhook(body, headers, secrets, now, hooks.tolerance)
        if verdict.remote is not None:
            verdict = await self._remote(rt, verdict.remote)
        if not verdict.ok:
            if verdict.transient:
                log.warning(
                    "webhook verification could not be made: answered 503 so the provider retries",
                    extra={"upstream": rt.name, "reason": verdict.reason},
                )
                return _answer(503, verdict.reason, **{"Retry-After": "30"})
            self._count(rt.name, "rejected")
            log.warning("webhook refused", extra={"upstream": rt.name, "reason": verdict.reason})
            return _answer(400, verdict.reason)
        events = rt.plugin.webhook_events(body, headers)
        if not events:
            self._count(rt.name, "rejected")
            return _answer(400, "no_events")
        try:
            stored, duplicates = await self._store(rt, body, kept_headers(headers), events, now)
        except WebhooksUnavailable as exc:
            log.error("webhook not stored: answered 503", extra={"upstream": rt.name, "error": str(exc)})
            return _answer(503, "store_unavailable", **{"Retry-After": "5"})
        self._count(rt.name, "received", stored)
        self._count(rt.name, "duplicate", duplicates)
        if stored and self.wake is not None:
            self.wake()
        return _answer(200, "ok" if stored else "duplicate")

    async def _remote(self, rt: UpstreamRuntime, check: RemoteCheck) -> Verdict:
        """The provider's verify API (PayPal), through the upstream's attempt loop and auth."""
        now = self.clock.now()
        call = Call(
            method=check.method,
            upstream=rt.name,
            path=check.path,
            query="",
            headers=CIMultiDictProxy(CIMultiDict(check.headers)),
            body=RequestBody(data=check.body),
            deadline=now + rt.policy.timeouts.total,
            started=now,
            request_id="wh-verify-" + os.urandom(8).hex(),
            route=rt.name,
        )
        try:
            answer = await rt.pipeline.upstream(call)
            try:
                data = await answer.read(REMOTE_ANSWER_LIMIT)
            finally:
                await answer.close()
        except ProxyError as exc:
            return Verdict(False, f"remote_check_{exc.code}", transient=True)
        if answer.error_code is not None:
            return Verdict(False, f"remote_check_{answer.error_code}", transient=True)
        return rt.plugin.remote_verdict(answer.status, data)

    async def _store(
        self,
        rt: UpstreamRuntime,
        body: bytes,
        headers: list[tuple[str, str]],
        events: list[InboundEvent],
        now: float,
    ) -> tuple[int, int]:
        """Store what is new of this POST; returns (events stored, duplicates)."""
        hooks = rt.policy.webhooks
        assert hooks is not None
        unique = list({e.id: e for e in events}.values())
        new = unique
        stored_body = body
        for _ in range(_ADD_TRIES):
            entry = WebhookEntry(
                id=new_id(),
                upstream=rt.name,
                event_ids=[e.id for e in new],
                types=[e.type for e in new],
                headers=headers,
                body=stored_body,
                received=now,
                expires=now + hooks.max_age,
                dedupe_until=now + hooks.dedupe_for,
                due=now,
            )
            started = time.monotonic()
            seen = set(await self.store.add(entry))
            if not seen:
                if time.monotonic() - started > 0.5:
                    log.warning("webhook store slow", extra={"upstream": rt.name})
                return len(new), len(unique) - len(new)
            new = [e for e in new if e.id not in seen]
            if not new:
                return 0, len(unique)
            stored_body = self._part_of(rt, body, new, now)
        raise WebhooksUnavailable("event ids kept changing under concurrent deliveries")

    def _part_of(self, rt: UpstreamRuntime, body: bytes, new: list[InboundEvent], now: float) -> bytes:
        """The body to store when some events of a batch (SendGrid) were seen before: the
        new events alone, each as received, where egressd can sign that body for the app
        (a `signing_key`); otherwise the whole POST, whose provider signature the app can
        still check (it then sees the repeated events again and deduplicates on their ids)."""
        if not body.lstrip().startswith(b"["):
            return body
        part = b"[" + b",".join(e.body for e in new) + b"]"
        hooks = rt.policy.webhooks
        assert hooks is not None
        if rt.plugin.signed_delivery(part, hooks.webhook_secrets(), now) is None:
            return body
        return part
