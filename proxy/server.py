"""egressd's server: what starts, serves, reloads and stops one egressd process.

`EgressServer` wires the parts, each in its own module:

- proxy/listener.py: the sockets ("main", "admin", one per policy `listen` port) and the
  aiohttp server behind each proxy listener (request-head limits and deadline, keep-alive,
  the answer to a malformed request);
- proxy/handler.py: the proxy handler, request -> `Call` -> pipeline -> answer, the
  ownership of unsafe calls, and the `CallFinished` event of each call;
- proxy/admin.py: /healthz, /readyz, /metrics, /status, /status.json;
- proxy/webhooks/: the webhook listener ("webhooks", `--webhook-listen`), its store and
  its delivery worker (contract 7.5);
- proxy/reload.py: the policy directory watch, SIGHUP, the validation-first swap.

`serve()` is `egressd run`: start, serve until SIGTERM/SIGINT, drain, stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy import _http1
from proxy.admin import Admin
from proxy.clock import Clock, RealClock
from proxy.events import EventBus
from proxy.fds import fd_limit, fd_pressure, open_fds, raise_fd_limit
from proxy.handler import ProxyHandler
from proxy.listener import KEEPALIVE_TIMEOUT, MAX_HEADER_FIELD, MAX_HEADERS, Listeners, proxy_server
from proxy.observe.logs import AccessLog
from proxy.observe.metrics import Metrics
from proxy.observe.status import StatusBoard
from proxy.outbox.store import OutboxStore, open_outbox
from proxy.outbox.worker import OutboxWorker
from proxy.reload import Built, PolicyRejected, Reloader
from proxy.runtime import Runtime
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState
from proxy.transport import AnswerLimits
from proxy.webhooks.listener import WebhookListener
from proxy.webhooks.store import WebhookStore, open_webhook_store
from proxy.webhooks.worker import WebhookWorker

log = logging.getLogger("egressd")
# After the drain's end: the time the answers of queued calls (503 `draining`), then of
# the calls cut in flight, get to be written before the connections are closed. With
# the listeners' own CLOSE_TIMEOUT, the exit comes within `--drain` + 2 s (contract 7.3).
ANSWER_GRACE = 0.4
# The "near the file limit" warning is repeated at most this often while it holds.
FD_WARN_EVERY = 60.0


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
    # An app connection idle this long between requests is closed (`--keepalive-timeout`).
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    # Head limits (docs/security.md). The request line and each request header field, name
    # and value, in bytes (`--max-request-header-size`); the number of request header fields
    # (`--max-request-headers`): past them 400 `bad_request` naming the limit. Each header
    # field of an upstream's answer (`--max-response-header-size`) and its whole head
    # (`--max-response-head-size`): past them 502 `upstream_unreachable`, `header_too_large`.
    max_request_header_size: int = MAX_HEADER_FIELD
    max_request_headers: int = MAX_HEADERS
    max_response_header_size: int = _http1.MAX_FIELD_SIZE
    max_response_head_size: int = _http1.MAX_HEAD_SIZE
    # How often the open file descriptors are checked against the file limit (proxy/fds.py).
    fd_check_interval: float = 2.0
    # The durable store (`--data-dir`): idempotency and fingerprint records and the routing
    # ledger survive a restart. None keeps them in process memory (`--data-dir none`).
    data_dir: Path | None = None
    # The inbound webhook listener (`--webhook-listen`, contract 7.5); None: off.
    webhook_listen: tuple[str, int] | None = None
    # `--ready-when-warm`: /readyz stays 503 at start-up until every upstream's pool has its
    # `pool.min_warm` connections up, or `warm_wait` seconds passed (then it turns ready
    # anyway, with a warning naming the upstreams still cold: a provider that is down must
    # not keep the pod out of service forever; its calls then connect as they come).
    ready_when_warm: bool = False
    warm_wait: float = 10.0


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


class EgressServer:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        state: StateBackend | None = None,
        events: EventBus | None = None,
        outbox_store: OutboxStore | None = None,
        webhook_store: WebhookStore | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or RealClock()
        self.events = events or EventBus()
        self.state: StateBackend = state or MemoryState(self.clock)
        limits = AnswerLimits(settings.max_response_header_size, settings.max_response_head_size)
        self.runtime = Runtime(self.clock, self.events, self.state, answer_limits=limits)
        # The outbox (contract 7.6): its store goes with the state backend (data dir,
        # Redis, or memory); the stage keeps sends there and wakes the delivery worker.
        self.outbox_store: OutboxStore = outbox_store or open_outbox(self.state)
        self.outbox = OutboxWorker(self.runtime, self.outbox_store, self.clock, self.events)
        self.runtime.outbox_store = self.outbox_store
        self.runtime.outbox_wake = self.outbox.wake
        # Inbound webhooks (contract 7.5): the store goes with the state backend too; the
        # listener stores verified events and wakes the delivery worker.
        self.webhook_store: WebhookStore = webhook_store or open_webhook_store(self.state)
        self.webhooks = WebhookWorker(self.runtime, self.webhook_store, self.clock, self.events)
        self.webhook_listener = WebhookListener(
            self.runtime, self.webhook_store, self.clock, self.events, wake=self.webhooks.wake
        )
        self.metrics = Metrics(tallies=self.events.tallies, pools=self.pool_stats)
        self.status = StatusBoard(tallies=self.events.tallies)
        self.events.subscribe(self.metrics)
        self.events.subscribe(self.status)
        self.access_log = AccessLog()
        self.events.subscribe(self.access_log)
        self.ready = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.handler = ProxyHandler(self.runtime, self.clock, self.events, self.spawn)
        self.listeners = Listeners(spawn=self.spawn)
        self.addresses: dict[str, tuple[str, int]] = self.listeners.addresses
        self.admin = Admin(self)
        self.reloader = Reloader(
            policies=settings.policies,
            interval=settings.watch_interval,
            runtime=self.runtime,
            events=self.events,
            applied=self._applied,
            spawn=self.spawn,
        )

    def pool_stats(self) -> dict[str, dict[str, Any] | None]:
        """Each upstream pool's connections and counters now (None: not used yet)."""
        return {name: rt.transport.pool_stats() for name, rt in self.runtime.upstreams.items()}

    @property
    def draining(self) -> bool:
        return self.handler.draining

    @property
    def in_flight(self) -> int:
        """Calls in flight, owned unsafe calls whose app left included."""
        return self.handler.in_flight

    @property
    def last_reload(self) -> dict[str, Any] | None:
        return self.reloader.last_reload

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        try:
            built = self.reloader.load_initial()
        except PolicyRejected as exc:
            raise StartupError(str(exc)) from exc
        for name in built:
            self.metrics.declare_upstream(name)
        try:
            await self.listeners.start("admin", self.settings.admin, self.admin.app())
            await self.listeners.start("main", self.settings.listen, self._proxy_server(None))
            await self._sync_upstream_listeners()
            if self.settings.webhook_listen is not None:
                await self.listeners.start("webhooks", self.settings.webhook_listen, self._webhook_server())
        except OSError as exc:
            await self.stop()
            raise StartupError(f"cannot listen: {exc}") from exc
        if self.settings.ready_when_warm and any(rt.policy.pool.min_warm for rt in built.values()):
            self.spawn(self._ready_when_warm())
        else:
            self.ready = True
        self.outbox.start()
        self.webhooks.start()
        hooked = sorted(name for name, rt in built.items() if rt.policy.webhooks is not None)
        if hooked and self.settings.webhook_listen is None:
            log.warning(
                "upstreams have a webhooks block but --webhook-listen is not set: no webhook is received",
                extra={"upstreams": hooked},
            )
        if hooked and self.webhook_store.name == "memory":
            log.warning(
                "webhook events are kept in process memory (--data-dir none): events not yet delivered "
                "to the app are lost on restart",
                extra={"upstreams": hooked},
            )
        kept = sorted(name for name, rt in built.items() if rt.policy.outbox is not None)
        if kept and self.outbox_store.name == "memory":
            log.warning(
                "the outbox is kept in process memory (--data-dir none): sends it accepted are lost on restart",
                extra={"upstreams": kept},
            )
        if self.settings.fd_check_interval > 0:
            self.spawn(self._watch_fds())
        log.info(
            "policies loaded",
            extra={"version": self.runtime.version, "upstreams": sorted(built), "state_backend": self.state.name},
        )

    async def _ready_when_warm(self) -> None:
        """`--ready-when-warm`: ready once the warm connections are up, or after `warm_wait`."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        wait = self.settings.warm_wait
        try:
            await asyncio.wait_for(self.runtime.wait_warm(), timeout=wait)
        except TimeoutError:
            log.warning(
                f"ready without every warm connection: upstreams still connecting after {wait:g} s "
                "(--warm-wait); their first calls connect as they come",
                extra={"upstreams": self.runtime.not_warm(), "warm_wait": wait},
            )
        else:
            log.info("warm connections are up", extra={"seconds": round(loop.time() - began, 3)})
        if not self.draining:
            self.ready = True

    def _proxy_server(self, fixed_upstream: str | None) -> web.Server:
        """The server of the main listener (None) or of one upstream's own `listen` port."""
        handle = self.handler.handle

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            return await handle(request, fixed_upstream)

        return proxy_server(
            handler,
            header_timeout=self.settings.header_timeout,
            keepalive_timeout=self.settings.keepalive_timeout,
            max_header_size=self.settings.max_request_header_size,
            max_headers=self.settings.max_request_headers,
            on_malformed=self.handler.malformed,
        )

    def _webhook_server(self) -> web.Server:
        """The webhook listener's server: the proxy listeners' head limits, head deadline
        and keep-alive (contract 7.7), and only `POST /<upstream>` behind them."""
        return proxy_server(
            self.webhook_listener.handle,
            header_timeout=self.settings.header_timeout,
            keepalive_timeout=self.settings.keepalive_timeout,
            max_header_size=self.settings.max_request_header_size,
            max_headers=self.settings.max_request_headers,
            on_malformed=self.webhook_listener.malformed,
        )

    async def _sync_upstream_listeners(self) -> None:
        upstreams = self.runtime.upstreams.items()
        wanted = {name: parse_hostport(rt.policy.listen) for name, rt in upstreams if rt.policy.listen}
        await self.listeners.sync_upstreams(wanted, self._proxy_server)

    async def _applied(self, built: Built) -> None:
        """After a reload's swap: the dedicated listeners follow the policies, new upstreams get metrics."""
        with contextlib.suppress(OSError):
            await self._sync_upstream_listeners()
        for name in built:
            self.metrics.declare_upstream(name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` in the background; `stop()` cancels what is still running."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_fds(self) -> None:
        """Warn (at most every `FD_WARN_EVERY` s) while the open file descriptors are 80 %
        or more of the file limit; the gauges read the same numbers at each scrape."""
        loop = asyncio.get_running_loop()
        warned = -FD_WARN_EVERY
        while True:
            await asyncio.sleep(self.settings.fd_check_interval)
            count, limit = open_fds(), fd_limit()
            message = fd_pressure(count, limit)
            if message is not None and loop.time() - warned >= FD_WARN_EVERY:
                warned = loop.time()
                log.warning(message, extra={"open_fds": count, "max_fds": limit})

    async def _settle(self, seconds: float) -> bool:
        """Wait up to `seconds` for no call to be in flight; True if none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.handler.idle.wait(), timeout=max(seconds, 0.0))
        return self.handler.idle.is_set()

    async def drain_and_stop(self) -> None:
        """SIGTERM (contract 7.3): new connections are refused and idle ones closed at
        once, /readyz says 503; calls in flight, queued ones included, go on for up to
        `--drain` seconds. Then calls still in a rate-limit queue get 503 `draining`, calls
        still running are cut with an answer (proxy/handler.py, `cut`), and everything
        closes: the exit comes within `--drain` + 2 s, whatever the number of listeners."""
        if self.draining:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain
        self.handler.draining = True
        self.ready = False
        closed = await self.listeners.stop_accepting()
        log.info(
            "draining",
            extra={"in_flight": self.in_flight, "drain_seconds": self.settings.drain, "idle_closed": closed},
        )
        # The outbox worker takes no new entries; what it is delivering gets the drain.
        outbox_stopped = loop.create_task(self.outbox.stop(wait=max(self.settings.drain - ANSWER_GRACE, 0.0)))
        webhooks_stopped = loop.create_task(self.webhooks.stop(wait=max(self.settings.drain - ANSWER_GRACE, 0.0)))
        if not await self._settle(deadline - loop.time()):
            self.runtime.drain.end()  # the rate-limit queues answer 503 `draining`
            if not await self._settle(ANSWER_GRACE):
                cut = self.handler.cut()
                log.warning(
                    "the drain ended with calls still in flight: they were answered and cut",
                    extra={"cut": cut, "drain_seconds": self.settings.drain},
                )
                await self._settle(ANSWER_GRACE)
        await outbox_stopped
        await webhooks_stopped
        await self.stop()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.outbox.stop()
        await self.webhooks.stop()
        await self.listeners.close()
        await self.runtime.close()
        await self.outbox_store.close()
        await self.webhook_store.close()
        await self.state.close()
        self.access_log.flush()

    # -- reload and admin (proxy/reload.py, proxy/admin.py) -------------------------------
    async def watch(self) -> None:
        await self.reloader.watch()

    async def reload(self, reason: str = "SIGHUP") -> bool:
        return await self.reloader.reload(reason)

    async def status_data(self) -> dict[str, Any]:
        """`/status.json`; docs/operations.md ("Status page") documents every field."""
        return await self.admin.status_data()


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
    raised = raise_fd_limit()
    if raised is not None:
        log.info(f"file limit raised from {raised[0]} to {raised[1]}", extra={"max_fds": raised[1]})
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
    loop.add_signal_handler(signal.SIGHUP, server.reloader.on_sighup)
    watcher = loop.create_task(server.watch())
    await stop.wait()
    watcher.cancel()
    await server.drain_and_stop()
    log.info("stopped")
    return 0
