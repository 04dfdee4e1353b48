"""Listeners, routing, the admin endpoints and the process lifecycle.

The main listener routes `/<upstream>/<rest>`; a policy's own `listen` port takes every
path of one upstream. Each call is turned into a `Call` value here, handed to the
upstream's pipeline, and the answer (or the `ProxyError`) is written back here: this
is the only module that touches aiohttp's server request and response objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.answers import error_response
from proxy.clock import Clock, RealClock
from proxy.config.loader import LoadResult, load_policy_dir
from proxy.errors import ProxyError
from proxy.events import CallFinished, ConfigReloaded, EventBus
from proxy.model import Call, CallStory, RequestBody, Response, unsafe_method
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics
from proxy.observe.status import CSP as STATUS_CSP
from proxy.observe.status import StatusBoard, render_html, safe_target, scrub
from proxy.routing import split_target
from proxy.runtime import Runtime, UpstreamRuntime
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState
from proxy.transport import strip_hop_by_hop

log = logging.getLogger("egressd")
# Start-up lines ("... listening on HOST:PORT") are printed at any --log-level: tools and
# operators rely on them to learn ports picked with :0. configure_logging pins this logger.
lifecycle = logging.getLogger("egressd.lifecycle")

# Small request bodies are read at once (one read, replayable for retries); larger ones stream.
READ_WHOLE_UP_TO = 64 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_DROP_REQUEST_HEADERS = ("host", "content-length", "expect")
# Limits on the request head, explicit rather than inherited (docs/security.md): past them
# the parser refuses the request with 400 `bad_request` before any routing happens.
MAX_REQUEST_LINE = 8190
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 128
# Methods refused before routing: CONNECT (egressd is no forward proxy) and TRACE (it would
# echo the app's credentials back; RFC 9110 section 9.3.8 lets a server refuse it).
_REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
_ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# Marks a request whose call egressd owns after the app left (its line comes later).
_ORPHAN = "egressd.orphan"
_SAFE_REASON = re.compile(r"[A-Za-z0-9 `'_./,()-]{1,80}")


class StartupError(Exception):
    """The server cannot start; the message says why (one line per problem)."""


@dataclass(frozen=True)
class Settings:
    policies: Path
    listen: tuple[str, int] = ("127.0.0.1", 8080)
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    redis_url: str | None = None
    redis_prefix: str = "egressd:"
    drain: float = 20.0
    watch_interval: float = 1.0
    # A connection whose request head (request line and headers) is not complete this many
    # seconds after it opened, or after the first byte of a later head on a kept-alive
    # connection, is closed (slowloris). 0 turns the timer off.
    header_timeout: float = 10.0
    # The durable store (`--data-dir`): idempotency and fingerprint records and the routing
    # ledger survive a restart. None keeps them in process memory (`--data-dir none`).
    data_dir: Path | None = None


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ProxyProtocol(RequestHandler):
    """aiohttp's connection handler plus a request-head deadline and egressd-shaped 400s.

    aiohttp has no header-read timeout: a client can hold a connection (and a file
    descriptor) for an hour by sending one header byte at a time. One timer per connection
    bounds that: armed when the connection opens, cancelled when a head is complete, and
    armed again only when bytes of a later head arrive in pieces. Body bytes never arm it,
    so a slow upload is not cut.
    """

    __slots__ = ("_body", "_head_timeout", "_head_timer", "_on_malformed")

    def __init__(
        self,
        manager: web.Server,
        *,
        head_timeout: float,
        on_malformed: Callable[[web.BaseRequest, BaseException | None], web.StreamResponse],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the last complete head on this connection
        self._on_malformed = on_malformed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._head_timeout > 0:
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if self._messages:
                self._body = self._messages[-1][1]
        elif (
            data
            and self._head_timer is None
            and self._head_timeout > 0
            and (self._body is None or self._body.is_eof())
        ):
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._current_request is not None or self._messages:
            # An earlier request is still being answered; look again later.
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)
            return
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response is already on the wire")
        # aiohttp's own 400 logs a traceback and echoes the offending bytes (a header that
        # may hold a secret) in the body; egressd answers in its own shape instead.
        resp = self._on_malformed(request, exc)
        resp.force_close()
        return resp


class _ProxyServer(web.Server):
    """`web.Server` that builds `_ProxyProtocol` connection handlers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Coroutine[Any, Any, web.StreamResponse]],
        *,
        head_timeout: float,
        on_malformed: Callable[[web.BaseRequest, BaseException | None], web.StreamResponse],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._head_timeout = head_timeout
        self._on_malformed = on_malformed

    def __call__(self) -> RequestHandler:
        return _ProxyProtocol(
            self, loop=self._loop, head_timeout=self._head_timeout, on_malformed=self._on_malformed, **self._kwargs
        )


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


def _malformed_reason(exc: BaseException | None) -> str:
    """The parser's one-line description, never the offending bytes (they may hold a secret)."""
    text = str(getattr(exc, "message", "") or "").split("\n", 1)[0].split(":", 1)[0].strip()
    return text if _SAFE_REASON.fullmatch(text) else "malformed request head"


class EgressServer:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        state: StateBackend | None = None,
        events: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or RealClock()
        self.events = events or EventBus()
        self.state: StateBackend = state or MemoryState(self.clock)
        self.runtime = Runtime(self.clock, self.events, self.state)
        self.metrics = Metrics(tallies=self.events.tallies)
        self.status = StatusBoard(tallies=self.events.tallies)
        self.events.subscribe(self.metrics)
        self.events.subscribe(self.status)
        self.access_log = AccessLog()
        self.events.subscribe(self.access_log)
        self.draining = False
        self.ready = False
        self.last_reload: dict[str, Any] | None = None
        self._runners: dict[str, web.BaseRunner] = {}  # "main", "admin", "upstream:<name>"
        self.addresses: dict[str, tuple[str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._files_seen: dict[str, tuple[float, int]] = {}
        self._reload_lock = asyncio.Lock()
        self._configured: dict[str, tuple[str, int]] = {}  # dedicated listener key -> address

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        result = load_policy_dir(self.settings.policies, secrets="strict")
        if not result.ok or result.policy_set is None:
            raise StartupError("\n".join(str(p) for p in result.problems if p.severity == "error"))
        self._warn(result)
        try:
            built = self.runtime.build(result.policy_set)
        except LookupError as exc:
            raise StartupError(str(exc)) from exc
        self.runtime.swap(built, result.policy_set)
        self._files_seen = self._scan_files()
        for name in built:
            self.metrics.declare_upstream(name)
        self.last_reload = {"result": "initial", "version": result.policy_set.version}
        try:
            await self._start_listener("admin", self.settings.admin, self._admin_app())
            await self._start_listener("main", self.settings.listen, self._main_handler(None))
            await self._sync_upstream_listeners()
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen: {exc}") from exc
        self.ready = True
        log.info(
            "policies loaded",
            extra={"version": result.policy_set.version, "upstreams": sorted(built), "state_backend": self.state.name},
        )

    async def _start_listener(self, key: str, addr: tuple[str, int], app: web.Application | web.Server) -> None:
        runner: web.BaseRunner
        if isinstance(app, web.Application):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.settings.drain)
        else:
            runner = web.ServerRunner(app, access_log=None, shutdown_timeout=self.settings.drain)
        await runner.setup()
        site = web.TCPSite(runner, addr[0], addr[1], backlog=1024, reuse_address=True)
        await site.start()
        sockets = runner.addresses
        bound = sockets[0] if sockets else addr
        host, port = str(bound[0]), int(bound[1])
        self._runners[key] = runner
        self.addresses[key] = (host, port)
        lifecycle.info(
            f"{key} listening on {_fmt_addr(host, port)}", extra={"listener": key, "address": _fmt_addr(host, port)}
        )
        if key == "admin" and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the admin listener is reachable from outside this host: it exposes metrics and status to anyone "
                "who can connect; bind it to 127.0.0.1 unless a network policy protects it",
                extra={"address": _fmt_addr(host, port)},
            )

    async def _sync_upstream_listeners(self) -> None:
        wanted: dict[str, tuple[str, int]] = {}
        for name, rt in self.runtime.upstreams.items():
            if rt.policy.listen:
                wanted[f"upstream:{name}"] = parse_hostport(rt.policy.listen)
        for key in [k for k in self._runners if k.startswith("upstream:")]:
            if key not in wanted or self._configured.get(key) != wanted[key]:
                runner = self._runners.pop(key)
                self.addresses.pop(key, None)
                self._configured.pop(key, None)
                self._spawn(runner.cleanup())
        for key, addr in wanted.items():
            if key not in self._runners:
                await self._start_listener(key, addr, self._main_handler(key.split(":", 1)[1]))
                self._configured[key] = addr

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain_and_stop(self) -> None:
        """SIGTERM: stop accepting, report not ready, let in-flight calls finish, exit."""
        if self.draining:
            return
        self.draining = True
        self.ready = False
        log.info("draining", extra={"in_flight": self._in_flight, "drain_seconds": self.settings.drain})
        # Stop accepting new connections on the proxy listeners; the admin stays up so /readyz says 503.
        for key, runner in list(self._runners.items()):
            if key != "admin":
                for site in list(runner.sites):
                    await site.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=self.settings.drain)
        await self.stop()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for key in list(self._runners):
            runner = self._runners.pop(key)
            await runner.cleanup()
        await self.runtime.close()
        await self.state.close()
        self.access_log.flush()

    # -- reload --------------------------------------------------------------------------
    def _scan_files(self) -> dict[str, tuple[float, int]]:
        """mtime and size of every policy file and of every crosswalk file they name."""
        seen: dict[str, tuple[float, int]] = {}
        try:
            entries = list(os.scandir(self.settings.policies))
        except OSError:
            return seen
        paths = [entry.path for entry in entries if entry.name.endswith((".yaml", ".yml"))]
        if self.runtime.policy_set is not None:
            paths += self.runtime.policy_set.crosswalk_files
        for path in paths:
            with contextlib.suppress(OSError):
                st = os.stat(path)
                seen[path] = (st.st_mtime, st.st_size)
        return seen

    async def watch(self) -> None:
        """Poll the policy directory; a change is picked up within `watch_interval` (+ load time)."""
        while True:
            await asyncio.sleep(self.settings.watch_interval)
            current = self._scan_files()
            if current != self._files_seen:
                self._files_seen = current
                await self.reload(reason="files changed")

    async def reload(self, reason: str = "SIGHUP") -> bool:
        async with self._reload_lock:
            result: LoadResult = await asyncio.get_running_loop().run_in_executor(
                None, lambda: load_policy_dir(self.settings.policies, secrets="strict")
            )
            problems = tuple(str(p) for p in result.problems if p.severity == "error")
            if not result.ok or result.policy_set is None:
                return self._reload_failed(reason, problems)
            try:
                built = self.runtime.build(result.policy_set)
            except LookupError as exc:
                return self._reload_failed(reason, (str(exc),))
            self.runtime.swap(built, result.policy_set)
            with contextlib.suppress(OSError):
                await self._sync_upstream_listeners()
            for name in built:
                self.metrics.declare_upstream(name)
            self.last_reload = {"result": "success", "version": result.policy_set.version, "reason": reason}
            self.events.emit(ConfigReloaded("success", result.policy_set.version))
            self._warn(result)
            log.info("policies reloaded", extra={"version": result.policy_set.version, "reason": reason})
            return True

    def _reload_failed(self, reason: str, problems: tuple[str, ...]) -> bool:
        self.last_reload = {"result": "failure", "version": self.runtime.version, "problems": list(problems)}
        self.events.emit(ConfigReloaded("failure", None, problems))
        log.error(
            "policy reload rejected; the previous set keeps serving",
            extra={"reason": reason, "problems": list(problems), "version": self.runtime.version},
        )
        return False

    def _warn(self, result: LoadResult) -> None:
        for problem in result.problems:
            if problem.severity == "warning":
                log.warning(str(problem))

    # -- the proxy handler ---------------------------------------------------------------
    def _main_handler(self, fixed_upstream: str | None) -> web.Server:
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return await self.handle(request, fixed_upstream)

        return _ProxyServer(
            handler,
            head_timeout=self.settings.header_timeout,
            on_malformed=self._malformed,
            access_log=None,
            handler_cancellation=True,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_HEADER_FIELD,
            max_headers=MAX_HEADERS,
            # Bodies are forwarded as sent: decompressing them here would send plain bytes
            # under the app's Content-Encoding (and invite decompression bombs).
            auto_decompress=False,
        )

    def _malformed(self, request: web.BaseRequest, exc: BaseException | None) -> web.StreamResponse:
        """A request the HTTP parser refused (smuggling, bad header bytes, limits): 400, closed."""
        request_id = os.urandom(16).hex()
        error = ProxyError("bad_request", f"malformed HTTP request: {_malformed_reason(exc)}")
        response = error_response(error, request_id=request_id)
        response.headers["X-Request-Id"] = request_id
        self._finish(response, "", "-", request_id, 0.0, len(response.body or b""), request, None)
        return web.Response(status=response.status, headers=response.headers, body=response.body)

    async def handle(self, request: web.BaseRequest, fixed_upstream: str | None) -> web.StreamResponse:
        started = self.clock.now()
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._handle(request, fixed_upstream, started)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _handle(self, request: web.BaseRequest, fixed: str | None, started: float) -> web.StreamResponse:
        incoming = request.headers.get("X-Request-Id")
        request_id = incoming if incoming and _REQUEST_ID.fullmatch(incoming) else f"{random.getrandbits(128):032x}"
        rt: UpstreamRuntime | None = None
        route = fixed or ""
        path = request.raw_path
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
            call = await self._make_call(request, rt, target.path, target.query, request_id, started)
            if unsafe_method(call.method):
                response = await self._owned(call, rt, route, path, request, started)
            else:
                response = await rt.pipeline.handle(call)
        except asyncio.CancelledError:
            # The app went away before its answer: the call ends here (an unsafe call that
            # was sent goes on in `_owned`, which writes its own line when it ends).
            if not self._orphaned(request):
                self._finish(
                    Response(499, CIMultiDict(), upstream=rt.name if rt else ""),
                    route, path, request_id, self.clock.now() - started, 0, request, None, app_gone=True,
                )
            raise
        except ProxyError as exc:
            response = error_response(
                exc, request_id=request_id, plugin=rt.plugin if rt else None, upstream=rt.name if rt else ""
            )
            response.notes["detail"] = exc.detail
            response.attempts = getattr(exc, "attempts", 0)
            if exc.code == "method_not_allowed":
                response.headers["Allow"] = _ALLOWED_METHODS
            elif exc.detail == "framing" or exc.code == "body_too_large":
                # The rest of the connection cannot be trusted (framing), or holds a body we
                # will not read (413): close it rather than linger on it.
                response.notes["close"] = True
        except Exception as exc:  # a bug must still give exactly one answer
            log.exception("internal error", extra={"request_id": request_id})
            response = error_response(
                ProxyError("upstream_unreachable", f"internal proxy error ({type(exc).__name__})"),
                request_id=request_id,
                plugin=rt.plugin if rt else None,
                upstream=rt.name if rt else "",
            )
        return await self._write(request, response, route, path, request_id, started)

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
            self._in_flight += 1
            self._idle.clear()
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
                    response.notes["detail"] = exc.detail
                elif exc is not None:
                    log.error("internal error in an owned call", exc_info=exc, extra={"request_id": request_id})
                    response = Response(502, CIMultiDict(), upstream=route, error_code="upstream_unreachable")
                else:
                    response = task.result()
                    with contextlib.suppress(Exception):
                        await response.close()
            self._finish(
                response, route, path, request_id, self.clock.now() - started, 0, request, None, app_gone=True
            )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _make_call(
        self, request: web.BaseRequest, rt: UpstreamRuntime, path: str, query: str, request_id: str, started: float
    ) -> Call:
        policy = rt.policy
        max_body = policy.limits.max_body
        length = request.content_length
        if length is not None and length > max_body:
            raise ProxyError("body_too_large", f"request body of {length} bytes is over limits.max_body ({max_body})")
        if not request.body_exists:
            body = RequestBody.empty()
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
        self, request: web.BaseRequest, response: Response, route: str, path: str, request_id: str, started: float
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
            if "close" in response.notes:
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
                self._finish(response, route, path, request_id, self.clock.now() - started, sent, request, aborted)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return out
            finally:
                await response.close()
        self._finish(response, route, path, request_id, duration, sent, request, aborted)
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
    ) -> None:
        status = response.status
        noted = response.notes.get("outcome")  # "replayed" or "cached", set by the stages
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
                detail=response.notes.get("detail") or response.notes.get("retry_skipped"),
                app_gone=app_gone,
            )
        )

    # -- admin -----------------------------------------------------------------------------
    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_html)
        app.router.add_get("/status.json", self._status_json)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.ready and not self.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if self.draining else "not ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def status_data(self) -> dict[str, Any]:
        """`/status.json`; docs/operations.md ("Status page") documents every field."""
        upstreams: dict[str, Any] = {}
        for name, rt in sorted(self.runtime.upstreams.items()):
            stages: dict[str, dict[str, Any]] = {}
            for stage in rt.pipeline.stages:
                snapshot: Callable[[], Coroutine[Any, Any, dict[str, Any]]] | None = getattr(stage, "snapshot", None)
                if snapshot is not None:
                    with contextlib.suppress(Exception):
                        stages[str(getattr(stage, "name", type(stage).__name__))] = await snapshot()
            snap = self.status.upstream_snapshot(name, stages)
            snap["target"] = safe_target(rt.policy.target)
            snap["provider"] = rt.policy.provider.name
            snap["stages"] = list(rt.pipeline.stage_names)
            upstreams[name] = snap
        health = getattr(self.state, "health", None)
        try:
            health_text = scrub(str(health())) if callable(health) else "ok"
        except Exception as exc:
            health_text = f"unknown: {type(exc).__name__}"
        reload: dict[str, Any] = dict(self.last_reload or {})
        reload["problems"] = [scrub(str(p)) for p in reload.get("problems") or []]
        reload["time"] = self.status.reloads[-1]["time"] if self.status.reloads else round(self.status.started, 3)
        return {
            **self.status.clock_snapshot(),
            "policy_version": self.runtime.version,
            "last_reload": reload,
            "recent_reloads": list(reversed(self.status.reloads)),
            "ready": self.ready,
            "draining": self.draining,
            "in_flight": self._in_flight,
            "state_backend": {
                "name": self.state.name,
                "health": health_text,
                **self.status.backend_snapshot(),
                **self._records_snapshot(),
            },
            "upstreams": upstreams,
        }

    def _records_snapshot(self) -> dict[str, Any]:
        """Counts of claims refused and write-backs pending (Redis); never keys or values."""
        snapshot: Callable[[], dict[str, Any]] | None = getattr(self.state, "records_snapshot", None)
        if snapshot is None:
            return {}
        try:
            return {"records": snapshot()}
        except Exception as exc:
            return {"records": {"error": type(exc).__name__}}

    async def _status_json(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(await self.status_data(), default=str),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def _status_html(self, request: web.Request) -> web.Response:
        return web.Response(
            text=render_html(await self.status_data()),
            content_type="text/html",
            headers={
                "Content-Security-Policy": STATUS_CSP,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )


async def serve(settings: Settings, *, stop_event: asyncio.Event | None = None) -> int:
    """`egressd run`: serve until SIGTERM/SIGINT, reload on SIGHUP and on file changes."""
    events = EventBus()
    from proxy.state.factory import DataDirError, open_state

    try:
        # Redis (when given) is wrapped with a time budget and a local fallback; the data
        # dir (when given) holds the records that must survive a restart.
        state = open_state(
            data_dir=settings.data_dir, redis_url=settings.redis_url, redis_prefix=settings.redis_prefix, events=events
        )
    except DataDirError as exc:
        log.error(str(exc))
        return 1
    server = EgressServer(settings, state=state, events=events)
    try:
        await server.start()
    except StartupError as exc:
        for line in str(exc).splitlines():
            log.error(line)
        return 1
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server._spawn(server.reload("SIGHUP")))
    watcher = loop.create_task(server.watch())
    await stop.wait()
    watcher.cancel()
    await server.drain_and_stop()
    log.info("stopped")
    return 0
