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

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web

from proxy._aiohttp_compat import OnMalformed, guarded_server

log = logging.getLogger("egressd")
# Start-up lines ("... listening on HOST:PORT") are printed at any --log-level: tools and
# operators rely on them to learn ports picked with :0. configure_logging pins this logger.
lifecycle = logging.getLogger("egressd.lifecycle")

# Limits on the request head, explicit rather than inherited (docs/security.md): past them
# the parser refuses the request with 400 `bad_request` before any routing happens.
MAX_REQUEST_LINE = 8190
MAX_HEADER_FIELD = 8190
MAX_HEADERS = 128
# An idle kept-alive connection from the app is closed after this long. Longer than the
# idle timeout of any client pool, so the app's side closes first and never sends on a
# connection egressd is closing (aiohttp's own default, pinned here).
KEEPALIVE_TIMEOUT = 3630.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Spawn = Callable[[Coroutine[Any, Any, Any]], None]


def proxy_server(handler: Handler, *, header_timeout: float, on_malformed: OnMalformed) -> web.Server:
    """aiohttp's low-level server for a proxy listener."""
    return guarded_server(
        handler,
        head_timeout=header_timeout,
        on_malformed=on_malformed,
        access_log=None,
        handler_cancellation=True,
        max_line_size=MAX_REQUEST_LINE,
        max_field_size=MAX_HEADER_FIELD,
        max_headers=MAX_HEADERS,
        keepalive_timeout=KEEPALIVE_TIMEOUT,
        # Bodies are forwarded as sent: decompressing them here would send plain bytes
        # under the app's Content-Encoding (and invite decompression bombs).
        auto_decompress=False,
    )


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listeners:
    """The running listeners by key ("main", "admin", "upstream:<name>") and their addresses."""

    def __init__(self, *, drain: float, spawn: Spawn) -> None:
        self._drain = drain
        self._spawn = spawn
        self._runners: dict[str, web.BaseRunner] = {}
        self.addresses: dict[str, tuple[str, int]] = {}  # the bound address (a :0 port resolved)
        self._configured: dict[str, tuple[str, int]] = {}  # dedicated listener key -> address asked for

    async def start(self, key: str, addr: tuple[str, int], app: web.Application | web.Server) -> None:
        runner: web.BaseRunner
        if isinstance(app, web.Application):
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._drain)
        else:
            runner = web.ServerRunner(app, access_log=None, shutdown_timeout=self._drain)
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
                self._spawn(runner.cleanup())
        for key, addr in keyed.items():
            if key not in self._runners:
                await self.start(key, addr, make_server(key.split(":", 1)[1]))
                self._configured[key] = addr

    async def stop_accepting(self) -> None:
        """Stop accepting connections on the proxy listeners; the admin stays up (/readyz says 503)."""
        for key, runner in list(self._runners.items()):
            if key != "admin":
                for site in list(runner.sites):
                    await site.stop()

    async def close(self) -> None:
        for key in list(self._runners):
            runner = self._runners.pop(key)
            await runner.cleanup()
