"""The admin listener: /healthz, /readyz, /metrics, /status and /status.json.

An aiohttp `Application` on its own port (`--admin`, loopback by default). It only reads
the server: the probes its `ready`/`draining` flags, /metrics the Prometheus registry
(proxy/observe/metrics.py), /status and /status.json one snapshot built by `status_data`
(docs/operations.md, "Status page", documents every field; proxy/observe/status.py
renders the page).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiohttp import web

from proxy.observe.metrics import Metrics
from proxy.observe.status import CSP as STATUS_CSP
from proxy.observe.status import StatusBoard, render_html, safe_target, scrub
from proxy.runtime import Runtime
from proxy.state.base import StateBackend


class ServerView(Protocol):
    """What the admin endpoints read of the server (proxy/server.py, `EgressServer`)."""

    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def last_reload(self) -> dict[str, Any] | None: ...
    @property
    def runtime(self) -> Runtime: ...
    @property
    def state(self) -> StateBackend: ...
    @property
    def metrics(self) -> Metrics: ...
    @property
    def status(self) -> StatusBoard: ...


class Admin:
    def __init__(self, server: ServerView) -> None:
        self.server = server

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status_html)
        app.router.add_get("/status.json", self._status_json)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        server = self.server
        if server.ready and not server.draining:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n" if server.draining else "not ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def status_data(self) -> dict[str, Any]:
        """`/status.json`; docs/operations.md ("Status page") documents every field."""
        server = self.server
        board = server.status
        upstreams: dict[str, Any] = {}
        for name, rt in sorted(server.runtime.upstreams.items()):
            stages: dict[str, dict[str, Any]] = {}
            for stage in rt.pipeline.stages:
                snapshot: Callable[[], Coroutine[Any, Any, dict[str, Any]]] | None = getattr(stage, "snapshot", None)
                if snapshot is not None:
                    with contextlib.suppress(Exception):
                        stages[str(getattr(stage, "name", type(stage).__name__))] = await snapshot()
            snap = board.upstream_snapshot(name, stages)
            snap["target"] = safe_target(rt.policy.target)
            snap["provider"] = rt.policy.provider.name
            snap["stages"] = list(rt.pipeline.stage_names)
            upstreams[name] = snap
        state = server.state
        health = getattr(state, "health", None)
        try:
            health_text = scrub(str(health())) if callable(health) else "ok"
        except Exception as exc:
            health_text = f"unknown: {type(exc).__name__}"
        reload: dict[str, Any] = dict(server.last_reload or {})
        reload["problems"] = [scrub(str(p)) for p in reload.get("problems") or []]
        reload["time"] = board.reloads[-1]["time"] if board.reloads else round(board.started, 3)
        return {
            **board.clock_snapshot(),
            "policy_version": server.runtime.version,
            "last_reload": reload,
            "recent_reloads": list(reversed(board.reloads)),
            "ready": server.ready,
            "draining": server.draining,
            "in_flight": server.in_flight,
            "state_backend": {
                "name": state.name,
                "health": health_text,
                **board.backend_snapshot(),
                **self._records_snapshot(),
            },
            "upstreams": upstreams,
        }

    def _records_snapshot(self) -> dict[str, Any]:
        """Counts of claims refused and write-backs pending (Redis); never keys or values."""
        snapshot: Callable[[], dict[str, Any]] | None = getattr(self.server.state, "records_snapshot", None)
        if snapshot is None:
            return {}
        try:
            return {"records": snapshot()}
        except Exception as exc:
            return {"records": {"error": type(exc).__name__}}

    async def _status_json(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(await self.status_data(), default=str),
            content_type="application/json",
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def _status_html(self, request: web.Request) -> web.Response:
        return web.Response(
            text=render_html(await self.status_data()),
            content_type="text/html",
            headers={
                "Content-Security-Policy": STATUS_CSP,
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )
