"""A lean HTTP/1.1 client for one upstream: the transport's hot path without aiohttp's client.

`HTTP1Pool` keeps keep-alive connections to one origin (at most `max_connections`, FIFO
waiters, idle expiry), writes a request as one `bytes` write (request line, headers and a
small body) or streams the body (Content-Length or chunked), and parses the answer with
aiohttp's llhttp-based C parser, whose body reader (`aiohttp.streams.StreamReader`) gives
flow control: when the consumer lags, reading from the socket pauses, so a 100 MB answer
passes in constant memory.

Only `proxy/transport.py` uses this module. It never resends anything: a reset on a reused
idle connection before any answer byte is a `ResetError` like any other, because egressd's
retry stage owns every resend. Failures are `HTTPError`s whose `kind` is the transport's
detail: `connect_error` (the request never left), `reset`, `timeout`, `protocol_error`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader

# aiohttp >= 3.12-ish lets the parser pause mid-buffer and resumes it through this argument.
_RESUME_TAKES_ARG = "resume_parser" in inspect.signature(BaseProtocol.resume_reading).parameters
READ_LIMIT = 2**16  # the body reader pauses the socket above 2x this many buffered bytes
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class HTTPError(Exception):
    """Base of the client's failures; `kind` is the transport's `ProxyError.detail`."""

    kind = "protocol_error"


class ConnectError(HTTPError):
    """No connection (refused, DNS, TLS, connect timeout, pool wait): the request never left."""

    kind = "connect_error"

    def __init__(self, message: str, *, timed_out: bool = False, tls: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out
        self.tls = tls


class ResetError(HTTPError):
    """The connection ended or failed after the request (or part of it) was written."""

    kind = "reset"


class ReadTimeout(HTTPError):
    """Nothing arrived for the idle timeout, or the overall deadline passed."""

    kind = "timeout"


class ProtocolError(HTTPError):
    """The answer was not valid HTTP/1.1, or its body was shorter than its framing said."""

    kind = "protocol_error"


class BodyError(ResetError):
    """The request body's source failed (its exception is the `__cause__`); the upstream saw
    an incomplete request and the connection was closed."""


class _Connection(BaseProtocol):
    """One upstream connection; one exchange at a time."""

    __slots__ = (
        "_armed",
        "_body_parser",
        "_broken",
        "_deadline",
        "_got_bytes",
        "_head",
        "_head_parser",
        "_idle",
        "_last",
        "_payload",
        "_timer",
        "_upload",
        "busy",
        "idle_since",
        "keep_alive",
        "pool",
        "reused",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: HTTP1Pool) -> None:
        super().__init__(loop)
        self.pool = pool
        self._body_parser = self._new_parser(with_body=True)
        self._head_parser: Any = None
        self._head: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._upload: asyncio.Task[None] | None = None
        self._idle = 0.0
        self._deadline = 0.0
        self._last = 0.0
        self._armed = False
        self._got_bytes = False
        self._broken = False
        self.busy = False
        self.keep_alive = True
        self.reused = False
        self.idle_since = 0.0

    def _new_parser(self, *, with_body: bool) -> Any:
        return HttpResponseParser(
            self,
            self._loop,
            READ_LIMIT,
            payload_exception=ProtocolError,
            response_with_body=with_body,
            read_until_eof=True,
            auto_decompress=False,
        )

    # -- state ----------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        tr = self.transport
        return tr is not None and not self._broken and not tr.is_closing()

    def close(self) -> None:
        self._broken = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._broken = True
        if self.transport is not None:
            self.transport.abort()

    def begin(self, head_only: bool, idle: float, deadline: float, armed: bool) -> None:
        """Start an exchange: the answer's head future and one timer for idle and deadline."""
        if head_only:
            if self._head_parser is None:
                self._head_parser = self._new_parser(with_body=False)
            self._parser = self._head_parser
        else:
            self._parser = self._body_parser
        loop = self._loop
        self._head = loop.create_future()
        self._payload = None
        self._got_bytes = False
        self.busy = True
        self._idle = idle
        self._deadline = deadline
        self._armed = armed
        now = self._last = loop.time()
        self._timer = loop.call_at(min(now + idle, deadline) if armed else deadline, self._on_timer)

    def arm_idle(self) -> None:
        """The request is fully written: from now on, silence longer than `idle` is a timeout."""
        self._armed = True
        self._last = now = self._loop.time()
        if self._timer is not None and now + self._idle < self._deadline:
            self._timer.cancel()
            self._timer = self._loop.call_at(now + self._idle, self._on_timer)

    def finish(self) -> bool:
        """End the exchange; True when the connection may carry another one."""
        self.busy = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        upload, self._upload = self._upload, None
        if upload is not None and not upload.done():
            upload.cancel()
            self._broken = True
        payload, self._payload = self._payload, None
        self._head = None
        return (
            self.keep_alive
            and payload is not None
            and payload.at_eof()
            and payload.exception() is None
            and self.usable
        )

    # -- timers ---------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        if not self.busy:
            return
        payload = self._payload
        if payload is not None and payload.is_eof():
            return  # the whole answer is in; nothing left to wait for
        loop = self._loop
        now = loop.time()
        slack = 0.001
        if now + slack < self._deadline:
            if not self._armed or self._reading_paused:
                # Not yet waiting for the upstream (uploading), or waiting for our consumer.
                self._last = now
            due = self._deadline if not self._armed else min(self._last + self._idle, self._deadline)
            if due > now + slack:
                self._timer = loop.call_at(due, self._on_timer)
                return
            what = f"nothing arrived from the upstream for {self._idle:.3g}s"
        else:
            what = "the deadline passed"
        self._fail(ReadTimeout(what))
        self.abort()

    def _fail(self, exc: HTTPError) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(exc)
            return
        payload = self._payload
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(exc)

    # -- asyncio.Protocol -----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self.busy:
            if data:  # an unsolicited byte on an idle connection: it cannot be trusted again
                self.close()
            return
        if data:
            payload = self._payload
            if payload is not None and payload.is_eof():
                self.close()  # bytes after a complete answer: this connection is not reusable
                return
            self._got_bytes = True
            self._last = self._loop.time()
        try:
            messages, upgraded, _tail = self._parser.feed_data(data)  # type: ignore[union-attr]
        except Exception as exc:
            err = ProtocolError(f"the upstream sent a malformed answer: {exc!r}")
            err.__cause__ = exc
            self._fail(err)
            self.abort()
            return
        if not messages:
            return
        for msg, payload in messages:
            head = self._head
            if head is None or head.done():
                self.close()  # a second answer to one request
                return
            code = msg.code
            if code < 200:
                if code == 101 or upgraded:
                    self._fail(ProtocolError("the upstream switched protocols unasked"))
                    self.abort()
                    return
                continue  # 100 Continue, 103 Early Hints: informational, skipped
            self.keep_alive = not msg.should_close
            self._payload = payload
            head.set_result((msg, payload))

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The body reader calls this after every read; only a real pause needs work.
        if self._reading_paused:
            self._last = self._loop.time()
            if _RESUME_TAKES_ARG:
                super().resume_reading(resume_parser)
            else:  # older aiohttp: the parser never pauses itself
                super().resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._broken = True
        if self.busy:
            head = self._head
            if head is not None and not head.done():
                reason = f" ({exc})" if exc else ""
                state = "a reused idle" if self.reused else "a new"
                if self._got_bytes:
                    err: HTTPError = ResetError(f"the connection closed in the middle of the answer's head{reason}")
                else:
                    err = ResetError(f"{state} connection closed before any answer byte{reason}")
                head.set_exception(err)
            else:
                payload = self._payload
                if payload is not None and not payload.is_eof() and payload.exception() is None:
                    try:
                        self._parser.feed_eof()  # type: ignore[union-attr]  # completes a body read until EOF
                    except Exception as cut:
                        err = ProtocolError(f"the answer was cut short: {cut}")
                        err.__cause__ = cut
                        payload.set_exception(err)
                    if not payload.is_eof() and payload.exception() is None:
                        payload.set_exception(ProtocolError("the answer was cut short"))
        else:
            self.pool._discard(self)

    # -- request body ---------------------------------------------------------------------
    async def send_body(self, source: AsyncIterable[bytes], length: int | None) -> None:
        """Stream a request body (Content-Length when `length` is known, else chunked)."""
        sent = 0
        try:
            async for chunk in source:
                if not chunk:
                    continue
                tr = self.transport
                if tr is None:
                    return  # connection_lost already failed the exchange
                sent += len(chunk)
                if length is None:
                    tr.writelines((b"%x\r\n" % len(chunk), chunk, _CRLF))
                else:
                    if sent > length:
                        raise BodyError(f"the request body is longer than its Content-Length ({length})")
                    tr.write(chunk)
                if self._paused:
                    await self._drain_helper()
            if length is not None and sent != length:
                raise BodyError(f"the request body ended after {sent} of {length} bytes")
            if self.transport is None:
                return
            if length is None:
                self.transport.write(_LAST_CHUNK)
            self.arm_idle()
        except asyncio.CancelledError:
            raise
        except ConnectionError:
            return  # the connection went away; connection_lost reports it
        except BaseException as exc:
            err = exc if isinstance(exc, BodyError) else BodyError(f"the request body failed: {exc!r}")
            if err is not exc:
                err.__cause__ = exc
            self._fail(err)
            self.abort()


class HTTP1Response:
    """An answer's status and headers; the body is read with `read()` or `readany()`.

    `release()` must be called once (read() does it): it returns the connection to the pool
    when the body was read to its end on a keep-alive connection, and closes it otherwise.
    """

    __slots__ = ("_conn", "_payload", "content_length", "headers", "reason", "status", "version")

    def __init__(self, conn: _Connection, msg: RawResponseMessage, payload: StreamReader) -> None:
        self._conn: _Connection | None = conn
        self._payload = payload
        self.status = msg.code
        self.reason = msg.reason
        self.version = msg.version
        self.headers = msg.headers
        length: int | None = None
        if not msg.chunked:
            value = msg.headers.get("Content-Length")
            if value is not None and value.isdigit():
                length = int(value)
        self.content_length = length

    async def readany(self) -> bytes:
        """The next part of the body as it arrives; b"" at its end."""
        return await self._payload.readany()

    def at_eof(self) -> bool:
        return self._payload.at_eof()

    async def read(self) -> bytes:
        """The whole body; releases the connection."""
        try:
            payload = self._payload
            first = await payload.readany()
            if not first or payload.at_eof():
                return first
            parts = [first]
            while chunk := await payload.readany():
                parts.append(chunk)
            return b"".join(parts)
        finally:
            self.release()

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool._release(conn, conn.finish())

    def close(self) -> None:
        """Release without reuse (the rest of the body is not wanted)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()
            conn.close()
            conn.pool._release(conn, False)

    def __del__(self) -> None:
        # A safety net like aiohttp's ClientResponse: an answer dropped without release()
        # must not hold its connection (and its pool slot) forever.
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self.close()


class HTTP1Pool:
    """Keep-alive HTTP/1.1 connections to one origin, and requests over them."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        host_header: str | None = None,
        max_connections: int = 100,
        keepalive: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname if ssl_context is not None else None
        if self.server_hostname is None and ssl_context is not None:
            self.server_hostname = host
        self.host_header = host_header or host
        self.max_connections = max_connections
        self.keepalive = keepalive
        self._idle: list[_Connection] = []
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._total = 0  # connections open or being opened, idle or in use
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._host_line = "Host: " + self.host_header

    @property
    def size(self) -> int:
        return self._total

    @property
    def idle(self) -> int:
        return len(self._idle)

    # -- the request ----------------------------------------------------------------------
    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
        connect_timeout: float | None = None,
        idle_timeout: float | None = None,
        total_timeout: float | None = None,
    ) -> HTTP1Response:
        """Send one request and return once the answer's head is in.

        `headers` must not carry framing fields (Content-Length, Transfer-Encoding): the
        body decides them. Bytes get a Content-Length (also b""); None sends no body; an
        async iterable streams with `content_length` or chunked. `idle_timeout` bounds each
        wait for answer bytes (from the end of the request on, also between body parts);
        `total_timeout` bounds everything, including reading the body.
        """
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + total_timeout if total_timeout is not None else start + 1e9
        idle = idle_timeout if idle_timeout is not None else 1e9
        head = self._serialize(method, target, headers, body, content_length)
        streamed = body is not None and not isinstance(body, bytes)
        connect_budget = deadline - start
        if connect_timeout is not None and connect_timeout < connect_budget:
            connect_budget = connect_timeout
        conn = await self._acquire(loop, connect_budget)
        try:
            conn.begin(method == "HEAD", idle, deadline, armed=not streamed)
            tr = conn.transport
            assert tr is not None
            if body is None:
                tr.write(head)
            elif isinstance(body, bytes):
                if len(body) <= 65536:
                    tr.write(head + body)
                else:
                    tr.writelines((head, body))
            else:
                tr.write(head)
                conn._upload = loop.create_task(conn.send_body(body, content_length))
            assert conn._head is not None
            msg, payload = await conn._head
        except BaseException:
            conn.finish()
            conn.abort()
            self._release(conn, False)
            raise
        return HTTP1Response(conn, msg, payload)

    def _serialize(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        length: int | None,
    ) -> bytes:
        lines = [f"{method} {target} HTTP/1.1", self._host_line]
        for name, value in headers:
            if len(name) == 4 and name.lower() == "host":
                lines[1] = f"Host: {value}"
                continue
            lines.append(f"{name}: {value}")
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
        lines.append("\r\n")
        text = "\r\n".join(lines)
        # Two counts instead of a check per field: a CR or LF inside the method, target, a
        # name or a value would split the head (request smuggling); refuse it, and NUL too.
        crlfs = len(lines)
        if text.count("\r") != crlfs or text.count("\n") != crlfs or "\x00" in text:
            raise ValueError("CR, LF or NUL in the request line or a header field")
        return text.encode("utf-8", "surrogateescape")

    # -- the pool -------------------------------------------------------------------------
    async def _acquire(self, loop: asyncio.AbstractEventLoop, budget: float) -> _Connection:
        if self._closed:
            raise ConnectError("the connection pool is closed")
        idle = self._idle
        if idle:
            now = loop.time()
            limit = now - self.keepalive
            while idle:
                conn = idle.pop()
                if conn.usable and conn.idle_since > limit:
                    conn.reused = True
                    return conn
                conn.close()
                self._total -= 1
        if self._total < self.max_connections:
            self._total += 1
            return await self._open(loop, budget)
        if budget <= 0:
            raise ConnectError("no free connection in the pool in time", timed_out=True)
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(budget, self._expire, waiter)
        started = loop.time()
        try:
            got = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._give_back(waiter.result())
            raise
        finally:
            timer.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        if got is not None:
            if got.usable:
                got.reused = True
                return got
            got.close()  # it died on the way to us; its slot is ours
        # A slot was handed over (already counted for us): open a connection in it.
        return await self._open(loop, budget - (loop.time() - started))

    def _expire(self, waiter: asyncio.Future[_Connection | None]) -> None:
        if not waiter.done():
            waiter.set_exception(ConnectError("no free connection in the pool in time", timed_out=True))

    def _give_back(self, got: _Connection | None) -> None:
        if got is None:
            self._total -= 1
            self._wake()
        else:
            self._release(got, got.usable)

    async def _open(self, loop: asyncio.AbstractEventLoop, budget: float) -> _Connection:
        """Open a connection in a slot already counted in `_total`."""
        where = f"{self.host}:{self.port}"
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
        except BaseException as exc:
            self._total -= 1
            self._wake()
            if isinstance(exc, TimeoutError):
                raise ConnectError(f"connecting to {where} timed out", timed_out=True) from exc
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise ConnectError(f"TLS with {where} failed: {exc}", tls=True) from exc
            if isinstance(exc, OSError):
                raise ConnectError(f"cannot connect to {where}: {exc}") from exc
            raise
        if self._closed:
            conn.close()
            self._total -= 1
            raise ConnectError("the connection pool is closed")
        return conn

    def _wake(self) -> None:
        """A slot became free: hand it to the first live waiter."""
        while self._waiters and self._total < self.max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._total += 1
                waiter.set_result(None)
                return

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            conn.idle_since = conn._loop.time()
            self._idle.append(conn)
            if self._sweeper is None:
                self._sweeper = conn._loop.call_later(self.keepalive, self._sweep)
            return
        conn.close()
        self._total -= 1
        self._wake()

    def _discard(self, conn: _Connection) -> None:
        """An idle connection was closed by the other side."""
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._total -= 1
        self._wake()

    def _sweep(self) -> None:
        self._sweeper = None
        if not self._idle:
            return
        loop = self._idle[0]._loop
        limit = loop.time() - self.keepalive
        keep = []
        for conn in self._idle:
            if conn.idle_since > limit and conn.usable:
                keep.append(conn)
            else:
                conn.close()
                self._total -= 1
        self._idle[:] = keep
        self._wake()
        if keep:
            self._sweeper = loop.call_later(self.keepalive, self._sweep)

    async def close(self) -> None:
        """Close idle connections now; connections in use close when they are released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            self._total -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError("the connection pool is closed"))
        if idle:
            await asyncio.sleep(0)  # let the transports run connection_lost
