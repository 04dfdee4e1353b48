"""Inbound webhooks end to end (contract 7.5, 7.8): providers' POSTs over loopback to the
webhook listener, the app's endpoint verifying with the providers' official SDKs
(stripe.Webhook.construct_event, sendgrid EventWebhook, mailgun SecurityGuard), and the
translation of fallback events after a real failover through egressd and the fakes.
The stores (memory, data dir, Redis) share one suite at the end."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mailgun.security import SecurityGuard
from sendgrid import SendGridAPIClient
from sendgrid.helpers.eventwebhook import EventWebhook

from fakes import FakeServer
from fakes.paypal import PAYPAL_WEBHOOKS
from proxy.config.loader import load_policy_dir
from proxy.server import EgressServer, Settings
from proxy.stages.failover import ledger_key
from proxy.state.factory import open_data_dir
from proxy.state.sqlite import _LOCAL_INSTANCES, SQLiteState
from proxy.webhooks.store import (
    KEEP_DEAD,
    KEEP_DONE,
    MemoryWebhookStore,
    WebhookEntry,
    WebhookStats,
    WebhookStore,
    new_id,
)
from tests.conftest import proxy_url, write_policies

stripe.enable_telemetry = False

WHSEC = "whsec_test_webhooks_0123456789"
MG_KEY = "key-mailgun-webhook-signing-0123"


# ---- the pieces ------------------------------------------------------------------------------


class AppEndpoint:
    """The app's webhook endpoint: checks each delivery with `check` (the provider's SDK)
    and answers the next of `statuses` (then 200)."""

    def __init__(self, check: Callable[[bytes, Any], Any] | None = None, statuses: tuple[int, ...] = ()) -> None:
        self.check = check
        self.statuses = list(statuses)
        self.deliveries: list[tuple[dict[str, str], bytes, Any]] = []  # verified ones
        self.refused = 0
        self.hits = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        if status != 200:
            return web.Response(status=status, text="not now")
        try:
            verified = self.check(body, request.headers) if self.check else None
        except Exception as exc:  # the SDK refused it
            self.refused += 1
            return web.Response(status=400, text=f"{type(exc).__name__}")
        self.deliveries.append((dict(request.headers), body, verified))
        return web.Response(text="ok")


async def serve_endpoints(run_app: Any, **endpoints: AppEndpoint) -> str:
    app = web.Application()
    for name, ep in endpoints.items():
        app.router.add_post(f"/hooks/{name}", ep.handle)
    up = await run_app(app)
    return str(up.url)


@pytest.fixture
async def start_hooks(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[EgressServer]]]:
    servers: list[EgressServer] = []

    async def start(
        docs: list[dict[str, Any]], *, data_dir: Path | None = None, redis_url: str | None = None
    ) -> EgressServer:
        directory = write_policies(tmp_path / f"policies{len(servers)}", docs)
        settings = Settings(
            policies=directory,
            listen=("127.0.0.1", 0),
            admin=("127.0.0.1", 0),
            webhook_listen=("127.0.0.1", 0),
            drain=1.0,
            watch_interval=0.2,
        )
        state: Any = open_data_dir(data_dir) if data_dir is not None else None
        if redis_url is not None:
            from proxy.state.resilient import open_shared_state

            state = open_shared_state(redis_url, prefix=f"wh-{uuid.uuid4().hex[:8]}:", fallback=state)
        server = EgressServer(settings, **({"state": state} if state is not None else {}))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def hook_url(server: EgressServer, path: str) -> str:
    host, port = server.addresses["webhooks"]
    return f"http://{host}:{port}{path}"


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers=headers or {}) as r:
            return r.status, (await r.text()).strip()


async def until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def stored(server: EgressServer) -> list[WebhookEntry]:
    return await server.webhook_store.list()


# ---- Stripe -----------------------------------------------------------------------------------


def stripe_signed(body: bytes, secret: str = WHSEC, t: int | None = None) -> dict[str, str]:
    """What Stripe sends (providers.md 1.11): t and the hex HMAC-SHA256 of "t.body"."""
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json; charset=utf-8"}


def stripe_event(event_id: str = "evt_1TestWebhooks", kind: str = "payment_intent.succeeded") -> bytes:
    # Pretty-printed like Stripe's own bodies: the bytes must reach the app unchanged.
    event = {
        "id": event_id,
        "object": "event",
        "api_version": "2026-06-24.dahlia",
        "created": 1_800_000_000,
        "data": {"object": {"id": "pi_3Abc", "object": "payment_intent", "amount": 2000, "status": "succeeded"}},
        "livemode": False,
        "type": kind,
    }
    return json.dumps(event, indent=2).encode()


def stripe_check(body: bytes, headers: Any) -> Any:
    return stripe.Webhook.construct_event(body.decode(), headers["Stripe-Signature"], WHSEC)


def stripe_doc(deliver_to: str, target: str = "http://127.0.0.1:9", **hooks: Any) -> dict[str, Any]:
    return {
        "upstream": "stripe",
        "target": target,
        "provider": "stripe",
        "webhooks": {"deliver_to": deliver_to, "secret": WHSEC, **hooks},
    }


async def test_stripe_event_is_delivered_byte_for_byte_once(start_hooks: Any, run_app: Any) -> None:
    app = AppEndpoint(stripe_check)
    base = await serve_endpoints(run_app, stripe=app)
    server = await start_hooks([stripe_doc(base + "/hooks/stripe")])
    body = stripe_event()
    headers = {**stripe_signed(body), "X-Custom": "kept", "X-Egressd-Translated-From": "forged"}
    assert await post(hook_url(server, "/stripe"), body, headers) == (200, "ok")
    await until(lambda: len(app.deliveries) == 1)
    got_headers, got_body, event = app.deliveries[0]
    assert got_body == body and event["id"] == "evt_1TestWebhooks"
    assert got_headers["X-Custom"] == "kept" and got_headers["Content-Type"] == "application/json; charset=utf-8"
    assert got_headers["X-Egressd-Webhook-Id"].startswith("wh_")
    assert got_headers["X-Egressd-Delivery-Attempt"] == "1"
    assert "X-Egressd-Translated-From" not in got_headers  # a sender cannot forge egressd's headers
    # The provider's redelivery (same event id), even under a path below /stripe: 200, not delivered again.
    assert await post(hook_url(server, "/stripe/events"), body, stripe_signed(body)) == (200, "duplicate")
    await asyncio.sleep(0.6)
    assert len(app.deliveries) == 1
    snap = (await server.status_data())["upstreams"]["stripe"]["webhooks"]
    assert (snap["received"], snap["delivered"], snap["duplicate"], snap["pending"]) == (1, 1, 1, 0)
    metrics = server.metrics.render().decode()
    assert 'egressd_webhooks_total{result="duplicate",upstream="stripe"} 1.0' in metrics
    assert 'egressd_webhooks_total{result="delivered",upstream="stripe"} 1.0' in metrics
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy_url(server, "admin") + "/webhooks.json") as r:
            listed = await r.json()
        async with http.get(proxy_url(server, "admin") + "/status") as r:
            page = await r.text()
    (only,) = listed["entries"]
    assert only["state"] == "delivered" and only["event_ids"] == ["evt_1TestWebhooks"] and "body" not in only
    assert listed["store"] == "memory" and listed["upstreams"]["stripe"]["pending"] == 0
    assert "webhooks received / delivered" in page and WHSEC not in page


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", "bad_signature"),
        ("wrong_secret", "bad_signature"),
        ("old", "timestamp_outside_tolerance"),
        ("missing", "missing_signature"),
        ("garbage", "malformed_signature"),
    ],
)
async def test_bad_stripe_signatures_get_400_and_nothing_is_stored(
    start_hooks: Any, run_app: Any, case: str, reason: str
) -> None:
    app = AppEndpoint(stripe_check)
    base = await serve_endpoints(run_app, stripe=app)
    server = await start_hooks([stripe_doc(base + "/hooks/stripe")])
    body = stripe_event()
    headers = stripe_signed(body)
    if case == "tampered":
        body = body.replace(b"2000", b"9000")
    elif case == "wrong_secret":
        headers = stripe_signed(body, secret="whsec_other")
    elif case == "old":
        headers = stripe_signed(body, t=int(time.time()) - 301)
    elif case == "missing":
        headers = {"Content-Type": "application/json"}
    elif case == "garbage":
        headers = {"Stripe-Signature": "nonsense"}
    assert await post(hook_url(server, "/stripe"), body, headers) == (400, reason)
    await asyncio.sleep(0.3)
    assert await stored(server) == [] and app.hits == 0
    assert (await server.status_data())["upstreams"]["stripe"]["webhooks"]["rejected"] == 1


async def test_app_down_then_up_gets_it_once_with_a_fresh_signature(start_hooks: Any, run_app: Any) -> None:
    app = AppEndpoint(stripe_check, statuses=(503, 500))
    base = await serve_endpoints(run_app, stripe=app)
    # egressd takes signatures up to an hour old; the app's SDK only 5 minutes (7.8).
    server = await start_hooks([stripe_doc(base + "/hooks/stripe", tolerance="1h")])
    body = stripe_event()
    old = stripe_signed(body, t=int(time.time()) - 1800)
    assert await post(hook_url(server, "/stripe"), body, old) == (200, "ok")
    await until(lambda: len(app.deliveries) == 1, within=15)
    headers, got, _ = app.deliveries[0]
    assert got == body and app.hits == 3 and app.refused == 0
    assert headers["X-Egressd-Delivery-Attempt"] == "3"
    assert headers["Stripe-Signature"] != old["Stripe-Signature"]
    await asyncio.sleep(0.5)
    assert len(app.deliveries) == 1
    counts = (await server.status_data())["upstreams"]["stripe"]["webhooks"]
    assert counts["retried"] == 2 and counts["delivered"] == 1


async def test_oversized_body_is_413_and_not_stored(start_hooks: Any, run_app: Any) -> None:
    app = AppEndpoint(stripe_check)
    base = await serve_endpoints(run_app, stripe=app)
    doc = stripe_doc(base + "/hooks/stripe")
    doc["limits"] = {"max_body": "1KiB"}
    server = await start_hooks([doc])
    body = stripe_event().replace(b'"livemode"', b'"pad": "' + b"x" * 2048 + b'", "livemode"')
    assert (await post(hook_url(server, "/stripe"), body, stripe_signed(body)))[0] == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(4):
            yield b"x" * 512

    async with aiohttp.ClientSession() as http:
        async with http.post(hook_url(server, "/stripe"), data=chunks(), headers=stripe_signed(b"")) as r:
            assert r.status == 413
    assert await stored(server) == [] and app.hits == 0


async def test_the_listener_never_forwards_anywhere_but_a_deliver_to(start_hooks: Any, run_app: Any) -> None:
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(text="{}")

    target_app = web.Application()
    target_app.router.add_route("*", "/{tail:.*}", anything)
    target = await run_app(target_app)
    app = AppEndpoint(stripe_check)
    base = await serve_endpoints(run_app, stripe=app)
    plain = {"upstream": "plain", "target": target.url}
    server = await start_hooks([stripe_doc(base + "/hooks/stripe", target=target.url), plain])
    async with aiohttp.ClientSession() as http:
        for method, path, status in [
            ("POST", "/plain", 404),  # an upstream without a webhooks block
            ("POST", "/plain/v1/charges", 404),
            ("POST", "/unknown", 404),
            ("POST", "/", 404),
            ("GET", "/status", 404),
            ("GET", "/metrics", 404),
            ("GET", "/stripe", 405),
            ("PUT", "/stripe/v1/charges", 405),
            ("POST", "/stripe/../plain", 404),
            ("POST", "/Stripe", 404),
        ]:
            async with http.request(method, hook_url(server, path), data=b"{}") as r:
                assert r.status == status, (method, path, r.status)
    # An absolute-form request line (a forward-proxy request) is no route either.
    host, port = server.addresses["webhooks"]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {target.url}/v1/charges HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}".encode())
    await writer.drain()
    line = await reader.readline()
    writer.close()
    assert b" 404 " in line
    # A valid POST is stored and delivered to deliver_to only.
    body = stripe_event()
    assert await post(hook_url(server, "/stripe"), body, stripe_signed(body)) == (200, "ok")
    await until(lambda: len(app.deliveries) == 1)
    await asyncio.sleep(0.3)
    assert seen == []  # the upstreams' targets never saw a request


async def test_each_part_answered_2xx_is_stored_before_the_next_part_is_sent(
    start_hooks: Any, run_app: Any, tmp_path: Path
) -> None:
    """An entry of several parts (a batch whose events go to two endpoints after a failover)
    stores each part as done once it is answered 2xx: a process killed while a later part is
    in flight does not send the earlier ones again after its restart."""
    first, second = AppEndpoint(stripe_check), AppEndpoint(stripe_check)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return await second.handle(request)

    app = web.Application()
    app.router.add_post("/hooks/first", first.handle)
    app.router.add_post("/hooks/second", slow)
    base = str((await run_app(app)).url)
    server = await start_hooks([stripe_doc(base + "/hooks/first")], data_dir=tmp_path / "data")
    worker = server.webhooks
    one_part = worker.plan

    async def two_parts(rt: Any, entry: WebhookEntry) -> Any:
        plan = await one_part(rt, entry)
        plan.parts.append(dataclasses.replace(plan.parts[0], key="t:evt_second", url=base + "/hooks/second"))
        return plan

    worker.plan = two_parts  # type: ignore[method-assign]
    body = stripe_event()
    assert await post(hook_url(server, "/stripe"), body, stripe_signed(body)) == (200, "ok")
    await asyncio.wait_for(arrived.wait(), 10)
    [held] = await stored(server)
    assert (held.state, held.done, len(first.deliveries)) == ("claimed", ["own"], 1)
    release.set()
    await until(lambda: len(second.deliveries) == 1)
    for _ in range(100):
        [done] = await stored(server)
        if done.state == "delivered":
            break
        await asyncio.sleep(0.05)
    assert (done.state, done.done, len(first.deliveries)) == ("delivered", ["own", "t:evt_second"], 1)


# ---- SendGrid and Mailgun, as received ---------------------------------------------------------


def p256() -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key, base64.b64encode(der).decode(), pem


def sendgrid_signed(key: ec.EllipticCurvePrivateKey, body: bytes, ts: int | None = None) -> dict[str, str]:
    """What SendGrid sends (providers.md 4.8): ECDSA P-256 over timestamp + body."""
    stamp = str(int(time.time()) if ts is None else ts)
    sig = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
        "Content-Type": "application/json",
    }


def sendgrid_events(*ids: str) -> bytes:
    items = [
        {
            "email": "ann@example.org",
            "timestamp": 1_800_000_000,
            "event": "delivered",
            "sg_event_id": i,
            "sg_message_id": f"msg-{i}.filter0001.1.0",
            "response": "250 OK",
        }
        for i in ids
    ]
    return json.dumps(items, indent=1).encode()


def sendgrid_checker(public_key: str) -> Callable[[bytes, Any], Any]:
    def check(body: bytes, headers: Any) -> Any:
        ok = EventWebhook(public_key).verify_signature(
            body.decode(),
            headers["X-Twilio-Email-Event-Webhook-Signature"],
            headers["X-Twilio-Email-Event-Webhook-Timestamp"],
        )
        if not ok:
            raise ValueError("bad signature")
        return json.loads(body)

    return check


async def test_sendgrid_batches_as_signed_by_sendgrid_and_partial_repeats(start_hooks: Any, run_app: Any) -> None:
    sendgrid_key, sendgrid_public, _ = p256()
    app = AppEndpoint(sendgrid_checker(sendgrid_public))
    base = await serve_endpoints(run_app, sendgrid=app)
    doc = {
        "upstream": "sendgrid",
        "target": "http://127.0.0.1:9",
        "provider": "sendgrid",
        "webhooks": {"deliver_to": base + "/hooks/sendgrid", "public_key": sendgrid_public},
    }
    server = await start_hooks([doc])
    body = sendgrid_events("sg-1", "sg-2")
    assert await post(hook_url(server, "/sendgrid"), body, sendgrid_signed(sendgrid_key, body)) == (200, "ok")
    await until(lambda: len(app.deliveries) == 1)
    assert app.deliveries[0][1] == body  # as SendGrid signed it: no signing_key, so as received
    # A batch repeating sg-2 with a new sg-3: without a signing_key egressd cannot sign a
    # smaller batch, so the app gets SendGrid's own (and sees sg-2 again, by its id).
    again = sendgrid_events("sg-2", "sg-3")
    assert await post(hook_url(server, "/sendgrid"), again, sendgrid_signed(sendgrid_key, again)) == (200, "ok")
    await until(lambda: len(app.deliveries) == 2)
    assert app.deliveries[1][1] == again
    tampered = body.replace(b"250 OK", b"550 NO")
    assert (await post(hook_url(server, "/sendgrid"), tampered, sendgrid_signed(sendgrid_key, body)))[0] == 400
    counts = (await server.status_data())["upstreams"]["sendgrid"]["webhooks"]
    assert (counts["received"], counts["duplicate"], counts["rejected"]) == (3, 1, 1)


async def test_sendgrid_with_a_signing_key_delivers_only_new_events_signed_by_egressd(
    start_hooks: Any, run_app: Any
) -> None:
    sendgrid_key, sendgrid_public, _ = p256()
    _, egressd_public, egressd_pem = p256()
    app = AppEndpoint(sendgrid_checker(egressd_public))
    base = await serve_endpoints(run_app, sendgrid=app)
    doc = {
        "upstream": "sendgrid",
        "target": "http://127.0.0.1:9",
        "provider": "sendgrid",
        "webhooks": {
            "deliver_to": base + "/hooks/sendgrid",
            "public_key": sendgrid_public,
            "signing_key": egressd_pem,
        },
    }
    server = await start_hooks([doc])
    first = sendgrid_events("sg-1")
    assert await post(hook_url(server, "/sendgrid"), first, sendgrid_signed(sendgrid_key, first)) == (200, "ok")
    mixed = sendgrid_events("sg-1", "sg-9")
    assert await post(hook_url(server, "/sendgrid"), mixed, sendgrid_signed(sendgrid_key, mixed)) == (200, "ok")
    await until(lambda: len(app.deliveries) == 2)
    ids = sorted(e["sg_event_id"] for _, _, events in app.deliveries for e in events)
    assert ids == ["sg-1", "sg-9"] and app.refused == 0


def mailgun_body(event_data: dict[str, Any], *, key: str = MG_KEY, ts: int | None = None) -> bytes:
    stamp = str(int(time.time()) if ts is None else ts)
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    sig = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    return json.dumps(
        {"signature": {"timestamp": stamp, "token": token, "signature": sig}, "event-data": event_data}, indent=2
    ).encode()


def mailgun_check(body: bytes, headers: Any) -> Any:
    payload = json.loads(body)
    sig = payload["signature"]
    if not SecurityGuard.verify_webhook(MG_KEY, sig["token"], sig["timestamp"], sig["signature"]):
        raise ValueError("bad signature")
    return payload


def mailgun_event(event_id: str, message_id: str, kind: str = "delivered", **extra: Any) -> dict[str, Any]:
    return {
        "id": event_id,
        "timestamp": time.time(),
        "log-level": "info",
        "event": kind,
        "recipient": "ann@example.org",
        "recipient-domain": "example.org",
        "tags": ["receipts"],
        "message": {"headers": {"message-id": message_id, "to": "ann@example.org"}},
        "user-variables": {"order_id": "42"},
        "delivery-status": {"code": 250, "message": "OK", "description": "", "attempt-no": 1},
        **extra,
    }


async def test_mailgun_event_resigned_for_the_app(start_hooks: Any, run_app: Any) -> None:
    app = AppEndpoint(mailgun_check, statuses=(502,))
    base = await serve_endpoints(run_app, mailgun=app)
    doc = {
        "upstream": "mailgun",
        "target": "http://127.0.0.1:9",
        "provider": {"name": "mailgun", "domain": "mg.example.com"},
        "webhooks": {"deliver_to": base + "/hooks/mailgun", "secret": MG_KEY, "tolerance": "1h"},
    }
    server = await start_hooks([doc])
    body = mailgun_body(mailgun_event("mg-ev-1", "m1@mg.example.com"), ts=int(time.time()) - 1200)
    assert await post(hook_url(server, "/mailgun"), body, {"Content-Type": "application/json"}) == (200, "ok")
    await until(lambda: len(app.deliveries) == 1, within=10)
    _, _, payload = app.deliveries[0]
    # Only the signature object changed (a fresh timestamp the SDK's 15-minute check takes).
    assert payload["event-data"] == json.loads(body)["event-data"]
    assert int(payload["signature"]["timestamp"]) >= int(time.time()) - 60
    forged = mailgun_body(mailgun_event("mg-ev-2", "m2@mg.example.com"), key="key-not-mailgun")
    assert await post(hook_url(server, "/mailgun"), forged) == (400, "bad_signature")
    assert await post(hook_url(server, "/mailgun"), b"not json") == (400, "malformed_body")


# ---- translation after failover ---------------------------------------------------------------


def paypal_doc(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": "paypal",
        "target": url,
        "provider": "paypal",
        "auth": {
            "oauth_client_credentials": {
                "token_url": url + "/v1/oauth2/token",
                "client_id": "client-id-123",
                "client_secret": "secret-456",
            }
        },
        "retry": {"attempts": 2, "backoff": {"initial": "5ms", "max": "10ms"}},
        "idempotency": {"header": "PayPal-Request-Id", "generate": False},
        **extra,
    }


def capture_event(event_id: str, capture_id: str, order_id: str, kind: str = "PAYMENT.CAPTURE.COMPLETED") -> Any:
    return {
        "id": event_id,
        "event_version": "1.0",
        "create_time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "resource_type": "capture",
        "resource_version": "2.0",
        "event_type": kind,
        "summary": "Payment completed for $ 20.00 USD",
        "resource": {
            "id": capture_id,
            "status": "COMPLETED" if kind == "PAYMENT.CAPTURE.COMPLETED" else "DECLINED",
            "amount": {"currency_code": "USD", "value": "20.00"},
            "final_capture": True,
            "supplementary_data": {"related_ids": {"order_id": order_id}},
            "links": [{"href": f"https://api.sandbox.paypal.com/v2/checkout/orders/{order_id}", "rel": "up"}],
        },
    }


async def test_paypal_capture_after_a_stripe_failover_reaches_the_stripe_endpoint_as_stripe(
    start_hooks: Any, run_app: Any
) -> None:
    stripe_fake, paypal_fake = FakeServer("stripe"), FakeServer("paypal", webhook_id="WH-ID-123")
    # The fake PayPal signs events as PayPal does and serves verify-webhook-signature.
    paypal_hooks = paypal_fake.app[PAYPAL_WEBHOOKS]
    await stripe_fake.start()
    await paypal_fake.start()
    try:
        app = AppEndpoint(stripe_check)
        base = await serve_endpoints(run_app, stripe=app)
        sdoc = stripe_doc(base + "/hooks/stripe", target=stripe_fake.url)
        sdoc.update(
            {
                "retry": {"attempts": 1},
                "idempotency": {"replay_ttl": "24h"},
                "failover": [
                    {"to": "paypal", "on": ["connect_error"], "crosswalk": {"payment_methods": {"pm_card_visa": "V1"}}}
                ],
            }
        )
        # PayPal's own events (not about failed-over payments) have no deliver_to: dropped.
        pdoc = paypal_doc(paypal_fake.url, webhooks={"webhook_id": "WH-ID-123"})
        server = await start_hooks([sdoc, pdoc])
        await stripe_fake.stop()  # Stripe down: the payment fails over to PayPal
        sc = stripe.StripeClient("sk_test_123", base_addresses={"api": proxy_url(server) + "/stripe"})
        pi = await asyncio.to_thread(
            sc.v1.payment_intents.create,
            params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
        )
        assert pi.id.startswith("pi_ppf_") and pi.status == "succeeded"
        raw = await server.state.ledger_get(ledger_key("stripe", pi.id))
        assert raw is not None
        record = json.loads(raw)

        body, headers = paypal_hooks.signed(capture_event("WH-1AB", record["capture_id"], record["order_id"]))
        assert await post(hook_url(server, "/paypal"), body, headers) == (200, "ok")
        await until(lambda: len(app.deliveries) == 1)
        got_headers, _, event = app.deliveries[0]
        assert event["type"] == "payment_intent.succeeded" and event["id"].startswith("evt_ppf_")
        assert event["data"]["object"]["id"] == pi.id and event["data"]["object"]["amount"] == 2000
        assert got_headers["X-Egressd-Translated-From"] == "paypal"
        assert paypal_hooks.verifications == 1
        # PayPal redelivers: the same event id is not delivered again.
        assert await post(hook_url(server, "/paypal"), body, headers) == (200, "duplicate")
        # A forged event (signed by someone else) is refused by PayPal's verify API.
        forged_body, forged = paypal_hooks.signed(capture_event("WH-2CD", "CAP9", "ORDER9"))
        forged["PAYPAL-TRANSMISSION-SIG"] = base64.b64encode(b"x" * 256).decode()
        assert await post(hook_url(server, "/paypal"), forged_body, forged) == (400, "bad_signature")
        # An event about a payment no failover made: no translation, no deliver_to: dropped.
        other, other_headers = paypal_hooks.signed(capture_event("WH-3EF", "CAP7", "ORDER7"))
        assert await post(hook_url(server, "/paypal"), other, other_headers) == (200, "ok")
        # PayPal's verify API away: 503, so that PayPal sends it again later.
        paypal_fake.faults.status(503, path="/v1/notifications/")
        later, later_headers = paypal_hooks.signed(capture_event("WH-4GH", "CAP8", "ORDER8"))
        status, _ = await post(hook_url(server, "/paypal"), later, later_headers)
        assert status == 503
        await asyncio.sleep(0.6)
        assert len(app.deliveries) == 1
        counts = (await server.status_data())["upstreams"]["paypal"]["webhooks"]
        assert (counts["translated"], counts["dropped"], counts["duplicate"], counts["rejected"]) == (1, 1, 1, 1)
    finally:
        await stripe_fake.stop()
        await paypal_fake.stop()


async def test_mailgun_events_for_mail_failed_over_from_sendgrid_reach_the_sendgrid_endpoint(
    start_hooks: Any, run_app: Any
) -> None:
    sg_fake, mg_fake = FakeServer("sendgrid"), FakeServer("mailgun")
    await mg_fake.start()
    try:
        _, sendgrid_public, _ = p256()
        _, egressd_public, egressd_pem = p256()
        app = AppEndpoint(sendgrid_checker(egressd_public))
        base = await serve_endpoints(run_app, sendgrid=app)
        sg = {
            "upstream": "sendgrid",
            "target": "http://127.0.0.1:9",  # SendGrid down: connection refused
            "provider": "sendgrid",
            "retry": {"attempts": 1},
            "failover": [{"to": "mailgun", "on": ["connect_error"]}],
            "webhooks": {
                "deliver_to": base + "/hooks/sendgrid",
                "public_key": sendgrid_public,
                "signing_key": egressd_pem,
            },
        }
        mg = {
            "upstream": "mailgun",
            "target": mg_fake.url,
            "provider": {"name": "mailgun", "domain": "mg.example.com"},
            "auth": {"basic": {"username": "api", "password": "key-proxy"}},
            "webhooks": {"secret": MG_KEY},  # a fallback: its translated events go to SendGrid's endpoint
        }
        server = await start_hooks([sg, mg])
        client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
        mail = {
            "personalizations": [{"to": [{"email": "ann@example.org"}]}],
            "from": {"email": "shop@example.com"},
            "subject": "Your order",
            "content": [{"type": "text/plain", "value": "Thanks"}],
            "custom_args": {"order_id": "42"},
        }
        resp = await asyncio.to_thread(client.client.mail.send.post, request_body=mail)
        assert resp.status_code == 202 and resp.headers["X-Egressd-Upstream"] == "mailgun"
        message_id = resp.headers["X-Message-Id"]

        event = mailgun_event("mg-ev-delivered", message_id)
        assert await post(hook_url(server, "/mailgun"), mailgun_body(event)) == (200, "ok")
        await until(lambda: len(app.deliveries) == 1)
        headers, _, events = app.deliveries[0]
        (item,) = events
        assert item["event"] == "delivered" and item["sg_message_id"] == message_id
        assert item["order_id"] == "42" and item["email"] == "ann@example.org"
        assert headers["X-Egressd-Translated-From"] == "mailgun"
        bounce = mailgun_event("mg-ev-bounce", message_id, "failed", severity="permanent", reason="bounce")
        assert await post(hook_url(server, "/mailgun"), mailgun_body(bounce)) == (200, "ok")
        await until(lambda: len(app.deliveries) == 2)
        assert app.deliveries[1][2][0]["event"] == "bounce"
    finally:
        await sg_fake.stop()
        await mg_fake.stop()


async def test_outbox_sends_failed_over_translate_to_the_outbox_id(start_hooks: Any, run_app: Any) -> None:
    mg_fake = FakeServer("mailgun")
    await mg_fake.start()
    try:
        _, egressd_public, egressd_pem = p256()
        app = AppEndpoint(sendgrid_checker(egressd_public))
        base = await serve_endpoints(run_app, sendgrid=app)
        sg = {
            "upstream": "sendgrid",
            "target": "http://127.0.0.1:9",
            "provider": "sendgrid",
            "retry": {"attempts": 1},
            "outbox": {"when": "always"},
            "failover": [{"to": "mailgun", "on": ["connect_error"]}],
            "webhooks": {"deliver_to": base + "/hooks/sendgrid", "public_key": p256()[1], "signing_key": egressd_pem},
        }
        mg = {
            "upstream": "mailgun",
            "target": mg_fake.url,
            "provider": {"name": "mailgun", "domain": "mg.example.com"},
            "auth": {"basic": {"username": "api", "password": "key-proxy"}},
            "webhooks": {"secret": MG_KEY},
        }
        server = await start_hooks([sg, mg])
        mail = {
            "personalizations": [{"to": [{"email": "ann@example.org"}]}],
            "from": {"email": "shop@example.com"},
            "subject": "Later",
            "content": [{"type": "text/plain", "value": "Thanks"}],
        }
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy_url(server) + "/sendgrid/v3/mail/send", json=mail) as r:
                assert r.status == 202
                outbox_id = r.headers["X-Message-Id"]
        await until(lambda: mg_fake.ledger.count("message.queued") == 1)
        queued = mg_fake.ledger.effects("message.queued")[0]
        assert queued.data["fields"]["v:egressd_outbox_id"] == [outbox_id]
        event = mailgun_event(
            "mg-ev-ob", str(queued.object_id).strip("<>"), **{"user-variables": {"egressd_outbox_id": outbox_id}}
        )
        assert await post(hook_url(server, "/mailgun"), mailgun_body(event)) == (200, "ok")
        await until(lambda: len(app.deliveries) == 1)
        assert app.deliveries[0][2][0]["sg_message_id"] == outbox_id
    finally:
        await mg_fake.stop()


# ---- durability in the data dir -----------------------------------------------------------------


async def test_stored_event_survives_a_restart_with_the_data_dir(
    start_hooks: Any, run_app: Any, tmp_path: Path
) -> None:
    app = AppEndpoint(stripe_check, statuses=(503,) * 100)
    base = await serve_endpoints(run_app, stripe=app)
    data = tmp_path / "data"
    first = await start_hooks([stripe_doc(base + "/hooks/stripe")], data_dir=data)
    body = stripe_event()
    assert await post(hook_url(first, "/stripe"), body, stripe_signed(body)) == (200, "ok")
    await until(lambda: app.hits >= 1)
    await first.stop()
    app.statuses.clear()
    second = await start_hooks([stripe_doc(base + "/hooks/stripe")], data_dir=data)
    await until(lambda: len(app.deliveries) == 1, within=15)
    # The ids are in the data dir too: a redelivery after the restart is a duplicate.
    assert await post(hook_url(second, "/stripe"), body, stripe_signed(body)) == (200, "duplicate")


async def test_with_redis_every_replica_shares_the_ids_and_the_queue(
    start_hooks: Any, run_app: Any, redis_server: Any
) -> None:
    app = AppEndpoint(stripe_check, statuses=(503,))
    base = await serve_endpoints(run_app, stripe=app)
    server = await start_hooks([stripe_doc(base + "/hooks/stripe")], redis_url=redis_server.url)
    assert server.webhook_store.name == "redis"
    body = stripe_event("evt_redis_1")
    assert await post(hook_url(server, "/stripe"), body, stripe_signed(body)) == (200, "ok")
    assert await post(hook_url(server, "/stripe"), body, stripe_signed(body)) == (200, "duplicate")
    await until(lambda: len(app.deliveries) == 1, within=10)
    assert app.deliveries[0][1] == body and app.hits == 2


# ---- egressd check --------------------------------------------------------------------------------


LOOP = "http://127.0.0.1:1/h"


def policy(provider: str, **hooks: Any) -> dict[str, Any]:
    return {"upstream": "u", "target": "https://api.example.com", "provider": provider, "webhooks": hooks}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (policy("generic", deliver_to=LOOP), "provider generic has no webhook support"),
        (policy("stripe", deliver_to=LOOP), "webhooks.secret: required for Stripe webhooks"),
        (policy("mailgun", deliver_to=LOOP), "webhooks.secret: required for Mailgun webhooks"),
        (policy("sendgrid", deliver_to=LOOP), "webhooks.public_key: required for SendGrid webhooks"),
        (policy("paypal", deliver_to=LOOP), "webhooks.webhook_id: required for PayPal webhooks"),
        (
            policy("paypal", deliver_to=LOOP, webhook_id="WH-1"),
            "PayPal webhooks are verified with PayPal's verify-webhook-signature API",
        ),
        (policy("stripe", secret="whsec_x"), "webhooks.deliver_to: required"),
        (policy("stripe", deliver_to="ftp://app/h", secret="x"), "must be an absolute http:// or https:// URL"),
        (policy("sendgrid", deliver_to=LOOP, public_key="bm90IGEga2V5"), "public_key is not a base64 DER"),
    ],
)
def test_check_refuses_webhooks_that_could_never_verify(tmp_path: Path, doc: dict[str, Any], message: str) -> None:
    result = load_policy_dir(write_policies(tmp_path / "p", [doc]), secrets="lenient")
    assert not result.ok
    assert any(message in str(p) for p in result.errors), [str(p) for p in result.problems]


def test_check_warns_for_a_deliver_to_off_loopback(tmp_path: Path) -> None:
    doc = {"upstream": "s", "target": "https://x", "provider": "stripe"}
    doc["webhooks"] = {"deliver_to": "http://app.shop.svc:3000/hooks", "secret": "whsec_x"}
    result = load_policy_dir(write_policies(tmp_path / "p", [doc]), secrets="lenient")
    assert result.ok and any("off this host" in str(p) for p in result.warnings)


# ---- the stores, one suite -----------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[str], WebhookStore]]:
    """A store per call; with the same argument, stores that share their data (two processes)."""
    closing: list[Any] = []
    if request.param == "memory":
        shared = MemoryWebhookStore()
        yield lambda instance: shared
        return
    if request.param == "sqlite":
        from proxy.webhooks.sqlite_store import SQLiteWebhookStore

        (tmp_path / "data").mkdir()

        def sqlite(instance: str) -> WebhookStore:
            state = SQLiteState(tmp_path / "data")
            closing.append(state)
            return SQLiteWebhookStore(state)

        yield sqlite
        for state in closing:
            await state.close()
        return
    from proxy.state.redis import RedisState
    from proxy.webhooks.redis_store import RedisWebhookStore

    url = request.getfixturevalue("redis_server").url
    prefix = f"test-{uuid.uuid4().hex[:8]}:"

    def redis_store(instance: str) -> WebhookStore:
        state = RedisState(url, prefix=prefix)
        closing.append(state)
        return RedisWebhookStore(state.client, prefix=prefix, instance=instance)

    yield redis_store
    for state in closing:
        await state.close()


def entry(ids: list[str], now: float, upstream: str = "stripe") -> WebhookEntry:
    return WebhookEntry(
        id=new_id(),
        upstream=upstream,
        event_ids=ids,
        types=["t"] * len(ids),
        headers=[("Stripe-Signature", "t=1,v1=x")],
        body=b'{"id": "x"}\x00\xff',
        received=now,
        expires=now + 100,
        dedupe_until=now + 50,
        due=now,
    )


async def test_store_dedupes_claims_and_finishes(store_factory: Callable[[str], WebhookStore]) -> None:
    store = store_factory("a")
    now = time.time()
    first = entry(["e1", "e2"], now)
    assert await store.add(first) == []
    assert sorted(await store.add(entry(["e2", "e3"], now))) == ["e2"]  # nothing stored
    assert await store.add(entry(["e3"], now, upstream="other")) == []  # ids are per upstream
    claimed = await store.claim("stripe", now, 10)
    assert [e.id for e in claimed] == [first.id]
    got = claimed[0]
    assert got.body == first.body and got.headers == first.headers and got.event_ids == ["e1", "e2"]
    assert got.state == "claimed" and await store.claim("stripe", now, 10) == []
    got.state, got.due, got.attempts, got.done = "queued", now + 5, 1, ["own"]
    await store.finish(got)
    assert await store.claim("stripe", now + 1, 10) == []
    again = await store.claim("stripe", now + 6, 10)
    assert [e.done for e in again] == [["own"]] and again[0].attempts == 1
    stats = await store.stats(now)
    assert stats["stripe"].pending == 1
    again[0].state = "delivered"
    await store.finish(again[0])
    stats = await store.stats(now)
    assert stats.get("stripe", WebhookStats()).pending == 0  # an upstream with nothing pending may be left out
    assert await store.add(entry(["e1"], now)) == ["e1"]  # still within dedupe_for


async def test_store_takes_back_what_a_dead_process_held(
    store_factory: Callable[[str], WebhookStore], request: pytest.FixtureRequest
) -> None:
    if "memory" in request.node.callspec.id:
        pytest.skip("one process: nothing to take back")
    dead = store_factory("dead-replica")
    now = time.time()
    assert await dead.add(entry(["k1"], now)) == []
    assert len(await dead.claim("stripe", now, 10)) == 1
    state = getattr(dead, "state", None)
    if isinstance(state, SQLiteState):  # as if its process had died: no longer registered
        _LOCAL_INSTANCES.discard(state.instance_id)
        state._db.execute("DELETE FROM instances WHERE id = ?", (state.instance_id,))
    alive = store_factory("alive-replica")
    await alive.claim("stripe", now, 10)  # lets a Redis store learn the upstream
    assert await alive.recover(now) == 1
    taken = await alive.claim("stripe", now, 10)
    assert [e.event_ids for e in taken] == [["k1"]]


async def test_purge_forgets_finished_entries_after_their_keep_time(
    store_factory: Callable[[str], WebhookStore], request: pytest.FixtureRequest
) -> None:
    if "redis" in request.node.callspec.id:
        pytest.skip("Redis entries expire by their TTLs")
    store = store_factory("a")
    now = time.time()
    made = [entry([f"p{i}"], now) for i in range(3)]
    for e in made:
        assert await store.add(e) == []
    claimed = {e.id: e for e in await store.claim("stripe", now, 10)}
    done, dead, waiting = (claimed[e.id] for e in made)
    done.state, dead.state, waiting.state, waiting.due = "delivered", "dead", "queued", now + 3600
    for e in (done, dead, waiting):
        await store.finish(e)
    await store.purge(now + KEEP_DONE + 60)
    assert {e.id: e.state for e in await store.list()} == {dead.id: "dead", waiting.id: "queued"}
    stats = (await store.stats(now))["stripe"]
    assert (stats.pending, stats.dead) == (1, 1)
    await store.purge(now + KEEP_DEAD + 60)
    assert [e.id for e in await store.list()] == [waiting.id]  # pending entries are never purged


async def test_sqlite_maintenance_searches_indexes_never_the_whole_table(tmp_path: Path) -> None:
    """The worker runs stats, recover, purge and claim every 2 s on the event loop, and
    delivered entries stay a day (KEEP_DONE): at 200 events/s that is 17 million rows.
    Every statement must search an index; a scan of the table stalled the listener for
    70 ms every 2 s with 100,000 entries kept (bench/webhooks.py, docs/performance.md)."""
    from proxy.webhooks.sqlite_store import SQLiteWebhookStore

    (tmp_path / "data").mkdir()
    state = SQLiteState(tmp_path / "data")
    try:
        store = SQLiteWebhookStore(state)
        now = time.time()
        for i in range(4):
            assert await store.add(entry([f"m{i}"], now)) == []
        claimed = await store.claim("stripe", now, 3)
        claimed[0].state, claimed[1].state = "delivered", "dead"
        for e in claimed[:2]:
            await store.finish(e)
        statements: list[str] = []
        state._db.set_trace_callback(statements.append)
        try:
            await store.stats(now)
            await store.recover(now)
            await store.purge(now + KEEP_DEAD + 60)
            await store.claim("stripe", now, 16)
        finally:
            state._db.set_trace_callback(None)
        plans = {
            sql: [str(row[3]) for row in state._db.execute("EXPLAIN QUERY PLAN " + sql)]
            for sql in statements
            if "webhook_events" in sql
        }
        assert len(plans) >= 5  # stats, recover, two purges, claim's select (and its update)
        scans = {sql: plan for sql, plan in plans.items() if any(d.startswith("SCAN webhook_events") for d in plan)}
        assert scans == {}
    finally:
        await state.close()


def test_a_version_2_data_dir_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    from proxy.state.sqlite import DB_NAME, SCHEMA_VERSION, open_database

    path = tmp_path / DB_NAME
    db = open_database(path)
    db.execute("DROP TABLE webhook_events")
    db.execute("DROP TABLE webhook_ids")
    db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
    db.close()
    open_database(path).close()
    with sqlite3.connect(path) as again:
        tables = {row[0] for row in again.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        version = again.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0]
    assert {"webhook_events", "webhook_ids", "outbox"} <= tables and version == str(SCHEMA_VERSION) == "3"
