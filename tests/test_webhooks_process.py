"""Inbound webhooks with real `egressd run` processes: kill -9 while an event is stored but
not delivered (the app hangs on the delivery), then a restart on the same data dir
delivers it; `EGRESSD_WEBHOOK_LISTEN` turns the listener on. The app's endpoint runs in
the test's event loop and checks each delivery with stripe's SDK."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import stripe
from aiohttp import web

from tests.egressd_process import Egressd
from tests.redis_server import REPO_ROOT, free_port

WHSEC = "whsec_process_test_0123"


def signed(body: bytes) -> dict[str, str]:
    t = int(time.time())
    sig = hmac.new(WHSEC.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


def event(n: int) -> bytes:
    return json.dumps(
        {"id": f"evt_proc_{n}", "object": "event", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi"}}}
    ).encode()


async def wait_for(check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_kill9_between_store_and_delivery_then_restart_delivers(
    egressd_factory: Callable[..., Egressd], run_app: Any
) -> None:
    hang = asyncio.Event()
    arrived: list[str] = []
    delivered: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        got = stripe.Webhook.construct_event(body.decode(), request.headers["Stripe-Signature"], WHSEC)
        arrived.append(got["id"])
        if not hang.is_set():
            await asyncio.sleep(3600)  # the first process is killed while this delivery is in flight
        delivered.append(got["id"])
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hooks/stripe", hook)
    up = await run_app(app)
    port = free_port()
    doc = {
        "upstream": "stripe",
        "target": "http://127.0.0.1:9",
        "provider": "stripe",
        "webhooks": {"deliver_to": f"{up.url}/hooks/stripe", "secret": WHSEC},
    }
    proc = egressd_factory([doc], args=["--webhook-listen", f"127.0.0.1:{port}"])
    proc.start()
    async with aiohttp.ClientSession() as http:
        body = event(1)
        async with http.post(f"http://127.0.0.1:{port}/stripe", data=body, headers=signed(body)) as r:
            assert r.status == 200
        await wait_for(lambda: len(arrived) == 1, within=10)
        proc.signal(signal.SIGKILL)  # stored, claimed, being delivered: never answered
        proc.wait()
        hang.set()
        proc.start()  # same data dir: the dead process's claim is taken back
        await wait_for(lambda: len(delivered) == 1, within=20)
        assert delivered == ["evt_proc_1"]
        # The provider's redelivery after the restart is a duplicate (the ids are durable).
        async with http.post(f"http://127.0.0.1:{port}/stripe", data=body, headers=signed(body)) as r:
            assert r.status == 200 and (await r.text()).strip() == "duplicate"
        await asyncio.sleep(1.0)
        assert delivered == ["evt_proc_1"]


async def test_the_listener_is_off_by_default_and_on_with_the_env_var(tmp_path: Path, run_app: Any) -> None:
    got: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/h", hook)
    up = await run_app(app)
    policies = tmp_path / "policies"
    policies.mkdir()
    doc = {
        "upstream": "stripe",
        "target": "http://127.0.0.1:9",
        "provider": "stripe",
        "webhooks": {"deliver_to": f"{up.url}/h", "secret": WHSEC},
    }
    (policies / "p.yaml").write_text(json.dumps(doc))
    proc = Egressd(policies, data_dir=tmp_path / "data")
    try:
        proc.start()
        assert "--webhook-listen is not set" in proc.log()
    finally:
        proc.stop()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSD_")}
    env["EGRESSD_WEBHOOK_LISTEN"] = f"127.0.0.1:{port}"
    admin = free_port()
    cmd = [sys.executable, "-m", "proxy", "run", "--policies", str(policies), "--listen", f"127.0.0.1:{free_port()}"]
    cmd += ["--admin", f"127.0.0.1:{admin}", "--data-dir", str(tmp_path / "data2"), "--log-format", "text"]
    child = await asyncio.create_subprocess_exec(
        *cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    body = event(2)
                    async with http.post(f"http://127.0.0.1:{port}/stripe", data=body, headers=signed(body)) as r:
                        assert r.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and child.returncode is None
                    await asyncio.sleep(0.1)
        await wait_for(lambda: len(got) == 1, within=10)
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(child.communicate(), timeout=15)
    assert child.returncode == 0
    assert b"webhooks listening on 127.0.0.1:" in out
