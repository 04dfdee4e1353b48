"""The one module that touches aiohttp's server internals; tests/test_aiohttp_compat.py
fails, naming the attribute, when an aiohttp upgrade removes or renames one of them.

aiohttp's low-level server has public hooks for what egressd's listener sets
(`web.Server(handler, handler_cancellation=..., max_line_size=..., max_field_size=...,
max_headers=..., keepalive_timeout=..., auto_decompress=...)`, `web.ServerRunner`), but
none for two things egressd needs:

1. **A request-head deadline** (slowloris), and closing the idle connections at once
   when the drain begins (`close_if_idle`: aiohttp's own shutdown would also stop
   reading the bodies of requests still being answered). aiohttp has no header-read timeout, and its
   keep-alive timer cannot stand in for one: it would also cut an idle kept-alive
   connection, which must stay open. One timer per connection: armed when the connection
   opens, cancelled when a head is complete, armed again only when bytes of a later head
   arrive in pieces. Body bytes never arm it, so a slow upload is not cut. That needs to
   see bytes arrive and heads complete: the per-connection protocol.
2. **The answer to a request the HTTP parser refused.** aiohttp's own 400 logs a
   traceback and echoes the offending bytes (a header that may hold a secret) in its
   body; egressd answers in its own shape instead. aiohttp builds that answer in the
   protocol's `handle_error`.

Both live in `GuardedProtocol`, a subclass of `web.RequestHandler` (exported by
`aiohttp.web`, but its state is private). What it relies on is listed in `INTERNALS`;
`missing_internals()` checks them. The callers see only `guarded_server()`, whose
arguments are plain values and callables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

# Every aiohttp internal this module relies on: (owner, attribute, what egressd uses it for).
# An instance attribute is checked on a live protocol object (tests/test_aiohttp_compat.py).
INTERNALS: tuple[tuple[str, str, str], ...] = (
    ("RequestHandler", "_request_count", "int: request heads parsed on the connection (a head completed)"),
    ("RequestHandler", "_messages", "deque of (message, payload): parsed heads not yet handled"),
    ("RequestHandler", "_current_request", "the request whose handler is running, or None"),
    ("RequestHandler", "data_received", "asyncio protocol method, extended to watch head bytes"),
    ("RequestHandler", "connection_made", "asyncio protocol method, extended to arm the head timer"),
    ("RequestHandler", "connection_lost", "asyncio protocol method, extended to cancel the head timer"),
    ("RequestHandler", "force_close", "closes the connection when the head timer expires"),
    ("RequestHandler", "_waiter", "the future an idle connection awaits its next request on (the drain closes it)"),
    ("RequestHandler", "handle_error", "called with status 400 for a request the parser refused"),
    ("Server", "__call__", "the protocol factory handed to loop.create_server"),
)

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# (request, the parser's one-line description of what it refused) -> the answer to send
OnMalformed = Callable[[web.BaseRequest, str], web.StreamResponse]


def missing_internals(protocol: object | None = None) -> list[str]:
    """The aiohttp internals of `INTERNALS` that are gone, as `aiohttp.web.Owner.name`
    (empty when all are there). With `protocol`, a live `web.RequestHandler`, the
    connection's attributes are looked up on it (a slot that `__init__` no longer sets
    counts as gone); without, on the classes only."""
    owners: dict[str, Any] = {"RequestHandler": web.RequestHandler, "Server": web.Server}
    missing: list[str] = []
    for owner, name, _ in INTERNALS:
        where: Any = protocol if owner == "RequestHandler" and protocol is not None else owners[owner]
        if not hasattr(where, name):
            missing.append(f"aiohttp.web.{owner}.{name}")
    return missing


class GuardedProtocol(web.RequestHandler):
    """aiohttp's connection handler plus a request-head deadline and an egressd 400."""

    __slots__ = ("_egressd_body", "_egressd_loop", "_egressd_malformed", "_egressd_timeout", "_egressd_timer")

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        head_timeout: float,
        on_malformed: OnMalformed,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._egressd_loop = loop
        self._egressd_timeout = head_timeout
        self._egressd_timer: asyncio.TimerHandle | None = None
        self._egressd_body: Any = None  # the payload of the last complete head on this connection
        self._egressd_malformed = on_malformed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._egressd_timeout > 0:
            self._egressd_timer = self._egressd_loop.call_later(self._egressd_timeout, self._head_expired)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            if self._egressd_timer is not None:
                self._egressd_timer.cancel()
                self._egressd_timer = None
            if self._messages:
                self._egressd_body = self._messages[-1][1]
        elif (
            data
            and self._egressd_timer is None
            and self._egressd_timeout > 0
            and (self._egressd_body is None or self._egressd_body.is_eof())
        ):
            self._egressd_timer = self._egressd_loop.call_later(self._egressd_timeout, self._head_expired)

    def close_if_idle(self) -> bool:
        """Close the connection now if it is waiting for its next request (none being
        read, queued or answered): the drain's start. True if it did.

        A connection that has not sent a request head yet is left open: its first request
        may be in flight (in the socket's buffer, not yet read), and closing it would leave
        that request without an answer. It gets its head timeout, or the drain's end."""
        if self._request_count == 0:
            return False
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not self._messages:
            self.force_close()
            return True
        return False

    def _head_expired(self) -> None:
        self._egressd_timer = None
        if self._current_request is not None or self._messages:
            # An earlier request is still being answered; look again later.
            self._egressd_timer = self._egressd_loop.call_later(self._egressd_timeout, self._head_expired)
            return
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._egressd_timer is not None:
            self._egressd_timer.cancel()
            self._egressd_timer = None
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
        resp = self._egressd_malformed(request, str(getattr(exc, "message", "") or ""))
        resp.force_close()
        return resp


class _GuardedServer(web.Server):
    """`web.Server` that builds `GuardedProtocol` connection handlers."""

    def __init__(
        self,
        handler: Handler,
        *,
        loop: asyncio.AbstractEventLoop,
        head_timeout: float,
        on_malformed: OnMalformed,
        handler_cancellation: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, loop=loop, handler_cancellation=handler_cancellation, **kwargs)
        self._egressd_loop = loop
        self._egressd_protocol_kwargs = dict(kwargs, head_timeout=head_timeout, on_malformed=on_malformed)

    def __call__(self) -> web.RequestHandler:
        return GuardedProtocol(self, loop=self._egressd_loop, **self._egressd_protocol_kwargs)


def guarded_server(
    handler: Handler,
    *,
    head_timeout: float,
    on_malformed: OnMalformed,
    handler_cancellation: bool,
    **kwargs: Any,
) -> web.Server:
    """A low-level `web.Server` for `handler` whose connections close when a request head
    is not complete `head_timeout` seconds (0: never) after the connection opened or the
    first byte of a later head arrived, and which answers a request its parser refused
    with `on_malformed(request, reason)` (then closes the connection). `kwargs` are
    `web.Server`'s own public ones (max_line_size, keepalive_timeout, ...)."""
    return _GuardedServer(
        handler,
        loop=asyncio.get_running_loop(),
        head_timeout=head_timeout,
        on_malformed=on_malformed,
        handler_cancellation=handler_cancellation,
        **kwargs,
    )
