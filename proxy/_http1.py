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

The pool can keep connections warm (`min_warm`, `start_warming()`): a background task keeps
at least that many connections open (idle or carrying a call), TCP- and TLS-handshaken,
and opens their replacements before they expire (`idle_timeout`, or sooner when the
upstream's `Keep-Alive: timeout=N` says so) or as soon as the upstream closes one, never on
a call's path; a call taking a warm connection does not make it connect (its handshake
would compete with the call for the loop); it backs off (exponential, capped) when the
upstream refuses or drops its connections. New connections resume the origin's last TLS session
when the server gave a ticket (`client_context()`), and host names are resolved through a
small cache (`DNSCache`, 30 s: Python's resolver gives no TTL).

Only `proxy/transport.py` uses this module. It resends nothing on its own: the one
exception is asked for by the caller (`resend_stale=True`, which the transport passes for
safe methods with a replayable body): a request whose *reused* connection turns out closed
or reset before any answer byte goes out once more on a new connection. An unsafe call is
never resent here; egressd's retry stage owns every other resend. Failures are
`HTTPError`s whose `kind` is the transport's detail: `connect_error` (the request never
left), `reset`, `timeout`, `protocol_error`, `header_too_large` (the answer's head broke
`max_field_size` or `max_head_size`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import random
import socket
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import Any, Protocol, cast

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
# Warm pools: the back-off between failed warm-ups (doubling from the first to the cap, each
# wait drawn from its upper half), and how long a warm connection must live, or whether it
# must carry a request, before the upstream closing it no longer counts as a failed warm-up.
WARM_BACKOFF_INITIAL = 0.25
WARM_BACKOFF_MAX = 30.0
WARM_PROVEN = 0.5
# A connection is replaced this long before it expires (at least), so that the replacement's
# handshake is done by then: twice the last handshake, within [MIN_LEAD, half the idle life].
MIN_LEAD = 0.1
# Host names resolve through `DNSCache` for this long (Python's resolver gives no TTL).
DNS_TTL = 30.0


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
    """The connection ended or failed after the request (or part of it) was written.
    `stale`: it was a reused idle connection and not one answer byte had come (the upstream
    had closed it, or closed it as the request arrived)."""

    kind = "reset"

    def __init__(self, message: str, *, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale


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


def keep_alive_timeout(value: str | None) -> float | None:
    """`timeout=N` of a `Keep-Alive` answer field (RFC 2068 19.7.1.1): how long the server
    keeps an idle connection; None when absent or unreadable."""
    if not value:
        return None
    for part in value.split(","):
        name, _, number = part.partition("=")
        if name.strip().lower() == "timeout":
            try:
                seconds = float(number.strip().strip('"'))
            except ValueError:
                return None
            return seconds if seconds >= 0 and seconds == seconds and seconds < 1e9 else None
    return None


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
        "expires_at",
        "idle_since",
        "keep_alive",
        "opened_at",
        "peer_idle",
        "pool",
        "resumed",
        "reused",
        "served",
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
        self.expires_at = 0.0  # while idle: when the pool closes it (or replaces it, warm)
        self.opened_at = loop.time()
        self.served = 0  # answers read to their end on this connection
        self.peer_idle: float | None = None  # the upstream's `Keep-Alive: timeout=N`
        self.resumed = False  # its TLS handshake resumed an earlier session

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
        self.served += 1
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
                err = ResetError(f"{state} connection closed before any answer byte{reason}", stale=self.reused)
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
        hint = headers.get("Keep-Alive")
        if hint is not None:
            self.peer_idle = keep_alive_timeout(hint)
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


class ResumingContext(ssl.SSLContext):
    """A client `SSLContext` that offers the TLS session in `session` on new connections.

    asyncio's `loop.create_connection(ssl=...)` (and uvloop's) takes no `ssl.SSLSession`, but
    both make their `SSLObject` with `context.wrap_bio(...)`: this override passes the session
    there, so a pool resumes its origin's last session (TLS 1.3 ticket, or a TLS 1.2 session
    id or ticket). A server that refuses resumption simply does a full handshake.
    """

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side:
            session = self.session
        return super().wrap_bio(
            incoming, outgoing, server_side=server_side, server_hostname=server_hostname, session=session
        )


def client_context(cafile: str | None = None, *, verify: bool = True) -> ResumingContext:
    """`ssl.create_default_context(cafile=...)`, as a `ResumingContext`, speaking HTTP/1.1 (ALPN)."""
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if cafile:
        context.load_verify_locations(cafile=cafile)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


class DNSCache:
    """Addresses of host names for `ttl` seconds (Python's getaddrinfo gives no TTL, so a fixed
    one stands in); concurrent lookups of one name share one query; failures are not kept."""

    def __init__(self, ttl: float = DNS_TTL) -> None:
        self.ttl = ttl
        self._entries: dict[tuple[str, int], tuple[float, list[tuple[int, str]]]] = {}
        self._pending: dict[tuple[str, int], asyncio.Task[list[tuple[int, str]]]] = {}

    async def resolve(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple[int, str]]:
        """(family, address) pairs for `host`, in the resolver's order."""
        key = (host, port)
        entry = self._entries.get(key)
        if entry is not None and entry[0] > loop.time():
            return entry[1]
        lookup = self._pending.get(key)
        if lookup is None:
            # Its own task: a caller that gives up (its connect timeout) does not cancel the
            # lookup the others wait for.
            lookup = self._pending[key] = loop.create_task(self._lookup(loop, host, port))
            lookup.add_done_callback(lambda done: self._settled(key, done))
        return await asyncio.shield(lookup)

    async def _lookup(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> list[tuple[int, str]]:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        found: list[tuple[int, str]] = []
        for family, _, _, _, sockaddr in infos:
            item = (int(family), str(sockaddr[0]))
            if item not in found:
                found.append(item)
        if not found:
            raise OSError(f"no address for {host}")
        self._entries[(host, port)] = (loop.time() + self.ttl, found)
        return found

    def _settled(self, key: tuple[str, int], done: asyncio.Task[list[tuple[int, str]]]) -> None:
        self._pending.pop(key, None)
        if not done.cancelled():
            done.exception()  # retrieved: nobody may be waiting any more

    def forget(self, host: str, port: int) -> None:
        """Drop a name (its addresses all refused us: look it up again next time)."""
        self._entries.pop((host, port), None)


#: The process's DNS cache, shared by every pool.
DNS = DNSCache()


class PoolObserver(Protocol):
    """What a pool tells its owner (proxy/transport.py turns these into events and logs)."""

    def connected(self, seconds: float, resumed: bool, warm: bool) -> None:
        """A connection is up (TCP and TLS), `seconds` after it was begun."""

    def warm_failed(self, error: str, retry_in: float, failures: int) -> None:
        """A warm-up failed (`failures` in a row); the next is in `retry_in` seconds."""

    def warm_recovered(self, failures: int) -> None:
        """A warm connection proved itself after `failures` failed warm-ups."""

    def stale_resend(self) -> None:
        """A safe request met a closed reused connection and went out on a new one."""


class HTTP1Pool:
    """Keep-alive HTTP/1.1 connections to one origin, and requests over them.

    `keepalive` is the idle timeout: an idle connection is closed after it (sooner when the
    upstream's `Keep-Alive: timeout=N` asks for less, with a margin). At most `max_idle`
    connections are kept idle (None: up to `max_connections`). With `min_warm` and
    `start_warming()`, at least that many connections are kept open in the background.
    """

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
        max_idle: int | None = None,
        min_warm: int = 0,
        connect_timeout: float = 2.0,
        max_field_size: int = MAX_FIELD_SIZE,
        max_head_size: int = MAX_HEAD_SIZE,
        dns: DNSCache | None = None,
        observer: PoolObserver | None = None,
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
        self.max_idle = max_connections if max_idle is None else max_idle
        self.min_warm = min(min_warm, self.max_idle, max_connections)
        self.connect_timeout = connect_timeout
        # Limits on an answer's head (`--max-response-header-size`, `--max-response-head-size`):
        # past them the answer fails with `HeaderTooLarge`.
        self.max_field_size = max_field_size
        self.max_head_size = max_head_size
        self.dns = dns if dns is not None else DNS
        self.observer = observer
        try:
            ipaddress.ip_address(host)
            self._literal = True  # an IP address: nothing to resolve
        except ValueError:
            self._literal = False
        self._idle: list[_Connection] = []
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
        self._total = 0  # connections open or being opened, idle or in use
        self._opening = 0  # of which being opened
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._host_line = "Host: " + self.host_header
        # Warm connections (start_warming): the task, its wake-up, the warm-ups under way,
        # the failures in a row and the back-off they set, and "min_warm was reached once".
        self._warmer: asyncio.Task[None] | None = None
        self._warm_wake: asyncio.Event | None = None
        self._warm_reached: asyncio.Event | None = None
        self._warming = 0
        self._warm_next = 0.0  # when the warmer looks again (loop time)
        self._warm_tasks: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._backoff_until = 0.0
        self._last_handshake = 0.0  # seconds the last connection took to open
        # Counters since the pool was made (the transport reports them).
        self.handshakes = 0
        self.resumed = 0
        self.stale_resends = 0
        self.warm_failures = 0

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
        resend_stale: bool = False,
    ) -> HTTP1Response:
        """Send one request and return once the answer's head is in.

        `headers` must not carry framing fields (Content-Length, Transfer-Encoding): the
        body decides them. Bytes get a Content-Length (also b""); None sends no body; an
        async iterable streams with `content_length` or chunked. `idle_timeout` bounds each
        wait for answer bytes (from the end of the request on, also between body parts);
        `total_timeout` bounds everything, including reading the body. `resend_stale`
        (only for a safe method: the caller decides): when a reused connection was closed
        before one answer byte came, send the request once more on a new connection.
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
            answer = await self._exchange(loop, conn, method, head, body, content_length, idle, deadline, streamed)
        except ResetError as exc:
            if not (resend_stale and exc.stale and not streamed and type(exc) is ResetError):
                raise
            # The upstream had closed this kept connection (or closed it as the request came):
            # no answer byte, a safe method, a body we still hold: once more on a new one.
            self.stale_resends += 1
            if self.observer is not None:
                self.observer.stale_resend()
            left = deadline - loop.time()
            conn = await self._acquire(loop, min(connect_budget, left), fresh=True)
            answer = await self._exchange(loop, conn, method, head, body, content_length, idle, deadline, streamed)
        return HTTP1Response(conn, answer)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
        idle: float,
        deadline: float,
        streamed: bool,
    ) -> _Answer:
        """Write the request on `conn` and wait for the answer's head; on failure the
        connection is closed and its slot given back."""
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
            return await conn._head
        except BaseException:
            conn.finish()
            conn.abort()
            self._release(conn, False)
            raise

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
    async def _acquire(self, loop: asyncio.AbstractEventLoop, budget: float, *, fresh: bool = False) -> _Connection:
        if self._closed:
            raise ConnectError("the connection pool is closed")
        idle = self._idle
        if idle and not fresh:
            now = loop.time()
            taken = False
            while idle:
                conn = idle.pop()
                if conn.usable and conn.expires_at > now:
                    conn.reused = True
                    taken = True
                    break
                conn.close()
                self._total -= 1
            if taken:
                return conn
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
            if got.usable and not fresh:
                got.reused = True
                return got
            got.close()  # it died on the way to us (or a new one is wanted); its slot is ours
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

    async def _open(self, loop: asyncio.AbstractEventLoop, budget: float, *, warm: bool = False) -> _Connection:
        """Open a connection in a slot already counted in `_total`."""
        where = f"{self.host}:{self.port}"
        context = self.ssl_context
        self._opening += 1
        began = loop.time()
        try:
            if budget <= 0:
                raise TimeoutError
            async with asyncio.timeout(budget):
                if self._literal:
                    addresses = [(0, self.host)]
                else:
                    addresses = await self.dns.resolve(loop, self.host, self.port)
                if isinstance(context, ResumingContext):
                    context.session = self._tls_session(context)
                conn = await self._connect(loop, addresses)
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
        finally:
            self._opening -= 1
        if self._closed:
            conn.close()
            self._total -= 1
            raise ConnectError("the connection pool is closed")
        took = loop.time() - began
        self._last_handshake = took
        self.handshakes += 1
        if context is not None and conn.transport is not None:
            sslobj = conn.transport.get_extra_info("ssl_object")
            conn.resumed = bool(sslobj is not None and sslobj.session_reused)
            self.resumed += conn.resumed
        if self.observer is not None:
            self.observer.connected(took, conn.resumed, warm)
        return conn

    async def _connect(self, loop: asyncio.AbstractEventLoop, addresses: list[tuple[int, str]]) -> _Connection:
        """Connect to the first address that answers (in the resolver's order)."""
        error: OSError | None = None
        for family, address in addresses:
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self),
                    address,
                    self.port,
                    family=family,
                    ssl=self.ssl_context,
                    server_hostname=self.server_hostname,
                )
                return conn
            except ssl.SSLError:
                raise  # the address answered: TLS failed, and another would fail alike
            except OSError as exc:
                error = exc
        if not self._literal:
            self.dns.forget(self.host, self.port)  # every address refused: look it up anew next time
        assert error is not None
        raise error

    def _tls_session(self, context: ResumingContext) -> ssl.SSLSession | None:
        """The session to resume: the newest live connection's (its ticket may have come
        after the handshake), else the last one seen."""
        for conn in reversed(self._idle):
            tr = conn.transport
            sslobj = tr.get_extra_info("ssl_object") if tr is not None else None
            session = sslobj.session if sslobj is not None else None
            if session is not None and session.has_ticket:
                return cast(ssl.SSLSession, session)
        return context.session

    def _remember_session(self, conn: _Connection) -> None:
        """Keep `conn`'s TLS session (with its ticket) for the next connection to resume."""
        context = self.ssl_context
        tr = conn.transport
        if not isinstance(context, ResumingContext) or tr is None:
            return
        sslobj = tr.get_extra_info("ssl_object")
        session = sslobj.session if sslobj is not None else None
        if session is not None and session.has_ticket:
            context.session = session

    def _wake(self) -> None:
        """A slot became free: hand it to the first live waiter."""
        while self._waiters and self._total < self.max_connections:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._total += 1
                waiter.set_result(None)
                return
        if self._warm_wake is not None and self._total < self.min_warm:
            self._warm_wake.set()  # a connection went: the warmer replaces it

    def _life(self, conn: _Connection) -> float:
        """How long `conn` may stay idle: the pool's idle timeout, or less when the upstream
        announced a shorter one (`Keep-Alive: timeout=N`; closed a quarter earlier, at most
        1 s earlier, so that the upstream's own close does not cross a request)."""
        life = self.keepalive
        peer = conn.peer_idle
        if peer is not None:
            life = min(life, peer - min(1.0, peer / 4))
        return life

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if conn.served == 1 and self.ssl_context is not None:
            self._remember_session(conn)  # by its first answer, a TLS 1.3 ticket has come
        if conn.served and self._failures:
            self._recovered()
        if reusable and not self._closed:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            now = conn._loop.time()
            life = self._life(conn)
            if life > 0 and self.max_idle > 0:
                conn.idle_since = now
                conn.expires_at = now + life
                idle = self._idle
                if len(idle) >= self.max_idle:
                    oldest = idle.pop(0)  # over max_idle: keep the freshest
                    oldest.close()
                    self._total -= 1
                idle.append(conn)
                sweeper = self._sweeper
                if sweeper is None or sweeper.when() > conn.expires_at:
                    if sweeper is not None:
                        sweeper.cancel()
                    self._sweeper = conn._loop.call_at(conn.expires_at, self._sweep)
                reached = self._warm_reached
                if reached is not None and not reached.is_set() and len(idle) >= self.min_warm:
                    reached.set()
                if self._warm_wake is not None and conn.expires_at < self._warm_next:
                    self._warm_wake.set()  # it expires before the warmer's next look: plan its replacement
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
        if self._warmer is not None and not conn.served:
            now = conn._loop.time()
            if now - conn.opened_at < WARM_PROVEN:
                # Accepted, then closed before it carried anything: as good as refused.
                self._warm_failed(now, "the upstream closed a new connection at once")
            elif self._failures:
                self._recovered()
        self._wake()

    def _sweep(self) -> None:
        self._sweeper = None
        if not self._idle:
            return
        loop = self._idle[0]._loop
        now = loop.time()
        keep = []
        for conn in self._idle:
            if conn.expires_at > now and conn.usable:
                keep.append(conn)
            else:
                if conn.served == 0 and now - conn.opened_at >= WARM_PROVEN and self._failures:
                    self._recovered()
                if self.ssl_context is not None:
                    self._remember_session(conn)
                conn.close()
                self._total -= 1
        self._idle[:] = keep
        self._wake()
        if keep:
            self._sweeper = loop.call_at(min(c.expires_at for c in keep), self._sweep)

    # -- warm connections -----------------------------------------------------------------
    def start_warming(self) -> None:
        """Keep `min_warm` connections open from now on (a background task)."""
        if self.min_warm <= 0 or self._warmer is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._warm_wake = asyncio.Event()
        if self._warm_reached is None:
            self._warm_reached = asyncio.Event()
        self._warmer = loop.create_task(self._keep_warm(loop), name=f"warm {self.host}:{self.port}")

    def stop_warming(self) -> None:
        """No more warm-ups (the pool is being retired); idle connections are closed."""
        self.min_warm = 0
        warmer, self._warmer = self._warmer, None
        if warmer is not None:
            warmer.cancel()
        for task in list(self._warm_tasks):
            task.cancel()
        self._warm_wake = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            self._total -= 1
        self._wake()

    async def wait_warm(self) -> None:
        """Return once `min_warm` idle connections were up at the same time (at once without
        warming)."""
        if self.min_warm <= 0 or len(self._idle) >= self.min_warm:
            return
        if self._warm_reached is None:
            self._warm_reached = asyncio.Event()
        await self._warm_reached.wait()

    def _lead(self) -> float:
        """How long before an idle connection's expiry its replacement is begun."""
        return max(MIN_LEAD, 2 * self._last_handshake)

    def _counts_as_warm(self, conn: _Connection, now: float, lead: float) -> bool:
        life = conn.expires_at - conn.idle_since
        return conn.expires_at - min(lead, life / 2) > now

    async def _keep_warm(self, loop: asyncio.AbstractEventLoop) -> None:
        wake = self._warm_wake
        assert wake is not None
        while not self._closed:
            wake.clear()
            now = loop.time()
            lead = self._lead()
            # Connections that count: all open or being opened (in use ones too), but not
            # idle ones about to expire (their replacements are begun now).
            counted = self._total
            next_check = now + 3600.0
            for conn in self._idle:
                if not conn.usable:
                    counted -= 1
                elif self._counts_as_warm(conn, now, lead):
                    life = conn.expires_at - conn.idle_since
                    next_check = min(next_check, conn.expires_at - min(lead, life / 2))
                else:
                    counted -= 1
                    next_check = min(next_check, conn.expires_at)  # the sweeper closes it then
            need = self.min_warm - counted
            if need > 0:
                if now < self._backoff_until:
                    next_check = min(next_check, self._backoff_until)
                else:
                    for _ in range(min(need, self.max_connections - self._total)):
                        self._total += 1
                        self._warming += 1
                        task = loop.create_task(self._warm_one(loop))
                        self._warm_tasks.add(task)
                        task.add_done_callback(self._warm_tasks.discard)
            self._warm_next = next_check
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(next_check - loop.time(), 0.001)):
                    await wake.wait()

    async def _warm_one(self, loop: asyncio.AbstractEventLoop) -> None:
        """Open one warm connection in a slot already counted (and in `_warming`)."""
        try:
            conn = await self._open(loop, self.connect_timeout, warm=True)
        except ConnectError as exc:
            self._warm_failed(loop.time(), str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let a warm-up kill the loop: back off instead
            self._warm_failed(loop.time(), f"{type(exc).__name__}: {exc}")
            return
        finally:
            self._warming -= 1
            if self._warm_wake is not None:
                self._warm_wake.set()
        self._release(conn, conn.usable and self._warmer is not None)

    def _warm_failed(self, now: float, error: str) -> None:
        if self._closed or self._warmer is None:
            return  # the pool is closing or retired: nothing to report
        self._failures += 1
        self.warm_failures += 1
        delay = min(WARM_BACKOFF_MAX, WARM_BACKOFF_INITIAL * 2 ** min(self._failures - 1, 30))
        delay *= 0.5 + random.random() / 2
        self._backoff_until = max(self._backoff_until, now + delay)
        if self.observer is not None:
            self.observer.warm_failed(error, delay, self._failures)
        if self._warm_wake is not None:
            self._warm_wake.set()

    def _recovered(self) -> None:
        failures, self._failures = self._failures, 0
        self._backoff_until = 0.0
        if self.observer is not None and self._warmer is not None:
            self.observer.warm_recovered(failures)

    def stats(self) -> dict[str, Any]:
        """Connections now and counters since the pool was made (for /status)."""
        idle = len(self._idle)
        warm = 0
        backoff = 0.0
        if self._idle or self._backoff_until:
            loop = asyncio.get_running_loop()
            now = loop.time()
            lead = self._lead()
            fresh = sum(1 for c in self._idle if c.usable and self._counts_as_warm(c, now, lead))
            warm = min(fresh, self.min_warm)
            backoff = max(0.0, self._backoff_until - now)
        return {
            "open": self._total - self._opening,
            "idle": idle,
            "in_use": self._total - self._opening - idle,
            "opening": self._opening,
            "warm": warm,  # idle connections kept ready for min_warm (not about to expire)
            "min_warm": self.min_warm,
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "stale_resends": self.stale_resends,
            "warm_failures": self.warm_failures,
            "backoff_seconds": round(backoff, 3),
        }

    async def close(self) -> None:
        """Close idle connections now; connections in use close when they are released."""
        self._closed = True
        warmer, self._warmer = self._warmer, None
        if warmer is not None:
            warmer.cancel()
        for task in list(self._warm_tasks):
            task.cancel()
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
        if idle or warmer is not None:
            await asyncio.sleep(0)  # let the transports run connection_lost
