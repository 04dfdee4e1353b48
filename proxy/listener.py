"""The sockets egressd listens on, and the HTTP server behind each proxy listener.

`proxy_server` builds aiohttp's low-level server for the proxy path with egressd's limits
on the request head, its keep-alive, its request-head deadline (slowloris) and its own
answer to a request the HTTP parser refused (proxy/_aiohttp_compat.py holds the two
parts aiohttp has no public hook for). `Listeners` starts and stops the sites: "main"
(routes `/<upstream>/<rest>`), "admin" (proxy/admin.py) and one "upstream:<name>" per
policy `listen` port (takes every path of one upstream), kept in step with the policies
on every reload.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from proxy._aiohttp_compat import GuardedProtocol, OnMalformed, guarded_server

log = logging.getLogger("egressd")
# Start-up lines ("... listening on HOST:PORT") are printed at any --log-level: tools and
# operators rely on them to learn ports picked with :0. configure_logging pins this logger.
lifecycle = logging.getLogger("egressd.lifecycle")

# Limits on the request head, explicit rather than inherited (docs/security.md): past them
# the parser refuses the request with 400 `bad_request`, naming the limit and its flag,
# before any routing happens. `--max-request-header-size` sets the first two (the request
# line and one header field, name and value), `--max-request-headers` the third.
MAX_REQUEST_LINE = 8190
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 128
# aiohttp's descriptions of the head limits (LineTooLong, BadHttpMessage), matched to name
# the limit instead; tests/test_header_limits.py fails if an aiohttp upgrade rewords them.
_LINE_TOO_LONG = re.compile(r"Got more than (\d+) bytes when reading")
_TOO_MANY_HEADERS = "Too many headers received"
# An idle kept-alive connection from the app is closed after this long (`--keepalive-timeout`,
# contract 7.1): nginx's default. Every open connection holds a file descriptor, so an
# unbounded idle time lets idle pools exhaust the process's file limit (issue 13).
KEEPALIVE_TIMEOUT = 75.0
# At the end of the shutdown, the time left to connections still open (all calls have
# been answered or cut by then: proxy/server.py), for all listeners together.
CLOSE_TIMEOUT = 0.5
# A listener a reload removed: its calls in flight get this long to be answered.
RETIRE_GRACE = 60.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def proxy_server(
    handler: Handler,
    *,
    header_timeout: float,
    on_malformed: OnMalformed,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    max_header_size: int = MAX_HEADER_FIELD,
    max_headers: int = MAX_HEADERS,
) -> web.Server:
    """aiohttp's low-level server for a proxy listener. An idle connection is closed after
    `keepalive_timeout` seconds without a request (a request being answered never is).
    The request line and each header field may be `max_header_size` bytes long, and a
    request may carry `max_headers` header fields; `on_malformed` gets the limit named."""

    def refused(request: web.BaseRequest, description: str) -> web.StreamResponse:
        return on_malformed(request, limit_reason(description, max_headers=max_headers))

    return guarded_server(
        handler,
        head_timeout=header_timeout,
        on_malformed=refused,
        access_log=None,
        handler_cancellation=True,
        max_line_size=max_header_size,
        max_field_size=max_header_size,
        max_headers=max_headers,
        keepalive_timeout=keepalive_timeout,
        # Bodies are forwarded as sent: decompressing them here would send plain bytes
        # under the app's Content-Encoding (and invite decompression bombs).
        auto_decompress=False,
    )


def limit_reason(description: str, *, max_headers: int) -> str:
    """The parser's description of a refused head, rewritten to name the limit (and the flag
    that sets it) when a head limit refused it; any other description is returned as is.
    Never the offending bytes: aiohttp's LineTooLong description quotes them."""
    line = _LINE_TOO_LONG.match(description)
    if line is not None:
        return f"request line or header longer than {line.group(1)} bytes (--max-request-header-size)"
    if description.startswith(_TOO_MANY_HEADERS):
        return f"more than {max_headers} request headers (--max-request-headers)"
    return description


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listeners:
    """The running listeners by key ("main", "admin", "upstream:<name>") and their addresses."""

    def __init__(self, *, spawn: Spawn) -> None:
        self._spawn = spawn
        self._runners: dict[str, web.BaseRunner] = {}
        self.addresses: dict[str, tuple[str, int]] = {}  # the bound address (a :0 port resolved)
        self._configured: dict[str, tuple[str, int]] = {}  # dedicated listener key -> address asked for

    async def start(self, key: str, addr: tuple[str, int], app: web.Application | web.Server) -> None:
        runner: web.BaseRunner
        if isinstance(app, web.Application):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=CLOSE_TIMEOUT)
        else:
            runner = web.ServerRunner(app, access_log=None, shutdown_timeout=CLOSE_TIMEOUT)
        await runner.setup()
        site = web.TCPSite(runner, addr[0], addr[1], backlog=1024, reuse_address=True)
        await site.start()
        sockets = runner.addresses
        bound = sockets[0] if sockets else addr
        host, port = str(bound[0]), int(bound[1])
        self._runners[key] = runner
        self.addresses[key] = (host, port)
        lifecycle.info(
            f"{key} listening on {fmt_addr(host, port)}", extra={"listener": key, "address": fmt_addr(host, port)}
        )
        if key == "admin" and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "the admin listener is reachable from outside this host: it exposes metrics and status to anyone "
                "who can connect; bind it to 127.0.0.1 unless a network policy protects it",
                extra={"address": fmt_addr(host, port)},
            )

    async def sync_upstreams(
        self, wanted: dict[str, tuple[str, int]], make_server: Callable[[str], web.Server]
    ) -> None:
        """Make the dedicated listeners those of `wanted` (upstream name -> address): stop
        the ones no policy asks for any more or whose address changed, start the new ones."""
        keyed = {f"upstream:{name}": addr for name, addr in wanted.items()}
        for key in [k for k in self._runners if k.startswith("upstream:")]:
            if key not in keyed or self._configured.get(key) != keyed[key]:
                runner = self._runners.pop(key)
                self.addresses.pop(key, None)
                self._configured.pop(key, None)
                self._spawn(self._retire(runner))
        for key, addr in keyed.items():
            if key not in self._runners:
                await self.start(key, addr, make_server(key.split(":", 1)[1]))
                self._configured[key] = addr

    async def _retire(self, runner: web.BaseRunner) -> None:
        """Stop a listener a reload removed: refuse new connections, close each connection
        once idle, then close what is left (after `RETIRE_GRACE` at most)."""
        try:
            for site in list(runner.sites):
                await site.stop()
            loop = asyncio.get_running_loop()
            until = loop.time() + RETIRE_GRACE
            server = runner.server
            while server is not None and loop.time() < until:
                open_ = [c for c in server.connections if not (isinstance(c, GuardedProtocol) and c.close_if_idle())]
                if not open_:
                    break
                await asyncio.sleep(0.25)
        finally:
            await runner.cleanup()

    async def stop_accepting(self) -> int:
        """The drain's start: the proxy listeners stop accepting (a new connection is
        refused) and their idle connections are closed; connections with a request being
        read or answered stay open for its answer. The admin listener stays up (/readyz
        says 503). Returns the number of idle connections closed."""
        closed = 0
        for key, runner in list(self._runners.items()):
            if key == "admin":
                continue
            for site in list(runner.sites):
                await site.stop()
            server = runner.server
            if server is not None:
                for conn in server.connections:
                    if isinstance(conn, GuardedProtocol) and conn.close_if_idle():
                        closed += 1
        return closed

    async def close(self) -> None:
        """Close every listener and connection, all together: one `CLOSE_TIMEOUT`, not
        one per listener (calls are answered by then: proxy/server.py's drain)."""
        runners = list(self._runners.values())
        self._runners.clear()
        await asyncio.gather(*(runner.cleanup() for runner in runners), return_exceptions=True)
