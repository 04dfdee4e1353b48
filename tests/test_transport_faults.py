"""Upstreams that fail at the socket level: each gives the contract's answer, never a short 200."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from tests.conftest import proxy_url

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(behaviour: Behaviour) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server that reads one request head and then does `behaviour`."""
    hits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            hits.append(1)
            await behaviour(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", hits
    finally:
        server.close()
        # Close lingering connections so the server's tasks end.
        server.close_clients() if hasattr(server, "close_clients") else None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"this is not HTTP at all\r\n\r\n")
    await writer.drain()


async def truncated_small(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/json\r\n\r\n{"partial":')
    await writer.drain()


async def truncated_large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 300_000)
    await writer.drain()


async def chunked_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


async def drip_large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 300_000)
    for _ in range(1000):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


def policy(url: str, **extra: Any) -> list[dict[str, Any]]:
    return [{"upstream": "up", "target": url, "timeouts": {"connect": "1s", "attempt": "1s", "total": "2s"}, **extra}]


@pytest.mark.parametrize(
    ("behaviour", "status", "code"),
    [
        (reset, 502, "upstream_unreachable"),
        (garbage, 502, "upstream_unreachable"),
        (truncated_small, 502, "upstream_unreachable"),
        (hang, 504, "upstream_timeout"),
        (drip, 504, "upstream_timeout"),
    ],
)
async def test_failures_before_headers(start_proxy: Any, behaviour: Behaviour, status: int, code: str) -> None:
    async with raw_upstream(behaviour) as (url, hits):
        server = await start_proxy(policy(url))
        began = time.monotonic()
        async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/up/x") as resp:
            assert resp.status == status
            assert resp.headers["X-Egressd-Error"] == code
            body = await resp.json()
            assert body["error"]["code"] == code
        assert time.monotonic() - began < 3.0
        assert hits == [1]


@pytest.mark.parametrize("behaviour", [truncated_large, chunked_cut])
async def test_cut_after_headers_aborts_the_client_stream(start_proxy: Any, behaviour: Behaviour) -> None:
    async with raw_upstream(behaviour) as (url, _):
        server = await start_proxy(policy(url))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(proxy_url(server) + "/up/x") as resp:
                    assert resp.status == 200
                    await resp.read()
            # The proxy is fine afterwards.
            async with s.get(proxy_url(server, "admin") + "/healthz") as resp:
                assert resp.status == 200


async def test_drip_fed_answer_ends_by_the_total_deadline(start_proxy: Any) -> None:
    async with raw_upstream(drip_large) as (url, _):
        server = await start_proxy(policy(url))
        began = time.monotonic()
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(proxy_url(server) + "/up/x") as resp:
                    await resp.read()
        assert time.monotonic() - began < 3.5


async def test_connection_refused_is_unreachable(start_proxy: Any) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    server = await start_proxy(policy(f"http://127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/up/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Egressd-Error"] == "upstream_unreachable"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_socket_leak_across_failures(start_proxy: Any) -> None:
    async with raw_upstream(reset) as (url, _):
        server = await start_proxy(policy(url))
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy_url(server) + "/up/x") as resp:
                await resp.read()
            before = open_fds()
            for _ in range(50):
                async with s.get(proxy_url(server) + "/up/x") as resp:
                    assert resp.status == 502
            await asyncio.sleep(0.1)
            assert open_fds() <= before + 2
