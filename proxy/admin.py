"""The admin listener: /healthz, /readyz, /metrics, /status, /status.json, the outbox and
the stored webhooks (`/webhooks.json`, read only).

`/outbox.json` lists kept sends (GET; `?state=`, `?upstream=`, `?limit=`, or one entry
at `/outbox/ID`), `POST /outbox/ID/retry` and `POST /outbox/ID/drop` manage them
(`egressd outbox`). The POSTs need the header `X-Egressd-Admin: outbox`, which a browser
cannot send across sites (a form or an image on another page cannot reach them). The
admin listener has no authentication: keep it on loopback or behind a NetworkPolicy.

An aiohttp `Application` on its own port (`--admin`, loopback by default). It only reads
the server: the probes its `ready`/`draining` flags, /metrics the Prometheus registry
(proxy/observe/metrics.py), /status and /status.json one snapshot built by `status_data`
(docs/operations.md, "Status page", documents every field; proxy/observe/status.py
renders the page).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from aiohttp import web

from proxy.clock import Clock
from proxy.observe.metrics import Metrics
from proxy.observe.status import CSP as STATUS_CSP
from proxy.observe.status import StatusBoard, render_html, safe_target, scrub
from proxy.outbox.store import STATES, Entry, OutboxStore, OutboxUnavailable
from proxy.outbox.worker import OutboxWorker
from proxy.runtime import Runtime
from proxy.state.base import StateBackend
from proxy.webhooks.store import STATES as WEBHOOK_STATES
from proxy.webhooks.store import WebhooksUnavailable
from proxy.webhooks.worker import WebhookWorker

log = logging.getLogger("egressd.admin")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, default=str),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


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
    @property
    def clock(self) -> Clock: ...
    @property
    def outbox(self) -> OutboxWorker: ...
    @property
    def outbox_store(self) -> OutboxStore: ...
    @property
    def webhooks(self) -> WebhookWorker: ...


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
        app.router.add_get("/outbox.json", self._outbox_list)
        app.router.add_get("/outbox/{id}", self._outbox_get)
        app.router.add_post("/outbox/{id}/{action}", self._outbox_action)
        app.router.add_get("/webhooks.json", self._webhooks_list)
        return app

    # -- inbound webhooks (contract 7.5) ---------------------------------------------------
    async def _webhooks_list(self, request: web.Request) -> web.Response:
        """Stored webhook POSTs (`?state=`, `?upstream=`, `?limit=`): ids, event ids and types,
        delivery state; never headers or bodies (they carry the providers' signatures)."""
        state = request.query.get("state") or None
        if state is not None and state not in WEBHOOK_STATES:
            return _json({"error": f"unknown state {state!r}; one of {', '.join(WEBHOOK_STATES)}"}, 400)
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 10_000)
        except ValueError:
            return _json({"error": "limit must be a whole number"}, 400)
        upstream = request.query.get("upstream") or None
        try:
            await self.server.webhooks.refresh()
            entries = await self.server.webhooks.store.list(upstream=upstream, state=state, limit=limit)
        except WebhooksUnavailable as exc:
            return _json({"error": f"the webhook store cannot be read: {exc}"}, 503)
        listed = []
        for entry in entries:
            data = entry.summary()
            data["last_error"] = scrub(str(data["last_error"]))
            listed.append(data)
        return _json({**self.server.webhooks.snapshot(), "entries": listed})

    # -- the outbox (contract 7.6) -------------------------------------------------------
    def _entry_json(self, entry: Entry) -> dict[str, Any]:
        data = entry.summary()
        data["last_error"] = scrub(str(data["last_error"]))
        return data

    async def _outbox_list(self, request: web.Request) -> web.Response:
        state = request.query.get("state") or None
        if state is not None and state not in STATES:
            return _json({"error": f"unknown state {state!r}; one of {', '.join(STATES)}"}, 400)
        try:
            limit = min(max(int(request.query.get("limit", "100")), 1), 10_000)
        except ValueError:
            return _json({"error": "limit must be a whole number"}, 400)
        upstream = request.query.get("upstream") or None
        try:
            await self.server.outbox.refresh()
            entries = await self.server.outbox_store.list(upstream=upstream, state=state, limit=limit)
        except OutboxUnavailable as exc:
            return _json({"error": f"the outbox store cannot be read: {exc}"}, 503)
        return _json(
            {
                **self.server.outbox.snapshot(),
                "entries": [self._entry_json(e) for e in entries],
            }
        )

    async def _outbox_get(self, request: web.Request) -> web.Response:
        entry = await self.server.outbox_store.get(request.match_info["id"])
        if entry is None:
            return _json({"error": "no such outbox entry"}, 404)
        return _json(self._entry_json(entry))

    async def _outbox_action(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Egressd-Admin") != "outbox":
            return _json({"error": "send the header X-Egressd-Admin: outbox (egressd outbox does)"}, 403)
        entry_id, action = request.match_info["id"], request.match_info["action"]
        store = self.server.outbox_store
        entry = await store.get(entry_id)
        if entry is None:
            return _json({"error": "no such outbox entry"}, 404)
        if action == "retry":
            rt = self.server.runtime.get(entry.upstream)
            settings = rt.policy.outbox if rt is not None else None
            if settings is None:
                return _json({"error": f"upstream {entry.upstream} has no outbox policy loaded"}, 409)
            done = await store.retry(entry_id, self.server.clock.wall(), settings.max_age)
            if done is None:
                return _json(
                    {"error": f"only ambiguous or dead entries can be retried (this one is {entry.state})"}, 409
                )
            self.server.outbox.wake()
            log.warning("outbox entry put back in the queue by the operator", extra={"outbox_id": entry_id})
            return _json(self._entry_json(done))
        if action == "drop":
            dropped = await store.drop(entry_id)
            if dropped is None:
                return _json({"error": f"the entry is being delivered ({entry.state}); try again"}, 409)
            log.warning("outbox entry dropped by the operator", extra={"outbox_id": entry_id, "state": dropped.state})
            return _json({**self._entry_json(dropped), "dropped": True})
        return _json({"error": "unknown action: retry or drop"}, 404)

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
        outbox = server.outbox.snapshot()
        webhooks = server.webhooks.snapshot()
        upstreams: dict[str, Any] = {}
        for name, rt in sorted(server.runtime.upstreams.items()):
            stages: dict[str, dict[str, Any]] = {}
            for stage in rt.pipeline.stages:
                snapshot: Callable[[], Coroutine[Any, Any, dict[str, Any]]] | None = getattr(stage, "snapshot", None)
                if snapshot is not None:
                    with contextlib.suppress(Exception):
                        stages[str(getattr(stage, "name", type(stage).__name__))] = await snapshot()
            settings = rt.policy.pool
            pool: dict[str, Any] = {
                "min_warm": settings.min_warm,
                "max_idle": settings.max_idle if settings.max_idle is not None else rt.policy.limits.max_concurrency,
                "idle_timeout": settings.idle_timeout,
                "open": 0,
                "idle": 0,
                "in_use": 0,
                "opening": 0,
                "warm": 0,
                **(rt.transport.pool_stats() or {}),
            }
            pool["min_warm"] = settings.min_warm
            # Handshake counts come from the events (since start, across reloads) instead.
            pool.pop("handshakes", None)
            pool.pop("resumed", None)
            snap = board.upstream_snapshot(name, stages, pool)
            snap["target"] = safe_target(rt.policy.target)
            snap["provider"] = rt.policy.provider.name
            snap["stages"] = list(rt.pipeline.stage_names)
            if rt.policy.outbox is not None:
                snap["outbox"] = outbox["upstreams"].get(name, {})
            if rt.policy.webhooks is not None:
                # Received / delivered since this process started; pending / dead from the store.
                snap["webhooks"] = {**board.webhook_counts(name), **webhooks["upstreams"].get(name, {})}
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
            "outbox": outbox,
            "webhooks": webhooks,
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
