"""Drain on shutdown and reloads: in-flight calls finish, state survives when settings don't change."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from tests.conftest import proxy_url


def slow_app(hits: list[str]) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        hits.append(request.path)
        await asyncio.sleep(float(request.query.get("s", "0.5")))
        return web.json_response({"ok": True})

    async def fail(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"error": "down"}, status=503)

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fail", fail)
    return app


async def test_sigterm_drain_finishes_in_flight_and_refuses_new(run_app: Any, start_proxy: Any) -> None:
    hits: list[str] = []
    up = await run_app(slow_app(hits))
    server = await start_proxy([{"upstream": "up", "target": up.url}], drain=5.0)
    base, admin = proxy_url(server), proxy_url(server, "admin")
    async with aiohttp.ClientSession() as s:
        in_flight = asyncio.create_task(s.get(base + "/up/slow?s=0.6"))
        await asyncio.sleep(0.2)
        drain = asyncio.create_task(server.drain_and_stop())
        await asyncio.sleep(0.1)
        async with s.get(admin + "/readyz") as resp:
            assert resp.status == 503
        resp = await in_flight
        assert resp.status == 200
        assert (await resp.json()) == {"ok": True}
        resp.release()
        await drain
    # After the drain nothing listens any more.
    async with aiohttp.ClientSession() as s:
        try:
            async with s.get(base + "/up/slow?s=0") as resp:
                raise AssertionError(f"still serving: {resp.status}")
        except aiohttp.ClientConnectionError:
            pass


async def test_reload_keeps_circuit_state_only_when_its_settings_are_unchanged(run_app: Any, start_proxy: Any) -> None:
    hits: list[str] = []
    up = await run_app(slow_app(hits))
    policy: dict[str, Any] = {
        "upstream": "up",
        "target": up.url,
        "circuit_breaker": {"window": "30s", "min_requests": 2, "failure_rate": 0.5, "open_for": "60s"},
    }
    server = await start_proxy([policy])
    base = proxy_url(server)
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(base + "/up/fail") as resp:
                assert resp.status == 503
        async with s.get(base + "/up/fail") as resp:
            assert resp.headers["X-Egressd-Error"] == "circuit_open"
        # An unrelated change (a header added) keeps the circuit open.
        policy["headers"] = {"add": {"X-Team": "payments"}}
        (server.settings.policies / "policies.yaml").write_text(yaml.safe_dump(policy))
        assert await server.reload("test")
        async with s.get(base + "/up/fail") as resp:
            assert resp.headers.get("X-Egressd-Error") == "circuit_open"
        # Changing the breaker's own settings starts a fresh circuit.
        policy["circuit_breaker"]["min_requests"] = 3
        (server.settings.policies / "policies.yaml").write_text(yaml.safe_dump(policy))
        assert await server.reload("test")
        async with s.get(base + "/up/fail") as resp:
            assert resp.status == 503 and "X-Egressd-Error" not in resp.headers
    assert len(hits) == 3


async def test_in_flight_call_finishes_under_its_old_policy(run_app: Any, start_proxy: Any) -> None:
    hits: list[str] = []
    up = await run_app(slow_app(hits))
    policy = {"upstream": "up", "target": up.url}
    server = await start_proxy([policy])
    base = proxy_url(server)
    async with aiohttp.ClientSession() as s:
        in_flight = asyncio.create_task(s.get(base + "/up/slow?s=0.5"))
        await asyncio.sleep(0.15)
        # The new set points the upstream elsewhere (a closed port) and drops nothing else.
        (server.settings.policies / "policies.yaml").write_text(
            yaml.safe_dump({"upstream": "up", "target": "http://127.0.0.1:9"})
        )
        assert await server.reload("test")
        resp = await in_flight
        assert resp.status == 200
        resp.release()
        async with s.get(base + "/up/slow?s=0") as resp:
            assert resp.status == 502  # the new policy applies to new calls


async def test_invalid_reload_keeps_old_set_and_counts_failure(run_app: Any, start_proxy: Any) -> None:
    hits: list[str] = []
    up = await run_app(slow_app(hits))
    server = await start_proxy([{"upstream": "up", "target": up.url}])
    (server.settings.policies / "policies.yaml").write_text("upstream: up\ntarget: [broken\n")
    assert not await server.reload("test")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(server) + "/up/slow?s=0") as resp:
            assert resp.status == 200
        async with s.get(proxy_url(server, "admin") + "/metrics") as resp:
            assert 'egressd_config_reloads_total{result="failure"} 1.0' in await resp.text()
        async with s.get(proxy_url(server, "admin") + "/status.json") as resp:
            assert (await resp.json())["last_reload"]["result"] == "failure"
