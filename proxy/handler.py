"""The proxy handler: one aiohttp request in, one `Call` through the pipeline, one answer out.

`ProxyHandler.handle` refuses what must never be routed (draining, CONNECT, TRACE, bad
framing, header bytes that are not UTF-8, a bad target: proxy/routing.py), turns the
request into a `Call` value (proxy/model.py), runs it through its upstream's pipeline,
writes the answer (or streams it), and emits one `CallFinished` per call, which is the
access-log line and the call metrics. It is the only place where a `ProxyError` becomes
an answer (proxy/answers.py, shaped by the provider plugin).

It also owns unsafe calls (contract 7.2, `_owned`): when the app leaves, a call that has
started sending runs on to its outcome and its line is written when it ends
(`_settle_orphan`, outcome `app_gone`); a call not sent yet is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answers import error_response
from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.events import CallFinished, EventBus
from proxy.headers import strip_hop_by_hop
from proxy.model import Call, CallStory, RequestBody, Response, unsafe_method
from proxy.routing import rewrite_location, split_target
from proxy.runtime import Runtime, UpstreamRuntime

log = logging.getLogger("egressd")

Spawn = Callable[[Coroutine[Any, Any, Any]], None]

# Small request bodies are read at once (one read, replayable for retries); larger ones stream.
READ_WHOLE_UP_TO = 64 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_DROP_REQUEST_HEADERS = ("host", "content-length", "expect")
# Methods refused before routing: CONNECT (egressd is no forward proxy) and TRACE (it would
# echo the app's credentials back; RFC 9110 section 9.3.8 lets a server refuse it).
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Marks a request whose call egressd owns after the app left (its line comes later).
_ORPHAN = "egressd.orphan"
_SAFE_REASON = re.compile(r"[A-Za-z0-9 `'_./,()-]{1,80}")
_LIMIT_FLAG = ("(--max-request-header-size)", "(--max-request-headers)")


async def _after_continue(request: web.BaseRequest, continued: list[bool]) -> AsyncIterator[bytes]:
    """The body of an `Expect: 100-continue` request: `100 Continue` is written the moment
    something first reads it, then the body streams as usual."""
    if not continued[0]:
        continued[0] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    async for chunk in request.content.iter_chunked(64 * 1024):
        yield chunk


def _refuse_method_or_framing(request: web.BaseRequest) -> None:
    """CONNECT, TRACE, HTTP/0.9, and HTTP/1.0 with Transfer-Encoding (ambiguous framing)."""
    if request.method == "CONNECT":
        raise ProxyError("bad_request", "CONNECT is not supported: egressd is a reverse proxy")
    if request.method == "TRACE":
        raise ProxyError("method_not_allowed", "TRACE is not allowed: it would echo credentials back")
    if request.version < (1, 0):
        raise ProxyError("bad_request", "HTTP/0.9 is not supported", detail="framing")
    if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
        # RFC 9112 section 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        raise ProxyError("bad_request", "Transfer-Encoding in an HTTP/1.0 request", detail="framing")


def _check_header_text(headers: CIMultiDictProxy[str]) -> None:
    """Refuse header values that are not UTF-8 (aiohttp hands them over surrogate-escaped)."""
    for value in headers.values():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ProxyError("bad_request", "a header value is not valid UTF-8") from None


def _malformed_reason(description: str) -> str:
    """The parser's one-line description, never the offending bytes (they may hold a secret)."""
    text = description.split("\n", 1)[0].split(":", 1)[0].strip()
    return text if _SAFE_REASON.fullmatch(text) else "malformed request head"


class ProxyHandler:
    """Answers the proxy listeners' requests; counts the calls in flight for the drain."""

    def __init__(self, runtime: Runtime, clock: Clock, events: EventBus, spawn: Spawn) -> None:
        self.runtime = runtime
        self.clock = clock
        self.events = events
        self._spawn = spawn
        # Set when the drain begins: new calls get 503 `draining`, answers close their connection.
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()  # set while no call is in flight
        self.idle.set()
        # The tasks answering a request now, and those `cut()` cancelled at the drain's end
        # (each still gets an answer: contract 7.3).
        self._running: set[asyncio.Task[Any]] = set()
        self._cut: set[asyncio.Task[Any]] = set()

    def cut(self) -> int:
        """The drain ran out: end every call still running, each with an answer (a call
        that may have reached its upstream gets 504 `upstream_timeout`, detail `draining`;
        one never sent 503 `draining`). Returns how many were cut."""
        for task in self._running:
            self._cut.add(task)
            task.cancel()
        return len(self._running)

    def _cut_off(self, sent: bool) -> ProxyError | None:
        """Inside `except CancelledError`: the error to answer with when the cancellation
        was `cut()`'s (the task is uncancelled and goes on to write it); else None."""
        task = asyncio.current_task()
        if task is None or task not in self._cut:
            return None
        self._cut.discard(task)
        task.uncancel()
        if sent:
            return ProxyError(
                "upstream_timeout",
                "egressd is shutting down: the drain ended before the upstream answered",
                detail="draining",
            )
        return ProxyError(
            "draining", "egressd is shutting down: the drain ended before the call was sent", retry_after=1
        )

    def malformed(self, request: web.BaseRequest, description: str) -> web.StreamResponse:
        """A request the HTTP parser refused (smuggling, bad header bytes, limits): 400, closed."""
        request_id = os.urandom(16).hex()
        reason = _malformed_reason(description)
        # A head limit (proxy/listener.py's limit_reason) is named as is, with its flag.
        message = reason if reason.endswith(_LIMIT_FLAG) else f"malformed HTTP request: {reason}"
        error = ProxyError("bad_request", message)
        response = error_response(error, request_id=request_id)
        response.headers["X-Request-Id"] = request_id
        self._finish(response, "", "-", request_id, 0.0, len(response.body or b""), request, None)
        return web.Response(status=response.status, headers=response.headers, body=response.body)

    async def handle(self, request: web.BaseRequest, fixed_upstream: str | None) -> web.StreamResponse:
        started = self.clock.now()
        self.in_flight += 1
        self.idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        try:
            out = await self._handle(request, fixed_upstream, started)
            if self.draining:
                # The drain closes the connection after this answer (Connection: close).
                if out.prepared:
                    request.protocol.close()
                else:
                    out.force_close()
            return out
        finally:
            self._running.discard(task)
            self._cut.discard(task)
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def _handle(self, request: web.BaseRequest, fixed: str | None, started: float) -> web.StreamResponse:
        incoming = request.headers.get("X-Request-Id")
        request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else f"{random.getrandbits(128):032x}"
        rt: UpstreamRuntime | None = None
        route = fixed or ""
        path = request.raw_path
        story: CallStory | None = None
        try:
            if self.draining:
                raise ProxyError("draining", "egressd is shutting down", retry_after=1)
            if request.method in _REFUSED_METHODS or request.version != HttpVersion11:
                _refuse_method_or_framing(request)
            _check_header_text(request.headers)
            target = split_target(request.raw_path, fixed)
            rt = self.runtime.get(target.upstream)
            if rt is None:
                # The name stays out of metric labels: a client must not create label values.
                raise ProxyError("unknown_upstream", f"no upstream named {target.upstream[:64]!r}")
            route = target.upstream
            path = target.path + ("?" + target.query if target.query else "")
            expects_continue = request.headers.get("Expect", "").strip().lower() == "100-continue"
            continued = [False]
            call = await self._make_call(
                request, rt, target.path, target.query, request_id, started, continued if expects_continue else None
            )
            story = call.story
            if unsafe_method(call.method):
                response = await self._owned(call, rt, route, path, request, started)
            else:
                response = await rt.pipeline.handle(call)
            if 300 <= response.status < 400 and response.upstream in ("", rt.name):
                location = response.headers.get("Location")
                if location is not None:
                    # Passed back, never followed; pointed through egressd when it names
                    # the upstream's own target (contract 7.4).
                    response.headers["Location"] = rewrite_location(
                        location, rt.policy.target, None if fixed else route
                    )
            if expects_continue and not request.content.is_eof() and not continued[0]:
                # The body was never asked for (a cached or replayed answer): the app may
                # still be holding it back, so the connection cannot be reused.
                response.close_connection = True
        except asyncio.CancelledError:
            cut = self._cut_off(sent=True)  # a safe call cut by the drain's end: answered
            if cut is None:
                # The app went away before its answer: the call ends here (an unsafe call that
                # was sent goes on in `_owned`, which writes its own line when it ends).
                if not self._orphaned(request):
                    self._finish(
                        Response(499, CIMultiDict(), upstream=rt.name if rt else ""),
                        route,
                        path,
                        request_id,
                        self.clock.now() - started,
                        0,
                        request,
                        None,
                        app_gone=True,
                    )
                raise
            response = error_response(
                cut, request_id=request_id, plugin=rt.plugin if rt else None, upstream=rt.name if rt else ""
            )
            response.detail = cut.detail
        except ProxyError as exc:
            response = error_response(
                exc, request_id=request_id, plugin=rt.plugin if rt else None, upstream=rt.name if rt else ""
            )
            response.detail = exc.detail
            response.attempts = exc.attempts
            if exc.code == "method_not_allowed":
                response.headers["Allow"] = _ALLOWED_METHODS
            elif request.headers.get("Expect", "").strip().lower() == "100-continue" and not request.content.is_eof():
                # The final error instead of `100 Continue`: the app may still send the body
                # it held back, so the connection is not reused.
                response.close_connection = True
            elif exc.detail == "framing" or exc.code == "body_too_large":
                # The rest of the connection cannot be trusted (framing), or holds a body we
                # will not read (413): close it rather than linger on it.
                response.close_connection = True
        except Exception as exc:  # a bug must still give exactly one answer
            log.exception("internal error", extra={"request_id": request_id})
            response = error_response(
                ProxyError("upstream_unreachable", f"internal proxy error ({type(exc).__name__})"),
                request_id=request_id,
                plugin=rt.plugin if rt else None,
                upstream=rt.name if rt else "",
            )
        return await self._write(request, response, route, path, request_id, started, story)

    # -- ownership of unsafe calls (contract 7.2) ----------------------------------------
    async def _owned(
        self,
        call: Call,
        rt: UpstreamRuntime,
        route: str,
        path: str,
        request: web.BaseRequest,
        started: float,
    ) -> Response:
        """Run an unsafe call so that the app leaving does not cancel it once it may have
        reached the upstream (contract 7.2): egressd owns it to its outcome, which the
        stages record (idempotency, fingerprint), so a resend joins it or gets its answer."""
        story = call.story
        assert story is not None
        task: asyncio.Task[Response] = asyncio.ensure_future(rt.pipeline.handle(call))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cut = self._cut_off(sent=story.sending > 0)
            if cut is not None:
                # The drain ran out: the app gets its answer now; a call not sent yet ends
                # here, one that was sent runs on until the process exits.
                if task.done() and not task.cancelled() and task.exception() is None:
                    return task.result()
                if story.sending == 0:
                    task.cancel()
                raise cut from None
            story.app_gone = True
            if task.done():
                # Answered at the moment the app left: nobody will write the answer, so
                # free its upstream connection.
                if not task.cancelled() and task.exception() is None:
                    self._spawn(task.result().close())
                raise
            if story.sending == 0:
                task.cancel()  # nothing went upstream yet: the call ends here, unsent
                raise
            # Owned: it runs on (bounded by its own deadline); it counts as in flight for
            # the drain, and its line is written when it ends.
            request[_ORPHAN] = True
            self.in_flight += 1
            self.idle.clear()
            task.add_done_callback(
                lambda done: self._spawn(self._settle_orphan(done, route, path, call.request_id, started, request))
            )
            raise

    @staticmethod
    def _orphaned(request: web.BaseRequest) -> bool:
        return bool(request.get(_ORPHAN))

    async def _settle_orphan(
        self,
        task: asyncio.Task[Response],
        route: str,
        path: str,
        request_id: str,
        started: float,
        request: web.BaseRequest,
    ) -> None:
        """An owned call whose app left has ended: free its answer, write its one line."""
        try:
            if task.cancelled():
                response = Response(499, CIMultiDict(), upstream=route)
            else:
                exc = task.exception()
                if isinstance(exc, ProxyError):
                    response = error_response(exc, request_id=request_id, upstream=route)
                    response.detail = exc.detail
                elif exc is not None:
                    log.error("internal error in an owned call", exc_info=exc, extra={"request_id": request_id})
                    response = Response(502, CIMultiDict(), upstream=route, error_code="upstream_unreachable")
                else:
                    response = task.result()
                    with contextlib.suppress(Exception):
                        await response.close()
            self._finish(response, route, path, request_id, self.clock.now() - started, 0, request, None, app_gone=True)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    # -- request in, answer out ----------------------------------------------------------
    async def _make_call(
        self,
        request: web.BaseRequest,
        rt: UpstreamRuntime,
        path: str,
        query: str,
        request_id: str,
        started: float,
        continued: list[bool] | None = None,
    ) -> Call:
        """The `Call` value of a request. `continued` (for `Expect: 100-continue`): the body
        is read only when the pipeline first asks for it (a stage that buffers it, or the
        transport sending it after any rate-limit queue), and `100 Continue` goes out then;
        `continued[0]` says whether it did (contract 7.3, 7.7)."""
        policy = rt.policy
        max_body = policy.limits.max_body
        length = request.content_length
        if length is not None and length > max_body:
            raise ProxyError("body_too_large", f"request body of {length} bytes is over limits.max_body ({max_body})")
        if not request.body_exists:
            body = RequestBody.empty()
        elif continued is not None:
            body = RequestBody(source=_after_continue(request, continued), length=length, max_body=max_body)
        elif length is not None and length <= READ_WHOLE_UP_TO:
            body = RequestBody(data=await request.read())
        else:
            body = RequestBody(source=request.content.iter_chunked(64 * 1024), length=length, max_body=max_body)
        headers = strip_hop_by_hop(request.headers, drop=_DROP_REQUEST_HEADERS)
        headers["X-Request-Id"] = request_id
        return Call(
            method=request.method,
            upstream=policy.upstream,
            path=path,
            query=query,
            headers=CIMultiDictProxy(headers),
            body=body,
            deadline=started + policy.timeouts.total,
            started=started,
            request_id=request_id,
            route=policy.upstream,
            story=CallStory(),
        )

    async def _write(
        self,
        request: web.BaseRequest,
        response: Response,
        route: str,
        path: str,
        request_id: str,
        started: float,
        story: CallStory | None = None,
    ) -> web.StreamResponse:
        headers = response.headers
        headers["X-Request-Id"] = request_id
        if response.upstream:
            headers["X-Egressd-Upstream"] = response.upstream
        if response.attempts:
            headers["X-Egressd-Attempts"] = str(response.attempts)
        if response.cache:
            headers["X-Egressd-Cache"] = response.cache
        if response.failover:
            headers["X-Egressd-Failover"] = response.failover
        if self.draining:
            headers["Connection"] = "close"
        sent = 0
        aborted: str | None = None
        if response.stream is None:
            out: web.StreamResponse = web.Response(status=response.status, headers=headers, body=response.body)
            if response.close_connection:
                out.force_close()
            sent = len(response.body or b"")
            duration = self.clock.now() - started
        else:
            out = web.StreamResponse(status=response.status, headers=headers)
            try:
                await out.prepare(request)
                duration = self.clock.now() - started
                async for chunk in response.stream:
                    await out.write(chunk)
                    sent += len(chunk)
                await out.write_eof()
            except BaseException as exc:
                # Headers are out: the only honest signal left is to abort the connection,
                # so the app never mistakes a cut-short answer for a complete one.
                aborted = exc.code if isinstance(exc, ProxyError) else type(exc).__name__
                if request.transport is not None:
                    request.transport.abort()
                self._finish(
                    response, route, path, request_id, self.clock.now() - started, sent, request, aborted, story=story
                )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return out
            finally:
                await response.close()
        self._finish(response, route, path, request_id, duration, sent, request, aborted, story=story)
        return out

    def _finish(
        self,
        response: Response,
        route: str,
        path: str,
        request_id: str,
        duration: float,
        sent: int,
        request: web.BaseRequest,
        aborted: str | None,
        *,
        app_gone: bool = False,
        story: CallStory | None = None,
    ) -> None:
        status = response.status
        # egressd's own share of the call: what neither the upstream's attempts nor a wait
        # the policy asked for took (docs/operations.md, "overhead").
        overhead = None
        if story is not None and not app_gone:
            overhead = max(0.0, duration - story.upstream_seconds - story.held_seconds)
        noted = response.outcome  # "replayed" or "cached", set by the stages
        if response.error_code:
            outcome = "proxy_error"
        elif noted:
            outcome = noted
        elif status >= 500:
            outcome = "upstream_error"
        elif status >= 400:
            outcome = "client_error"
        else:
            outcome = "success"
        if aborted:
            outcome = "aborted"
        elif app_gone and status == 499:
            outcome = "app_gone"
        self.events.emit(
            CallFinished(
                route=route or "-",
                upstream=response.upstream or route or "-",
                method=request.method,
                path=path,
                status=status,
                outcome=outcome,
                attempts=response.attempts,
                duration=duration,
                request_id=request_id,
                error_code=response.error_code or aborted,
                cache=response.cache,
                failover=response.failover,
                bytes_out=sent,
                detail=response.detail or response.retry_skipped,
                app_gone=app_gone,
                overhead=overhead,
            )
        )
