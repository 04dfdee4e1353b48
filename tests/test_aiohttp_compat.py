"""aiohttp's server internals that proxy/_aiohttp_compat.py relies on, checked on a live
connection: after an aiohttp upgrade these fail first, naming the attribute that moved.

And the rule that goes with it: no other module of egressd imports an aiohttp private
module or underscore name, subclasses an aiohttp class, or reads an underscore attribute
of an object that is not its own.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from proxy import _aiohttp_compat as compat
from proxy.listener import KEEPALIVE_TIMEOUT, proxy_server

ROOT = Path(__file__).resolve().parent.parent
UPGRADE = f"aiohttp {aiohttp.__version__}: update proxy/_aiohttp_compat.py (and its INTERNALS) for"


@asynccontextmanager
async def serving(server: web.Server) -> AsyncIterator[tuple[str, int]]:
    runner = web.ServerRunner(server, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield str(host), int(port)
    finally:
        await runner.cleanup()


def guarded(handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], **kwargs: Any) -> web.Server:
    kwargs.setdefault("head_timeout", 0)
    kwargs.setdefault("on_malformed", lambda request, reason: web.Response(status=400, text=reason))
    return compat.guarded_server(handler, handler_cancellation=True, access_log=None, **kwargs)


async def test_every_internal_is_there_on_a_live_connection() -> None:
    seen: list[tuple[Any, web.BaseRequest]] = []
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append((request.protocol, request))
        await release.wait()
        return web.Response(text="ok")

    server = guarded(handler)
    async with serving(server) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            # Two pipelined heads: the first is being answered, the second waits its turn.
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            protocol, request = seen[0]
            assert isinstance(protocol, compat.GuardedProtocol), "web.Server.__call__ no longer builds the protocol"
            assert protocol in server.connections
            missing = compat.missing_internals(protocol)
            assert not missing, f"{UPGRADE} {', '.join(missing)}"
            # What each is expected to hold, in the state the head timer reads it.
            assert protocol._request_count == 2, f"{UPGRADE} RequestHandler._request_count (heads parsed)"
            assert len(protocol._messages) == 1, f"{UPGRADE} RequestHandler._messages (heads waiting)"
            assert callable(protocol._messages[-1][1].is_eof), f"{UPGRADE} RequestHandler._messages items"
            assert protocol._current_request is request, f"{UPGRADE} RequestHandler._current_request"
            release.set()
            answers = b""
            while answers.count(b"HTTP/1.1 200") < 2:
                answers += await asyncio.wait_for(reader.read(65536), 3)
            assert protocol._current_request is None, f"{UPGRADE} RequestHandler._current_request (idle)"
        finally:
            writer.close()


def test_missing_internals_names_what_is_gone() -> None:
    assert compat.missing_internals() == []
    gone = compat.missing_internals(protocol=object())
    assert "aiohttp.web.RequestHandler._request_count" in gone
    assert "aiohttp.web.RequestHandler.handle_error" in gone
    assert not any(name.startswith("aiohttp.web.Server.") for name in gone)


async def test_a_refused_request_reaches_on_malformed_with_the_parsers_reason() -> None:
    reasons: list[str] = []

    def on_malformed(request: web.BaseRequest, reason: str) -> web.StreamResponse:
        reasons.append(reason)
        return web.Response(status=400, text="ours")

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        raise AssertionError("a malformed request must not reach the handler")

    async with serving(guarded(handler, on_malformed=on_malformed)) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            await writer.drain()
            out = await asyncio.wait_for(reader.read(), 3)  # answered, then closed
        finally:
            writer.close()
    assert out.split(b" ", 2)[1:2] == [b"400"], f"{UPGRADE} RequestHandler.handle_error (status 400): {out[:80]!r}"
    assert out.endswith(b"ours")
    assert len(reasons) == 1 and reasons[0], f"{UPGRADE} the parser's message (HttpProcessingError.message)"


async def test_head_timer_closes_a_connection_that_sends_no_head() -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="ok")

    async with serving(guarded(handler, head_timeout=0.2)) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"GET /a HTTP/1.1\r\nHost")
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 2) == b"", f"{UPGRADE} RequestHandler.force_close"
        finally:
            writer.close()


async def test_public_server_options_reach_the_connection() -> None:
    seen: list[Any] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        seen.append(request.protocol)
        return web.Response(text="ok")

    server = proxy_server(handler, header_timeout=0, on_malformed=lambda r, reason: web.Response(status=400))
    async with serving(server) as (host, port):
        async with aiohttp.ClientSession() as session, session.get(f"http://{host}:{port}/x") as resp:
            assert resp.status == 200
    assert seen[0].keepalive_timeout == KEEPALIVE_TIMEOUT
    assert server.handler_cancellation is True


# -- nothing else reaches into aiohttp ---------------------------------------------------

PUBLIC_MODULES = {"aiohttp", "aiohttp.web", "aiohttp.hdrs", "aiohttp.abc", "aiohttp.test_utils"}
ALLOWED = {"proxy/_aiohttp_compat.py"}
# Modules being rebuilt on public parsers (issue 12, item 3): each must still need its
# entry; once it does not, delete the entry so the rule holds for it too.
PENDING: set[str] = set()


def private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    from_aiohttp: set[str] = set()
    uses_aiohttp = False
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "aiohttp":
                    uses_aiohttp = True
                    if alias.name not in PUBLIC_MODULES:
                        found.append(f"{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "aiohttp":
            uses_aiohttp = True
            if node.module not in PUBLIC_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
            for alias in node.names:
                from_aiohttp.add(alias.asname or alias.name)
                if alias.name.startswith("_"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and (root.id in from_aiohttp or root.id == "aiohttp"):
                    found.append(f"{node.lineno}: class {node.name}({ast.unparse(base)})")
        elif uses_aiohttp and isinstance(node, ast.Attribute):
            name, owner = node.attr, node.value
            if name.startswith("_") and not name.startswith("__"):
                if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                    found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_other_module_reaches_into_aiohttp() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("proxy/**/*.py"), *ROOT.glob("plugins/**/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        found = private_uses(path)
        if rel in PENDING:
            assert found, f"{rel} no longer uses aiohttp internals: delete it from PENDING in this test"
        elif found:
            offenders[rel] = found
    assert not offenders, f"aiohttp internals outside proxy/_aiohttp_compat.py: {offenders}"
