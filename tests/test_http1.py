"""The lean HTTP/1.1 client (proxy/_http1.py) on its own, against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from proxy import _http1
from proxy._http1 import HTTP1Pool
from tests.conftest import Upstream

MiB = 1024 * 1024
# Called once per request on a connection: (reader, writer, request head, request number on
# this connection); returns False to stop serving the connection.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, int], Awaitable[bool]]


class RawServer:
    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.port = 0


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[RawServer]:
    """A TCP server that reads each request (head, and a Content-Length body) and runs `script`."""
    info = RawServer()

    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info.connections += 1
        writers.append(writer)
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                info.requests.append(head)
                if not await script(reader, writer, head, n):
                    break
                n += 1
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    info.port = server.sockets[0].getsockname()[1]
    try:
        yield info
    finally:
        server.close()
        for writer in writers:  # Server.close_clients() is Python 3.13+
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


def answer(body: bytes = b"ok", extra: bytes = b"") -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
        await writer.drain()
        return b"close" not in extra

    return script


def pool_for(port: int, **kw: Any) -> HTTP1Pool:
    return HTTP1Pool("127.0.0.1", port, **kw)


async def get(pool: HTTP1Pool, path: str = "/x", **kw: Any) -> tuple[int, bytes]:
    kw.setdefault("idle_timeout", 2.0)
    kw.setdefault("total_timeout", 5.0)
    resp = await pool.request(kw.pop("method", "GET"), path, [("Accept", "*/*")], **kw)
    return resp.status, await resp.read()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_request_head_is_one_write_with_host_and_framing() -> None:
    async with raw_server(answer()) as srv:
        pool = pool_for(srv.port, host_header="api.example.com")
        assert await get(pool, "/v1/x?a=1") == (200, b"ok")
        resp = await pool.request("POST", "/p", [("X-A", "1")], b"hello", total_timeout=5)
        await resp.read()
        await pool.close()
    assert srv.requests[0] == b"GET /v1/x?a=1 HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n"
    assert srv.requests[1] == b"POST /p HTTP/1.1\r\nHost: api.example.com\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n"


async def test_cr_or_lf_in_a_field_is_refused_before_anything_is_sent() -> None:
    async with raw_server(answer()) as srv:
        pool = pool_for(srv.port)
        with pytest.raises(ValueError, match="CR, LF or NUL"):
            await pool.request("GET", "/x", [("X-Evil", "a\r\nX-Injected: 1")])
        with pytest.raises(ValueError):
            await pool.request("GET", "/x\nHost: evil", [])
        with pytest.raises(ValueError):
            await pool.request("GET", "/x", [("X-Nul", "a\x00b")])
        await pool.close()
    assert srv.requests == [] and srv.connections == 0


async def test_keep_alive_connections_are_pooled_and_reused() -> None:
    async with raw_server(answer()) as srv:
        pool = pool_for(srv.port)
        for _ in range(5):
            assert await get(pool) == (200, b"ok")
        assert srv.connections == 1 and len(srv.requests) == 5
        assert pool.size == 1 and pool.idle == 1
        # Concurrent calls open more connections, then all of them are kept.
        results = await asyncio.gather(*(get(pool) for _ in range(4)))
        assert all(r == (200, b"ok") for r in results)
        assert pool.size == pool.idle == srv.connections
        await pool.close()
        assert pool.idle == 0


async def test_connection_close_answer_is_not_reused() -> None:
    async with raw_server(answer(extra=b"Connection: close\r\n")) as srv:
        pool = pool_for(srv.port)
        assert await get(pool) == (200, b"ok")
        assert pool.size == 0 and pool.idle == 0
        assert await get(pool) == (200, b"ok")
        assert srv.connections == 2
        await pool.close()


async def test_http10_answer_read_until_close() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert resp.content_length is None
        assert await resp.read() == b"all of it"
        assert pool.size == 0
        await pool.close()


async def test_read_until_close_answer_ended_by_a_reset_is_cut_short() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart of it")
        await writer.drain()
        await asyncio.sleep(0.05)
        await reset(writer)
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        with pytest.raises(_http1.ProtocolError, match="cut short"):
            await resp.read()
        assert pool.size == 0
        await pool.close()


async def test_chunked_answer_in_pieces_then_reuse() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"lo\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert resp.content_length is None
        assert await resp.read() == b"hello world"
        assert await get(pool) == (200, b"hello world")
        assert srv.connections == 1
        await pool.close()


async def test_chunked_answer_with_content_length_is_never_buffered_by_length() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert resp.content_length is None
        assert await resp.read() == b"abc"
        await pool.close()


def cut(data: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(data)
        await writer.drain()
        return False

    return script


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{partial",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-mid-chunk"],
)
async def test_truncated_body_is_a_protocol_error(data: bytes) -> None:
    async with raw_server(cut(data)) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert resp.status == 200
        with pytest.raises(_http1.ProtocolError):
            await resp.read()
        assert pool.size == 0
        await pool.close()


@pytest.mark.parametrize(
    "data",
    [
        b"this is not HTTP at all\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
    ids=["not-http", "bad-status", "two-lengths", "bad-chunk-size", "bad-field-name", "unasked-upgrade"],
)
async def test_garbage_is_a_protocol_error(data: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0.5)
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        with pytest.raises(_http1.ProtocolError):
            resp = await pool.request("GET", "/", [], total_timeout=3)
            await resp.read()
        await pool.close()


async def test_folded_header_is_joined_never_smuggled_as_a_field() -> None:
    # obs-fold (RFC 9112 5.2): a client may accept it by replacing the fold with SP, as
    # aiohttp's client parser did and egressd's (llhttp with lenient headers) does. This
    # fails if the parser starts refusing it (ProtocolError), keeps the CRLF, or reads the
    # continuation line as a field of its own (" b" or "b"), which would let an upstream
    # smuggle a header past the proxy's hop-by-hop stripping.
    async with raw_server(cut(b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok")) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=3)
        assert list(resp.headers.items()) == [("X-Folded", "a b"), ("Content-Length", "2")]
        assert await resp.read() == b"ok"
        await pool.close()


@pytest.mark.parametrize(
    ("data", "fields", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nX-Tab: a\r\n\tb\r\nContent-Length: 2\r\n\r\nok", [("X-Tab", "a\tb")], b"ok"),
        (b"HTTP/1.1 200 OK\nX-Lf: 1\nContent-Length: 2\n\nok", [("X-Lf", "1")], b"ok"),
        (b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok", [("X-Ctl", "a\x01b")], b"ok"),
        (b"HTTP/1.1 200 OK\r\nX-Utf8: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\nok", [("X-Utf8", "caf\xe9")], b"ok"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 \r\nok\r\n0\r\nX-Trailer: t\r\n\r\n",
            [("Transfer-Encoding", "chunked")],
            b"ok",
        ),
        (b"HTTP/1.1 299\r\nContent-Length: 2\r\n\r\nok", [("Content-Length", "2")], b"ok"),
    ],
    ids=["fold-with-tab", "lf-line-ends", "control-byte", "utf8-value", "chunk-size-space-and-trailer", "no-reason"],
)
async def test_what_the_parser_accepts_as_aiohttp_did(data: bytes, fields: list[tuple[str, str]], body: bytes) -> None:
    # The leniencies aiohttp 3.14's client parser had; trailers are not answer headers.
    async with raw_server(cut(data)) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=3)
        got = [(k, v) for k, v in resp.headers.items() if k != "Content-Length" or fields[-1][0] == k]
        assert got == fields
        assert await resp.read() == body
        await pool.close()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", "NUL or CR"),
        (b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n 0\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX-A : a\r\nContent-Length: 2\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 8200 + b"\r\nContent-Length: 2\r\n\r\nok", "max_field_size"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Many: %s\r\n" % (b"v" * 1000) * 70 + b"\r\nok", "max_head_size"),
    ],
    ids=[
        "nul",
        "bare-cr",
        "folded-length",
        "te-and-length",
        "signed-length",
        "space-before-colon",
        "big-field",
        "big-head",
    ],
)
async def test_what_the_parser_refuses(data: bytes, match: str) -> None:
    async with raw_server(cut(data)) as srv:
        pool = pool_for(srv.port)
        with pytest.raises(_http1.ProtocolError, match=match):
            await pool.request("GET", "/", [], total_timeout=3)
        assert pool.size == 0
        await pool.close()


async def test_a_second_answer_in_the_same_read_closes_the_connection() -> None:
    async with raw_server(
        cut(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!")
    ) as srv:
        pool = pool_for(srv.port)
        assert await get(pool) == (200, b"ok")
        assert pool.size == 0  # never reused: the surplus answer is not read as the next one
        await pool.close()


async def test_trailer_fields_of_any_size_are_bounded() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: " + b"t" * 9000 + b"\r\n\r\n"
    async with raw_server(cut(data)) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=3)
        with pytest.raises(_http1.ProtocolError, match="max_field_size"):
            await resp.read()
        await pool.close()


async def test_informational_answers_are_skipped() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        assert await get(pool) == (201, b"done")
        assert await get(pool) == (201, b"done")
        assert srv.connections == 1
        await pool.close()


async def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if head.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")
        elif b"/204" in head:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif b"/304" in head:
            writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("HEAD", "/", [], total_timeout=3)
        assert resp.status == 200 and resp.headers["Content-Length"] == "12345"
        assert await resp.read() == b""
        assert await get(pool, "/204") == (204, b"")
        assert await get(pool, "/304") == (304, b"")
        assert await get(pool, "/", method="HEAD") == (200, b"")
        assert await get(pool, "/") == (200, b"ok")
        assert srv.connections == 1 and len(srv.requests) == 5
        await pool.close()


async def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def test_reset_before_any_answer_byte_on_a_fresh_connection() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        await reset(writer)
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        with pytest.raises(_http1.ResetError, match="new connection") as info:
            await get(pool)
        assert info.value.kind == "reset"
        assert len(srv.requests) == 1 and pool.size == 0
        await pool.close()


@pytest.mark.parametrize("how", ["reset", "close"])
async def test_reused_connection_dying_before_the_answer_is_reset_and_never_resent(how: str) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if n == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return True
        if how == "reset":
            await reset(writer)
        return False  # "close": FIN after reading the request, no answer

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        assert await get(pool) == (200, b"ok")
        with pytest.raises(_http1.ResetError, match="reused idle connection"):
            await pool.request("POST", "/charge", [], b"{}", total_timeout=3)
        await asyncio.sleep(0.05)
        assert len(srv.requests) == 2 and srv.connections == 1  # no silent resend
        assert pool.size == 0
        await pool.close()


async def test_idle_connection_closed_by_the_upstream_is_dropped_from_the_pool() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return False  # keep-alive on paper, then FIN

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        assert await get(pool) == (200, b"ok")
        await asyncio.sleep(0.1)
        assert pool.idle == 0 and pool.size == 0
        assert await get(pool) == (200, b"ok")
        assert srv.connections == 2
        await pool.close()


async def test_idle_timeout_before_head_and_between_body_parts() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if b"/body" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await writer.drain()
        await asyncio.sleep(5)
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        began = time.monotonic()
        with pytest.raises(_http1.ReadTimeout):
            await pool.request("GET", "/head", [], idle_timeout=0.3, total_timeout=5)
        assert 0.25 < time.monotonic() - began < 1.5
        resp = await pool.request("GET", "/body", [], idle_timeout=0.3, total_timeout=5)
        began = time.monotonic()
        assert await resp.readany() == b"abc"
        with pytest.raises(_http1.ReadTimeout):
            await resp.readany()
        assert time.monotonic() - began < 1.5
        resp.release()
        assert pool.size == 0
        await pool.close()


async def test_a_drip_fed_answer_ends_at_the_deadline() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(1000):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)
        return False

    async with raw_server(script) as srv:
        pool = pool_for(srv.port)
        began = time.monotonic()
        resp = await pool.request("GET", "/", [], idle_timeout=0.3, total_timeout=0.6)
        with pytest.raises(_http1.ReadTimeout, match="deadline"):
            await resp.read()
        assert 0.5 < time.monotonic() - began < 1.5
        await pool.close()


async def test_connect_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    pool = pool_for(port)
    with pytest.raises(_http1.ConnectError) as info:
        await get(pool)
    assert info.value.kind == "connect_error" and not info.value.timed_out
    assert pool.size == 0
    # A connect that hangs (a blackholed address, a TLS handshake that never ends).
    loop = asyncio.get_running_loop()

    async def hanging(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    monkeypatch.setattr(loop, "create_connection", hanging)
    began = time.monotonic()
    with pytest.raises(_http1.ConnectError) as info:
        await pool.request("GET", "/", [], connect_timeout=0.2, total_timeout=5)
    assert info.value.timed_out and time.monotonic() - began < 1
    assert pool.size == 0


async def test_pool_limit_queues_fifo_and_times_out_as_connect_error() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if b"/slow" in head:
            await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port, max_connections=1)
        slow = asyncio.create_task(get(pool, "/slow"))
        await asyncio.sleep(0.05)
        with pytest.raises(_http1.ConnectError) as info:
            await pool.request("GET", "/a", [], connect_timeout=0.1, total_timeout=5)
        assert info.value.timed_out
        order: list[str] = []

        async def named(name: str) -> None:
            await get(pool, "/" + name)
            order.append(name)

        waiters = [asyncio.create_task(named(n)) for n in ("a", "b", "c")]
        await asyncio.sleep(0.05)
        release.set()
        assert await slow == (200, b"ok")
        await asyncio.gather(*waiters)
        assert order == ["a", "b", "c"]
        assert srv.connections == 1 and pool.size == 1
        await pool.close()


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port, max_connections=1)
        first = asyncio.create_task(get(pool))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(get(pool))
        await asyncio.sleep(0.05)
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        release.set()
        assert await first == (200, b"ok")
        assert await get(pool) == (200, b"ok")
        assert pool.size == 1
        await pool.close()


async def test_idle_connections_expire() -> None:
    async with raw_server(answer()) as srv:
        pool = pool_for(srv.port, keepalive=0.2)
        assert await get(pool) == (200, b"ok")
        assert pool.idle == 1
        await asyncio.sleep(0.5)
        assert pool.idle == 0 and pool.size == 0
        assert await get(pool) == (200, b"ok")
        assert srv.connections == 2
        await pool.close()


async def test_half_read_answer_closes_the_connection() -> None:
    body = b"x" * (8 * MiB)
    async with raw_server(answer(body)) as srv:
        pool = pool_for(srv.port)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert await resp.readany()
        resp.release()
        assert pool.size == 0
        assert await get(pool) == (200, body)
        await pool.close()


async def test_streamed_request_body_chunked_and_with_length(run_app: Callable[..., Awaitable[Upstream]]) -> None:
    seen: list[tuple[str | None, str | None, int]] = []

    async def sink(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        seen.append((request.headers.get("Transfer-Encoding"), request.headers.get("Content-Length"), size))
        return web.Response(text=str(size))

    app = web.Application()
    app.router.add_post("/up", sink)
    up = await run_app(app)
    pool = pool_for(up.port)

    async def body(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"y" * 1000

    resp = await pool.request("POST", "/up", [], body(10), total_timeout=5)
    assert await resp.read() == b"10000"
    resp = await pool.request("POST", "/up", [], body(10), content_length=10_000, total_timeout=5)
    assert await resp.read() == b"10000"
    assert seen == [("chunked", None, 10_000), (None, "10000", 10_000)]
    assert pool.size == 1
    await pool.close()


async def test_failing_request_body_aborts_the_request(run_app: Callable[..., Awaitable[Upstream]]) -> None:
    got: list[str] = []

    async def sink(request: web.Request) -> web.Response:
        try:
            await request.read()
        except Exception as exc:
            got.append(type(exc).__name__)
            raise
        got.append("complete")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/up", sink)
    up = await run_app(app)
    pool = pool_for(up.port)

    async def body() -> AsyncIterator[bytes]:
        yield b"a" * 1000
        await asyncio.sleep(0.05)
        raise RuntimeError("the app went away")

    with pytest.raises(_http1.BodyError) as info:
        await pool.request("POST", "/up", [], body(), total_timeout=5)
    assert isinstance(info.value.__cause__, RuntimeError)

    async def short() -> AsyncIterator[bytes]:
        yield b"a" * 1000

    with pytest.raises(_http1.BodyError, match="ended after 1000 of 5000"):
        await pool.request("POST", "/up", [], short(), content_length=5000, total_timeout=5)
    await asyncio.sleep(0.1)
    assert "complete" not in got
    assert pool.size == 0
    await pool.close()


async def test_big_upload_streams_in_constant_memory(run_app: Callable[..., Awaitable[Upstream]]) -> None:
    async def sink(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            await asyncio.sleep(0)  # a slowish reader
        return web.Response(text=str(size))

    app = web.Application(client_max_size=0)
    app.router.add_post("/up", sink)
    up = await run_app(app)
    pool = pool_for(up.port)
    peak = 0
    holder: list[Any] = []

    async def body() -> AsyncIterator[bytes]:
        nonlocal peak
        block = b"z" * (64 * 1024)
        for _ in range(100 * MiB // len(block)):
            if holder:
                peak = max(peak, holder[0].get_write_buffer_size())
            yield block

    task = asyncio.create_task(pool.request("POST", "/up", [], body(), total_timeout=60))
    await asyncio.sleep(0)
    while not holder and not task.done():
        holder.extend(c.transport for c in _busy(pool))
        await asyncio.sleep(0)
    resp = await task
    assert await resp.read() == str(100 * MiB).encode()
    assert peak < 2 * MiB
    await pool.close()


def _busy(pool: HTTP1Pool) -> list[Any]:
    # The connection in use is referenced by the upload task; find it through gc-free means.
    import gc

    return [o for o in gc.get_objects() if isinstance(o, _http1._Connection) and o.pool is pool and o.busy]


async def test_big_download_streams_in_constant_memory(run_app: Callable[..., Awaitable[Upstream]]) -> None:
    size = 100 * MiB

    async def source(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        block = b"d" * (256 * 1024)
        for _ in range(size // len(block)):
            await resp.write(block)
        return resp

    app = web.Application()
    app.router.add_get("/down", source)
    up = await run_app(app)
    pool = pool_for(up.port)
    resp = await pool.request("GET", "/down", [], idle_timeout=5, total_timeout=60)
    assert resp.content_length == size
    got = 0
    peak = 0
    paused = 0
    n = 0
    while chunk := await resp.readany():
        # readany() hands over everything buffered, so a chunk's size is the buffer's peak
        # since the previous read.
        got += len(chunk)
        peak = max(peak, len(chunk))
        n += 1
        if n % 8 == 0:
            await asyncio.sleep(0.001)  # a consumer slower than loopback
            peak = max(peak, resp.buffered)
            paused += resp._conn is not None and resp._conn._reading_paused
    resp.release()
    assert got == size
    assert peak < 1 * MiB  # HIGH_WATER (128 KiB) plus what one socket read can add
    assert paused  # the socket was paused while the consumer lagged
    assert pool.size == 1  # read to the end: kept
    await pool.close()


async def test_tls_against_a_local_https_server(run_app: Callable[..., Awaitable[Upstream]]) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request.host}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        trusting = ssl.create_default_context()
        ca.configure_trust(trusting)
        pool = HTTP1Pool("127.0.0.1", port, ssl_context=trusting, server_hostname="localhost", host_header="localhost")
        assert await get(pool, "/") == (200, b"hello localhost")
        assert await get(pool, "/") == (200, b"hello localhost")
        assert pool.size == 1
        await pool.close()

        untrusting = HTTP1Pool("127.0.0.1", port, ssl_context=ssl.create_default_context(), server_hostname="localhost")
        with pytest.raises(_http1.ConnectError) as info:
            await get(untrusting, "/")
        assert info.value.tls
        wrong_name = HTTP1Pool("127.0.0.1", port, ssl_context=trusting, server_hostname="other.example")
        with pytest.raises(_http1.ConnectError) as info:
            await get(wrong_name, "/")
        assert info.value.tls
    finally:
        await runner.cleanup()


async def test_no_fd_leak_across_successes_and_failures() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if b"/reset" in head:
            await reset(writer)
            return False
        if b"/garbage" in head:
            writer.write(b"garbage\r\n\r\n")
        elif b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await writer.drain()
            return False
        elif b"/stall" in head:
            await reader.read()  # until the client gives up and closes
            return False
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        pool = pool_for(srv.port, max_connections=4)
        await get(pool)
        before = open_fds()
        for _ in range(20):
            for path in ("/ok", "/reset", "/garbage", "/cut", "/stall", "/ok"):
                with contextlib.suppress(_http1.HTTPError):
                    await get(pool, path, idle_timeout=0.02)
        await asyncio.sleep(0.1)
        assert pool.size <= 1
        assert open_fds() <= before + 1
        await pool.close()
        await asyncio.sleep(0.05)
        assert open_fds() <= before


# -- the transport over the client --------------------------------------------------------


def make_call(method: str = "GET", path: str = "/x", body: Any = None, headers: dict[str, str] | None = None) -> Any:
    from multidict import CIMultiDict, CIMultiDictProxy

    from proxy.clock import RealClock
    from proxy.model import Call, RequestBody

    now = RealClock().now()
    return Call(
        method=method,
        upstream="up",
        path=path,
        query="q=1",
        headers=CIMultiDictProxy(CIMultiDict(headers or {"Accept": "application/json", "X-App": "a"})),
        body=body if body is not None else RequestBody.empty(),
        deadline=now + 5,
        started=now,
        request_id="rid-1",
    )


def make_transport(target: str, **policy: Any) -> Any:
    from proxy.clock import RealClock
    from proxy.config.schema import Policy
    from proxy.events import EventBus
    from proxy.transport import Transport

    pol = Policy.model_validate({"upstream": "up", "target": target, **policy})
    return Transport(pol, RealClock(), EventBus())


async def test_transport_sends_the_request_head() -> None:
    async with raw_server(answer(b"{}", extra=b"Content-Type: application/json\r\nConnection: keep-alive\r\n")) as srv:
        transport = make_transport(
            f"http://127.0.0.1:{srv.port}/v2",
            headers={"add": {"X-Team": "t"}, "remove": ["X-App"]},
            auth={"bearer": "sk_test"},
        )
        from proxy.model import RequestBody

        resp = await transport.send(make_call(headers={"Accept": "*/*", "X-App": "a", "Authorization": "Bearer app"}))
        assert resp.status == 200 and resp.body == b"{}"
        assert "Connection" not in resp.headers and "Content-Length" not in resp.headers
        resp = await transport.send(make_call("POST", "/p", RequestBody(data=b"abc")), extra_headers={"X-Extra": "e"})
        assert resp.status == 200
        await transport.close()
    first = srv.requests[0].decode().split("\r\n")
    assert first[0] == "GET /v2/x?q=1 HTTP/1.1"
    fields = {line.split(": ", 1)[0].lower(): line.split(": ", 1)[1] for line in first[1:] if line}
    assert fields == {
        "host": f"127.0.0.1:{srv.port}",
        "accept": "*/*",
        "x-team": "t",
        "authorization": "Bearer sk_test",
        "x-request-id": "rid-1",
    }
    second = srv.requests[1].decode()
    assert second.startswith("POST /v2/p?q=1 HTTP/1.1\r\n")
    assert "Content-Length: 3\r\n" in second and "X-Extra: e\r\n" in second
    assert srv.connections == 1


async def test_transport_maps_failures_to_details() -> None:
    from proxy.errors import ProxyError

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if b"/reset" in head:
            await reset(writer)
            return False
        if b"/garbage" in head:
            writer.write(b"garbage\r\n\r\n")
        elif b"/cut" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
            await writer.drain()
            return False
        elif b"/stall" in head:
            await reader.read()
            return False
        await writer.drain()
        return True

    async with raw_server(script) as srv:
        transport = make_transport(
            f"http://127.0.0.1:{srv.port}", timeouts={"connect": "1s", "attempt": "0.2s", "total": "2s"}
        )
        details = {}
        for path in ("/reset", "/garbage", "/cut", "/stall"):
            with pytest.raises(ProxyError) as info:
                await transport.send(make_call(path=path))
            details[path] = (info.value.code, info.value.detail)
        await transport.close()
    assert details == {
        "/reset": ("upstream_unreachable", "reset"),
        "/garbage": ("upstream_unreachable", "protocol_error"),
        "/cut": ("upstream_unreachable", "protocol_error"),
        "/stall": ("upstream_timeout", "timeout"),
    }


async def test_a_dropped_answer_frees_its_connection() -> None:
    import gc

    async with raw_server(answer(b"x" * (4 * MiB))) as srv:
        pool = pool_for(srv.port, max_connections=1)
        resp = await pool.request("GET", "/", [], total_timeout=5)
        assert pool.size == 1
        del resp
        gc.collect()
        assert pool.size == 0
        assert await get(pool) == (200, b"x" * (4 * MiB))
        await pool.close()


async def test_auth_side_requests_share_the_target_pool_or_get_a_small_one() -> None:
    async with raw_server(answer(b'{"access_token":"t"}')) as target, raw_server(answer(b"tok")) as other:
        transport = make_transport(f"http://127.0.0.1:{target.port}/v2")
        status, body = await transport.fetch(
            "POST", f"http://127.0.0.1:{target.port}/oauth/token?x=1", [("Accept", "*/*")], b"a=1", within=2
        )
        assert (status, body) == (200, b'{"access_token":"t"}')
        assert transport.pool().idle == 1  # the upstream's own pool, connection kept
        assert await transport.fetch("GET", f"http://localhost:{other.port}/t", [], None, within=2) == (200, b"tok")
        side = transport._side_pools[("http", "localhost", other.port)]
        assert side.max_connections == 2 and side.idle == 1 and transport.pool().idle == 1
        await transport.close()
        assert side.idle == 0
    assert target.requests == [
        b"POST /oauth/token?x=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAccept: */*\r\nContent-Length: 3\r\n\r\n"
        % target.port
    ]
    assert other.requests[0].startswith(b"GET /t HTTP/1.1\r\nHost: localhost:%d\r\n" % other.port)


async def test_auth_side_requests_use_the_upstreams_tls_settings(tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)

    async def token(request: web.Request) -> web.Response:
        return web.Response(text="tok")

    app = web.Application()
    app.router.add_post("/token", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    url = f"https://localhost:{port}/token"
    try:
        trusting = make_transport("https://api.example.com", tls={"ca_file": str(ca_file)})
        assert await trusting.fetch("POST", url, [], b"", within=3) == (200, b"tok")
        await trusting.close()
        default = make_transport("https://api.example.com")
        with pytest.raises(_http1.ConnectError) as info:
            await default.fetch("POST", url, [], b"", within=3)
        assert info.value.tls
        await default.close()
        unverified = make_transport("https://api.example.com", tls={"verify": False})
        assert await unverified.fetch("POST", url, [], b"", within=3) == (200, b"tok")
        await unverified.close()
    finally:
        await runner.cleanup()
