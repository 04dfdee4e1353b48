"""A lean HTTP/1.1 client for one upstream: the only code in egressd that speaks HTTP upstream.

`HTTP1Pool` keeps keep-alive connections to one origin (at most `max_connections`, FIFO
waiters, idle expiry), writes a request as one `bytes` write (request line, headers and a
small body) or streams the body (Content-Length or chunked), and parses the answer with
llhttp through httptools' public `HttpResponseParser` (the binding uvicorn uses; the same C
parser as aiohttp's), with the leniencies aiohttp's client applies to answers (obs-fold,
LF-only line ends, spaces after a chunk size) plus refusing NUL and CR in a field value.
The body buffer and its flow control are this module's own: above `HIGH_WATER` buffered
bytes, reading from the socket pauses (`asyncio.Transport.pause_reading`) until the
consumer takes them, so a 100 MB answer passes in constant memory.

Only `proxy/transport.py` uses this module. It never resends anything: a reset on a reused
idle connection before any answer byte is a `ResetError` like any other, because egressd's
retry stage owns every resend. Failures are `HTTPError`s whose `kind` is the transport's
detail: `connect_error` (the request never left), `reset`, `timeout`, `protocol_error`,
`header_too_large` (the answer's head broke `max_field_size` or `max_head_size`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

READ_LIMIT = 2**16
HIGH_WATER = 2 * READ_LIMIT  # buffered answer bytes above which reading from the socket pauses
# The default limits on an answer's head (`HTTP1Pool(max_field_size=, max_head_size=)`):
MAX_FIELD_SIZE = 8190  # one answer header field, name and value (aiohttp's limit)
MAX_HEAD_SIZE = 65536  # the answer's head: status line and fields (with any 1xx heads before it)
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_NO_BODY_STATUS = (204, 304)


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


class HeaderTooLarge(ProtocolError):
    """The answer's head broke a size limit: `what` is "field" (one header field over
    `limit` bytes) or "head" (the whole head over `limit` bytes)."""

    kind = "header_too_large"

    def __init__(self, message: str, *, what: str, limit: int) -> None:
        super().__init__(message)
        self.what = what
        self.limit = limit


class BodyError(ResetError):
    """The request body's source failed (its exception is the `__cause__`); the upstream saw
    an incomplete request and the connection was closed."""


class _Surplus(Exception):
    """Stops the parser at a second answer to one request (the connection is then closed)."""


def _new_parser(protocol: _Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(protocol)
    # What aiohttp's client parser allows in answers (its non-debug mode), so that moving
    # off it changes nothing an upstream can see; the framing checks (Content-Length
    # syntax and duplicates, Transfer-Encoding with Content-Length, chunk sizes) stay strict.
    parser.set_dangerous_leniencies(
        lenient_headers=True,  # obs-fold is joined with one SP (RFC 9112 5.2); odd value bytes pass
        lenient_optional_cr_before_lf=True,  # LF-only line ends
        lenient_spaces_after_chunk_size=True,
    )
    return parser


def _keep_alive(version: str, headers: CIMultiDict[str]) -> bool:
    """Keep-alive by version and `Connection` (for HEAD, where llhttp is not told there is
    no body and so cannot judge)."""
    tokens = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    if "close" in tokens:
        return False
    return version != "1.0" or "keep-alive" in tokens


class _Connection(asyncio.Protocol):
    """One upstream connection; one exchange at a time. Also the parser's callbacks."""

    __slots__ = (
        "_answer",
        "_armed",
        "_broken",
        "_deadline",
        "_drain_waiter",
        "_error",
        "_fields",
        "_fields_size",
        "_got_bytes",
        "_head",
        "_head_done",
        "_head_only",
        "_head_size",
        "_idle",
        "_last",
        "_loop",
        "_parser",
        "_reading_paused",
        "_timer",
        "_until_close",
        "_upload",
        "_write_paused",
        "busy",
        "idle_since",
        "keep_alive",
        "pool",
        "reused",
        "transport",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: HTTP1Pool) -> None:
        self._loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[_Answer] | None = None
        self._answer: _Answer | None = None
        self._fields: list[tuple[bytes, bytes]] = []
        self._fields_size = 0
        self._head_done = False
        self._head_only = False
        self._head_size = 0
        self._until_close = False
        self._error: HTTPError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._upload: asyncio.Task[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_paused = False
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
        if self._parser is None:
            self._parser = _new_parser(self)
        loop = self._loop
        self._head = loop.create_future()
        self._answer = None
        self._fields = []
        self._fields_size = 0
        self._head_done = False
        self._head_only = head_only
        self._head_size = 0
        self._error = None
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
        if self._head_only:
            self._parser = None  # llhttp still expects the HEAD answer's body: a fresh one next time
        answer, self._answer = self._answer, None
        self._head = None
        if answer is None:
            return False
        if not answer._eof or answer._chunks or answer._exc is not None:
            if answer._exc is None and not answer._eof:
                answer._exc = ResetError("the answer was released before its end")
            return False
        if self._reading_paused:
            self._resume()
        return self.keep_alive and self.usable

    # -- timers ---------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        if not self.busy:
            return
        answer = self._answer
        if answer is not None and answer._eof:
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
        answer = self._answer
        if answer is not None and not answer._eof and answer._exc is None:
            answer._exc = exc
            answer._wake()

    # -- flow control ---------------------------------------------------------------------
    def _pause(self) -> None:
        tr = self.transport
        if tr is not None and not self._reading_paused and not tr.is_closing():
            self._reading_paused = True
            tr.pause_reading()

    def _resume(self) -> None:
        self._reading_paused = False
        self._last = self._loop.time()  # the idle timer counts from here again
        tr = self.transport
        if tr is not None and not tr.is_closing():
            tr.resume_reading()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _drain(self) -> None:
        if self.transport is None:
            raise ConnectionResetError("connection lost")
        waiter = self._drain_waiter = self._loop.create_future()
        await waiter

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if not self.busy or (answer is not None and answer._eof):
            # An unsolicited byte on an idle connection, or bytes after a complete answer:
            # this connection cannot be trusted again.
            self.close()
            return
        self._got_bytes = True
        self._last = self._loop.time()
        head_done = self._head_done
        try:
            self._parser.feed_data(data)  # type: ignore[union-attr]
        except Exception as exc:
            answer = self._answer
            if answer is not None and answer._eof:
                self.close()  # garbage or a second answer after a complete one: not reusable
                return
            err = self._error
            if err is None:
                err = ProtocolError(f"the upstream sent a malformed answer: {exc}")
                err.__cause__ = exc
            self._fail(err)
            self.abort()
            return
        if not head_done and not self._head_done:
            self._head_size += len(data)
            limit = self.pool.max_head_size
            if self._head_size > limit:
                self._fail(
                    HeaderTooLarge(f"the answer's head is over {limit} bytes (max_head_size)", what="head", limit=limit)
                )
                self.abort()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self._broken = True
        drain, self._drain_waiter = self._drain_waiter, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("connection lost"))
        if not self.busy:
            self.pool._discard(self)
            return
        reason = f" ({exc})" if exc else ""
        head = self._head
        if head is not None and not head.done():
            if self._got_bytes:
                err: HTTPError = ResetError(f"the connection closed in the middle of the answer's head{reason}")
            else:
                state = "a reused idle" if self.reused else "a new"
                err = ResetError(f"{state} connection closed before any answer byte{reason}")
            head.set_exception(err)
            return
        answer = self._answer
        if answer is not None and not answer._eof and answer._exc is None:
            if self._until_close and exc is None:
                answer._eof = True  # an answer framed by the end of the connection: complete
            else:
                answer._exc = ProtocolError(f"the answer was cut short{reason}")
            answer._wake()

    # -- llhttp callbacks (httptools) -----------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        pool = self.pool
        if size > pool.max_field_size:
            self._error = HeaderTooLarge(
                f"the answer's header field {name[:64]!r} is over {pool.max_field_size} bytes (max_field_size)",
                what="field",
                limit=pool.max_field_size,
            )
            raise self._error
        self._fields_size += size + 4
        if self._fields_size > pool.max_head_size:
            what = "trailer" if self._head_done else "head"
            self._error = HeaderTooLarge(
                f"the answer's {what} is over {pool.max_head_size} bytes (max_head_size)",
                what="head",
                limit=pool.max_head_size,
            )
            raise self._error
        if self._head_done:
            return  # a trailer field (after a chunked body): not forwarded, as with aiohttp
        if b"\x00" in value or b"\r" in value:
            self._error = ProtocolError(f"the answer's header field {name[:64]!r} holds a NUL or CR")
            raise self._error
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        if self._head_done:
            raise _Surplus  # a second answer to one request
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        fields, self._fields = self._fields, []
        if status < 200:
            if status == 101:
                self._error = ProtocolError("the upstream switched protocols unasked")
                raise self._error
            return  # 100 Continue, 103 Early Hints: informational, skipped
        self._head_done = True
        self._fields_size = 0  # from here on: trailer fields
        headers: CIMultiDict[str] = CIMultiDict(
            [(n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape")) for n, v in fields]
        )
        length: int | None = None
        chunked = False
        te = headers.getall("Transfer-Encoding", None)
        if te is not None:  # llhttp refuses it together with Content-Length
            chunked = te[-1].rsplit(",", 1)[-1].strip().lower() == "chunked"
        else:
            value = headers.get("Content-Length")
            if value is not None:
                length = int(value)  # llhttp checked: digits only, no second differing value
        answer = _Answer(status, CIMultiDictProxy(headers), length)
        if self._head_only:
            self.keep_alive = _keep_alive(parser.get_http_version(), headers)
            self._until_close = False
            answer._eof = True
        else:
            self.keep_alive = parser.should_keep_alive()
            self._until_close = length is None and not chunked and status not in _NO_BODY_STATUS
        self._answer = answer
        head = self._head
        if head is not None and not head.done():
            head.set_result(answer)

    def on_body(self, data: bytes) -> None:
        answer = self._answer
        if answer is None or answer._eof:
            self._broken = True  # body bytes after a HEAD answer: not reusable
            return
        answer._chunks.append(data)
        answer._size += len(data)
        if answer._size > HIGH_WATER and not self._reading_paused:
            self._pause()
        if answer._waiter is not None:
            answer._wake()

    def on_message_complete(self) -> None:
        answer = self._answer
        if answer is not None and not answer._eof:
            answer._eof = True
            answer._wake()

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
                if self._write_paused:
                    await self._drain()
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


class _Answer:
    """An answer's head and its body buffer, filled by the parser's callbacks."""

    __slots__ = ("_chunks", "_eof", "_exc", "_size", "_waiter", "content_length", "headers", "status")

    def __init__(self, status: int, headers: CIMultiDictProxy[str], content_length: int | None) -> None:
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False  # the parser saw the answer's end (the body may still be buffered)
        self._exc: HTTPError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class HTTP1Response:
    """An answer's status and headers; the body is read with `read()` or `readany()`.

    `release()` must be called once (read() does it): it returns the connection to the pool
    when the body was read to its end on a keep-alive connection, and closes it otherwise.
    """

    __slots__ = ("_answer", "_conn", "content_length", "headers", "status")

    def __init__(self, conn: _Connection, answer: _Answer) -> None:
        self._conn: _Connection | None = conn
        self._answer = answer
        self.status = answer.status
        self.headers = answer.headers
        self.content_length = answer.content_length

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read (bounded by flow control)."""
        return self._answer._size

    async def readany(self) -> bytes:
        """The body bytes buffered so far, waiting for some if there are none; b"" at its end."""
        answer = self._answer
        while True:
            if answer._exc is not None:
                raise answer._exc
            chunks = answer._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                answer._size = 0
                conn = self._conn
                if conn is not None and conn._reading_paused:
                    conn._resume()
                return data
            if answer._eof:
                return b""
            conn = self._conn
            if conn is None:
                raise ResetError("the answer was released before its end")
            waiter = answer._waiter = conn._loop.create_future()
            try:
                await waiter
            finally:
                answer._waiter = None

    def at_eof(self) -> bool:
        answer = self._answer
        return answer._eof and not answer._chunks

    async def read(self) -> bytes:
        """The whole body; releases the connection."""
        try:
            first = await self.readany()
            if not first or self.at_eof():
                return first
            parts = [first]
            while chunk := await self.readany():
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
        # A safety net: an answer dropped without release() must not hold its connection
        # (and its pool slot) forever.
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
        max_field_size: int = MAX_FIELD_SIZE,
        max_head_size: int = MAX_HEAD_SIZE,
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
        # Limits on an answer's head (`--max-response-header-size`, `--max-response-head-size`):
        # past them the answer fails with `HeaderTooLarge`.
        self.max_field_size = max_field_size
        self.max_head_size = max_head_size
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
            answer = await conn._head
        except BaseException:
            conn.finish()
            conn.abort()
            self._release(conn, False)
            raise
        return HTTP1Response(conn, answer)

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
