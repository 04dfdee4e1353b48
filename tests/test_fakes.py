"""Tests of the fake provider servers (fakes): real SDKs against each fake, every
fault kind through an aiohttp client, the ledger and the HTTP control API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe
from aiohttp import web

from fakes import (
    FakeServer,
    Fault,
    FaultError,
    Faults,
    Ledger,
    make_stripe_app,
    parse_stripe_form,
    pattern_bytes,
    running_fakes,
    start_fakes,
    stop_fakes,
)

ROOT = Path(__file__).resolve().parent.parent
SK = "sk_test_fake123"
STRIPE_AUTH = {"Authorization": f"Bearer {SK}"}


@pytest.fixture(autouse=True)
def _no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(stripe, "enable_telemetry", False)


@pytest.fixture
async def stripe_fake() -> AsyncIterator[FakeServer]:
    async with FakeServer("stripe") as fake:
        yield fake


@pytest.fixture
async def echo() -> AsyncIterator[FakeServer]:
    async with FakeServer("echo") as fake:
        yield fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _stripe_client(url: str) -> stripe.StripeClient:
    return stripe.StripeClient(SK, base_addresses={"api": url}, max_network_retries=0)


# ------------------------------------------------------------------------------------------
# Stripe
# ------------------------------------------------------------------------------------------
def test_parse_stripe_form() -> None:
    parsed = parse_stripe_form(
        "amount=2000&metadata[order_id]=42&expand[0]=latest_charge&expand[1]=customer"
        "&items[0][price]=p1&items[1][price]=p2&tags[]=a&tags[]=b&shipping[address][line1]=x"
    )
    assert parsed == {
        "amount": "2000",
        "metadata": {"order_id": "42"},
        "expand": ["latest_charge", "customer"],
        "items": [{"price": "p1"}, {"price": "p2"}],
        "tags": ["a", "b"],
        "shipping": {"address": {"line1": "x"}},
    }
    assert parse_stripe_form("metadata%5Bk%5D=v") == {"metadata": {"k": "v"}}


async def test_stripe_sdk_payment_flow(stripe_fake: FakeServer) -> None:
    client = _stripe_client(stripe_fake.url)

    def flow() -> tuple[Any, ...]:
        pi = client.v1.payment_intents.create(
            params={
                "amount": 2000,
                "currency": "usd",
                "payment_method": "pm_card_visa",
                "confirm": True,
                "metadata": {"order_id": "42"},
            }
        )
        got = client.v1.payment_intents.retrieve(pi.id)
        manual = client.v1.payment_intents.create(
            params={
                "amount": 1500,
                "currency": "eur",
                "payment_method": "pm_card_visa",
                "confirm": True,
                "capture_method": "manual",
            }
        )
        captured = client.v1.payment_intents.capture(manual.id)
        rf = client.v1.refunds.create(
            params={"payment_intent": pi.id, "amount": 500}, options={"idempotency_key": "refund-42"}
        )
        rf2 = client.v1.refunds.create(params={"charge": pi.latest_charge})
        return pi, got, manual, captured, rf, rf2

    pi, got, manual, captured, rf, rf2 = await asyncio.to_thread(flow)
    assert pi.id.startswith("pi_") and pi.status == "succeeded" and pi.amount_received == 2000
    assert pi.metadata["order_id"] == "42"
    assert got.id == pi.id and got.latest_charge == pi.latest_charge
    assert manual.status == "requires_capture" and manual.amount_capturable == 1500
    assert captured.status == "succeeded"
    assert rf.id.startswith("re_") and rf.amount == 500 and rf.status == "succeeded"
    assert rf2.amount == 1500  # the remainder
    led = stripe_fake.ledger
    assert led.counts()["payment_intent.created"] == 2
    assert led.count("charge.succeeded") == 1 and led.count("charge.authorized") == 1
    assert led.count("refund.created") == 2 and led.count("refund.created", key="refund-42") == 1
    first = led.requests[0]
    assert first.method == "POST" and first.path == "/v1/payment_intents"
    assert first.idempotency_key  # the SDK generates one for every POST
    assert first.form()["metadata[order_id]"] == ["42"]


async def test_stripe_sdk_errors(stripe_fake: FakeServer) -> None:
    client = _stripe_client(stripe_fake.url)

    def create(**params: Any) -> Any:
        base: dict[str, Any] = {"amount": 2000, "currency": "usd"}
        base.update(params)
        return client.v1.payment_intents.create(params=base)  # type: ignore[arg-type]

    with pytest.raises(stripe.CardError) as card:
        await asyncio.to_thread(create, payment_method="pm_card_chargeDeclined", confirm=True)
    assert card.value.code == "card_declined" and card.value.http_status == 402
    assert card.value.error is not None and card.value.error.decline_code == "generic_decline"
    assert (card.value.request_id or "").startswith("req_")
    with pytest.raises(stripe.CardError) as funds:
        await asyncio.to_thread(create, payment_method="pm_card_chargeDeclinedInsufficientFunds", confirm=True)
    assert funds.value.error is not None and funds.value.error.decline_code == "insufficient_funds"

    with pytest.raises(stripe.InvalidRequestError) as small:
        await asyncio.to_thread(create, amount=10)
    assert small.value.code == "amount_too_small" and small.value.param == "amount"
    with pytest.raises(stripe.InvalidRequestError) as cur:
        await asyncio.to_thread(create, currency="xyz")
    assert cur.value.param == "currency"
    with pytest.raises(stripe.InvalidRequestError) as unknown:
        await asyncio.to_thread(create, bogus="1")
    assert unknown.value.code == "parameter_unknown"
    with pytest.raises(stripe.InvalidRequestError) as missing:
        await asyncio.to_thread(client.v1.payment_intents.retrieve, "pi_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"

    bad = stripe.StripeClient("nope", base_addresses={"api": stripe_fake.url}, max_network_retries=0)
    with pytest.raises(stripe.AuthenticationError):
        await asyncio.to_thread(bad.v1.payment_intents.retrieve, "pi_x")
    assert stripe_fake.ledger.count("charge.failed") == 2


async def test_stripe_requires_action(stripe_fake: FakeServer, session: aiohttp.ClientSession) -> None:
    form = {"amount": "1000", "currency": "usd", "payment_method": "pm_card_threeDSecure2Required", "confirm": "true"}
    async with session.post(stripe_fake.url + "/v1/payment_intents", data=form, headers=STRIPE_AUTH) as r:
        body = await r.json()
    assert r.status == 200 and body["status"] == "requires_action"
    async with session.post(
        stripe_fake.url + "/v1/payment_intents",
        data={**form, "error_on_requires_action": "true"},
        headers=STRIPE_AUTH,
    ) as r:
        assert r.status == 402 and (await r.json())["error"]["code"] == "authentication_required"
    async with session.post(stripe_fake.url + "/v1/payment_intents", data=form) as r:
        assert r.status == 401 and (await r.json())["error"]["type"] == "invalid_request_error"
        assert r.headers["Request-Id"].startswith("req_")


async def test_stripe_idempotency_rules(stripe_fake: FakeServer, session: aiohttp.ClientSession) -> None:
    url = stripe_fake.url + "/v1/payment_intents"
    form = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    hdrs = {**STRIPE_AUTH, "Idempotency-Key": "k1"}
    async with session.post(url, data=form, headers=hdrs) as r1:
        b1 = await r1.json()
        assert r1.status == 200 and "Idempotent-Replayed" not in r1.headers
    async with session.post(url, data=form, headers=hdrs) as r2:
        b2 = await r2.json()
        assert r2.status == 200 and r2.headers["Idempotent-Replayed"] == "true"
        assert r2.headers["Original-Request"] == r1.headers["Request-Id"]
    assert b1 == b2
    async with session.post(url, data={**form, "amount": "3000"}, headers=hdrs) as r3:
        err = (await r3.json())["error"]
        assert r3.status == 400 and err["type"] == "idempotency_error"
    # a declined card (execution began) is stored and replayed; validation errors are not
    dec = {**form, "payment_method": "pm_card_chargeDeclined"}
    for _ in range(2):
        async with session.post(url, data=dec, headers={**STRIPE_AUTH, "Idempotency-Key": "k2"}) as r:
            assert r.status == 402
    assert r.headers["Idempotent-Replayed"] == "true"
    for expected in (400, 200):
        body = {**form, "amount": "1"} if expected == 400 else form
        async with session.post(url, data=body, headers={**STRIPE_AUTH, "Idempotency-Key": "k3"}) as r:
            assert r.status == expected
    led = stripe_fake.ledger
    assert led.counts_by_key("payment_intent.created") == {"k1": 1, "k2": 1, "k3": 1}
    assert [r.replayed for r in led.requests] == [False, True, False, False, True, False, False]
    # the SDK maps 400 + idempotency_error to IdempotencyError
    client = _stripe_client(stripe_fake.url)
    with pytest.raises(stripe.IdempotencyError):
        await asyncio.to_thread(
            client.v1.payment_intents.create,
            params={"amount": 999, "currency": "usd"},
            options={"idempotency_key": "k1"},
        )


async def test_stripe_concurrent_same_key_conflicts(stripe_fake: FakeServer, session: aiohttp.ClientSession) -> None:
    stripe_fake.faults.delay(0.3, phase="during", count=1)
    url = stripe_fake.url + "/v1/payment_intents"
    form = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    hdrs = {**STRIPE_AUTH, "Idempotency-Key": "same"}

    async def post() -> tuple[int, dict[str, Any]]:
        async with session.post(url, data=form, headers=hdrs) as r:
            return r.status, await r.json()

    first = asyncio.create_task(post())
    await asyncio.sleep(0.1)
    status2, body2 = await post()
    status1, _ = await first
    assert (status1, status2) == (200, 409)
    assert body2["error"]["code"] == "idempotency_key_in_use"
    # nothing stored for the conflict: a retry now replays the first
    async with session.post(url, data=form, headers=hdrs) as r:
        assert r.status == 200 and r.headers["Idempotent-Replayed"] == "true"
    assert stripe_fake.ledger.count("payment_intent.created") == 1


async def test_processed_flag_makes_ambiguous_failures(stripe_fake: FakeServer, session: aiohttp.ClientSession) -> None:
    url = stripe_fake.url + "/v1/payment_intents"
    form = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    stripe_fake.faults.status(503, count=1, processed=True, should_retry=True)
    hdrs = {**STRIPE_AUTH, "Idempotency-Key": "amb"}
    async with session.post(url, data=form, headers=hdrs) as r:
        assert r.status == 503 and r.headers["Stripe-Should-Retry"] == "true"
        assert (await r.json())["error"]["type"] == "api_error"
    assert stripe_fake.ledger.count("charge.succeeded") == 1  # it happened anyway
    async with session.post(url, data=form, headers=hdrs) as r:
        assert r.status == 200 and r.headers["Idempotent-Replayed"] == "true"
    stripe_fake.faults.reset(count=1, processed=False)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(url, data=form, headers={**STRIPE_AUTH, "Idempotency-Key": "unproc"}) as r:
            await r.read()
    stripe_fake.faults.reset(count=1, processed=True)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.post(url, data=form, headers={**STRIPE_AUTH, "Idempotency-Key": "proc"}) as r:
            await r.read()
    assert stripe_fake.ledger.counts_by_key("charge.succeeded") == {"amb": 1, "proc": 1}
    recs = stripe_fake.ledger.requests
    assert [(r.fault, r.processed) for r in recs[-2:]] == [("reset", False), ("reset", True)]


async def test_stripe_sdk_retries_through_faults(stripe_fake: FakeServer) -> None:
    stripe_fake.faults.status(503, count=1, processed=True, path="/v1/payment_intents")
    client = stripe.StripeClient(SK, base_addresses={"api": stripe_fake.url}, max_network_retries=1)
    pi = await asyncio.to_thread(
        client.v1.payment_intents.create,
        params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
    )
    assert pi.status == "succeeded"
    led = stripe_fake.ledger
    assert len(led.requests) == 2 and led.requests[0].idempotency_key == led.requests[1].idempotency_key
    assert led.requests[1].replayed and led.count("charge.succeeded") == 1


# ------------------------------------------------------------------------------------------
# PayPal
# ------------------------------------------------------------------------------------------
def _paypal_client(url: str) -> Any:
    from paypalserversdk.configuration import Environment, Server
    from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials
    from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

    creds = ClientCredentialsAuthCredentials(o_auth_client_id="client-id-123", o_auth_client_secret="secret-456")
    pp = PaypalServersdkClient(client_credentials_auth_credentials=creds, environment=Environment.SANDBOX)
    pp.config.environments = {Environment.SANDBOX: {Server.DEFAULT: url}}
    return pp


async def test_paypal_sdk_flow() -> None:
    from paypalserversdk.exceptions.error_exception import ErrorException
    from paypalserversdk.models.amount_with_breakdown import AmountWithBreakdown
    from paypalserversdk.models.checkout_payment_intent import CheckoutPaymentIntent
    from paypalserversdk.models.order_request import OrderRequest
    from paypalserversdk.models.purchase_unit_request import PurchaseUnitRequest

    async with FakeServer("paypal") as fake:
        pp = _paypal_client(fake.url)
        body = OrderRequest(
            intent=CheckoutPaymentIntent.CAPTURE,
            purchase_units=[
                PurchaseUnitRequest(
                    reference_id="order-42", amount=AmountWithBreakdown(currency_code="USD", value="20.00")
                )
            ],
        )

        def flow() -> tuple[Any, ...]:
            r = pp.orders.create_order(
                {"body": body, "prefer": "return=representation", "paypal_request_id": "order-42-create"}
            )
            again = pp.orders.create_order(
                {"body": body, "prefer": "return=representation", "paypal_request_id": "order-42-create"}
            )
            c = pp.orders.capture_order(
                {"id": r.body.id, "prefer": "return=representation", "paypal_request_id": "order-42-capture"}
            )
            got = pp.orders.get_order({"id": r.body.id})
            cap_id = c.body.purchase_units[0].payments.captures[0].id
            refund = pp.payments.refund_captured_payment(
                {"capture_id": cap_id, "paypal_request_id": "refund-1", "prefer": "return=representation"}
            )
            return r, again, c, got, refund

        r, again, c, got, refund = await asyncio.to_thread(flow)
        assert r.status_code == 201 and r.body.status == "CREATED"
        assert again.status_code == 200 and again.body.id == r.body.id
        assert c.status_code == 201 and c.body.status == "COMPLETED"
        assert c.body.purchase_units[0].payments.captures[0].amount.value == "20.00"
        assert got.body.status == "COMPLETED"
        assert refund.status_code == 201 and refund.body.status == "COMPLETED"
        assert refund.body.amount.value == "20.00"

        def capture_again() -> Any:
            return pp.orders.capture_order({"id": r.body.id, "paypal_request_id": "another"})

        with pytest.raises(ErrorException) as exc:
            await asyncio.to_thread(capture_again)
        assert exc.value.response_code == 422
        assert exc.value.details[0].issue == "ORDER_ALREADY_CAPTURED"
        assert exc.value.debug_id
        led = fake.ledger
        assert led.counts() == {"token.issued": 1, "order.created": 1, "order.captured": 1, "refund.created": 1}
        assert led.requests[0].path == "/v1/oauth2/token"
        assert led.requests[1].header("PayPal-Request-Id") == "order-42-create"
        assert led.requests[2].replayed


async def test_paypal_http_rules(session: aiohttp.ClientSession) -> None:
    async with FakeServer("paypal", auto_approve=False, clients={"cid": "sec"}) as fake:
        url = fake.url
        async with session.post(
            url + "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": aiohttp.encode_basic_auth("cid", "wrong")},
        ) as r:
            assert r.status == 401 and (await r.json())["error"] == "invalid_client"
        async with session.post(
            url + "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": aiohttp.encode_basic_auth("cid", "sec")},
        ) as r:
            tok = await r.json()
        assert tok["token_type"] == "Bearer" and tok["expires_in"] == 32400
        auth = {"Authorization": f"Bearer {tok['access_token']}"}
        order: dict[str, Any] = {
            "intent": "CAPTURE",
            "purchase_units": [{"amount": {"currency_code": "JPY", "value": "10.50"}}],
        }
        async with session.post(url + "/v2/checkout/orders", json=order) as r:
            body = await r.json()
            assert r.status == 401 and body["name"] == "AUTHENTICATION_FAILURE"
        async with session.post(url + "/v2/checkout/orders", json=order, headers=auth) as r:
            body = await r.json()
            assert r.status == 422 and body["details"][0]["issue"] == "DECIMALS_NOT_SUPPORTED"
            assert body["debug_id"] and r.headers["Paypal-Debug-Id"]
        order["purchase_units"][0]["amount"] = {"currency_code": "USD", "value": "10.00"}
        async with session.post(url + "/v2/checkout/orders", json=order, headers=auth) as r:
            created = await r.json()
            assert r.status == 201 and set(created) == {"id", "status", "links"}  # return=minimal
        async with session.post(url + f"/v2/checkout/orders/{created['id']}/capture", headers=auth) as r:
            assert r.status == 422 and (await r.json())["details"][0]["issue"] == "ORDER_NOT_APPROVED"
        single = {**order, "payment_source": {"card": {"vault_id": "8kk845"}}}
        async with session.post(url + "/v2/checkout/orders", json=single, headers=auth) as r:
            assert r.status == 400 and (await r.json())["details"][0]["issue"] == "PAYPAL_REQUEST_ID_REQUIRED"
        hdrs = {**auth, "PayPal-Request-Id": "ss-1", "Prefer": "return=representation"}
        async with session.post(url + "/v2/checkout/orders", json=single, headers=hdrs) as r:
            done = await r.json()
            assert r.status == 201 and done["status"] == "COMPLETED"
        cap = done["purchase_units"][0]["payments"]["captures"][0]
        refund_url = url + f"/v2/payments/captures/{cap['id']}/refund"
        part = {"amount": {"currency_code": "USD", "value": "4.00"}}
        async with session.post(refund_url, json=part, headers={**auth, "PayPal-Request-Id": "rf-1"}) as r:
            assert r.status == 201
        async with session.post(
            refund_url, json={"amount": {"currency_code": "USD", "value": "7.00"}}, headers=auth
        ) as r:
            assert r.status == 422 and (await r.json())["details"][0]["issue"] == "REFUND_AMOUNT_EXCEEDED"
        async with session.post(refund_url, headers=auth) as r:
            rest = await r.json()
            assert r.status == 201 and rest["amount"]["value"] == "6.00"
        async with session.get(url + f"/v2/payments/captures/{cap['id']}", headers=auth) as r:
            assert (await r.json())["status"] == "REFUNDED"
        async with session.get(url + "/v2/nothing", headers=auth) as r:
            assert r.status == 404 and (await r.json())["name"] == "RESOURCE_NOT_FOUND"
        assert fake.ledger.count("refund.created") == 2


# ------------------------------------------------------------------------------------------
# SendGrid and Mailgun
# ------------------------------------------------------------------------------------------
async def test_sendgrid_sdk() -> None:
    from python_http_client.exceptions import BadRequestsError, UnauthorizedError
    from sendgrid import SendGridAPIClient
    from sendgrid.helpers.mail import Category, CustomArg, Mail

    async with FakeServer("sendgrid") as fake:
        sg = SendGridAPIClient("SG.test-key", host=fake.url)
        m = Mail(
            from_email="shop@example.com",
            to_emails="customer@example.org",
            subject="Your order #42",
            plain_text_content="Thanks for your order 42.",
            html_content="<p>Thanks</p>",
        )
        m.custom_arg = CustomArg("order_id", "42")
        m.category = Category("receipts")
        resp = await asyncio.to_thread(sg.send, m)
        assert resp.status_code == 202 and resp.body == b""
        assert resp.headers["X-Message-Id"] and resp.headers["X-RateLimit-Limit"]
        eff = fake.ledger.effects("mail.sent")[0]
        assert eff.object_id == resp.headers["X-Message-Id"]
        assert eff.data["to"] == ["customer@example.org"] and eff.data["categories"] == ["receipts"]

        bad = {
            "personalizations": [{"to": [{"email": "not-an-address"}]}],
            "from": {"email": "a@b.co"},
            "subject": "s",
            "content": [{"type": "text/plain", "value": "x"}],
        }
        with pytest.raises(BadRequestsError) as exc:
            await asyncio.to_thread(sg.client.mail.send.post, request_body=bad)
        err = exc.value.to_dict["errors"][0]
        assert err["field"] == "personalizations.0.to.0.email" and err["message"]
        too_many = {**bad, "personalizations": [{"to": [{"email": f"u{i}@x.io"} for i in range(1001)]}]}
        with pytest.raises(BadRequestsError):
            await asyncio.to_thread(sg.client.mail.send.post, request_body=too_many)
        no_subject = {**bad, "personalizations": [{"to": [{"email": "a@x.io"}]}], "subject": None}
        del no_subject["subject"]
        with pytest.raises(BadRequestsError) as exc:
            await asyncio.to_thread(sg.client.mail.send.post, request_body=no_subject)
        assert exc.value.to_dict["errors"][0]["field"] == "subject"
        sandbox = {**no_subject, "subject": "s", "mail_settings": {"sandbox_mode": {"enable": True}}}
        resp = await asyncio.to_thread(sg.client.mail.send.post, request_body=sandbox)
        assert resp.status_code == 200
        with pytest.raises(UnauthorizedError):
            await asyncio.to_thread(SendGridAPIClient("bad", host=fake.url).send, m)
        assert fake.ledger.counts() == {"mail.sent": 1, "mail.sandboxed": 1}


async def test_mailgun_sdk() -> None:
    from mailgun.client import Client
    from mailgun.config import RetryPolicy

    async with FakeServer("mailgun", domains={"mg.example.com"}) as fake:
        data = {
            "from": "Shop <shop@mg.example.com>",
            "to": "customer@example.org",
            "subject": "Your order #42",
            "text": "Thanks for your order 42.",
            "o:tag": "receipts",
            "h:X-Custom": "order-42",
            "v:order_id": "42",
        }

        def send(key: str, domain: str, payload: dict[str, str], **kw: Any) -> Any:
            with Client(auth=("api", key), api_url=fake.url, retry_policy=RetryPolicy(max_retries=0)) as mg:
                return mg.messages.create(domain=domain, data=payload, **kw)

        r = await asyncio.to_thread(send, "key-test123", "mg.example.com", data)
        assert r.status_code == 200 and r.json()["message"] == "Queued. Thank you."
        assert r.json()["id"].startswith("<") and r.json()["id"].endswith("@mg.example.com>")
        files = [("attachment", ("receipt.pdf", b"%PDF-1.4 fake", "application/pdf"))]
        r = await asyncio.to_thread(send, "key-test123", "mg.example.com", data, files=files)
        assert r.status_code == 200
        eff = fake.ledger.effects("message.queued")[1]
        assert eff.data["fields"]["attachment"][0]["filename"] == "receipt.pdf"
        assert eff.data["fields"]["v:order_id"] == ["42"]
        r = await asyncio.to_thread(
            send, "key-test123", "mg.example.com", {k: v for k, v in data.items() if k != "from"}
        )
        assert r.status_code == 400 and r.json() == {"message": "from parameter is missing"}
        r = await asyncio.to_thread(send, "key-test123", "other.example.com", data)
        assert r.status_code == 404
        r = await asyncio.to_thread(send, "", "mg.example.com", data)
        assert r.status_code == 401 and r.text == "Forbidden"
        assert fake.ledger.count("message.queued") == 2


# ------------------------------------------------------------------------------------------
# Echo
# ------------------------------------------------------------------------------------------
async def test_echo_endpoints(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    async with session.put(echo.url + "/a/b?x=1&x=2", data=b"hello", headers={"X-Request-Id": "rq-1"}) as r:
        body = await r.json()
    assert body["method"] == "PUT" and body["path"] == "/a/b" and body["query"] == {"x": ["1", "2"]}
    assert body["body_len"] == 5 and body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert {k.lower(): v for k, v in body["headers"].items()}["x-request-id"] == "rq-1"
    assert echo.ledger.effects("echo.PUT")[0].request_id == "rq-1"

    n = 3_000_000
    h = hashlib.sha256()
    async with session.get(echo.url + f"/bytes/{n}") as r:
        assert r.headers["Content-Length"] == str(n)
        async for chunk in r.content.iter_chunked(1 << 16):
            h.update(chunk)
    assert h.hexdigest() == hashlib.sha256(pattern_bytes(0, n)).hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    async with session.post(echo.url + "/upload", data=gen()) as r:
        up = await r.json()
    assert up == {"received": 40 * 65536, "sha256": hashlib.sha256(b"x" * 65536 * 40).hexdigest()}
    async with session.get(echo.url + "/status/418") as r:
        assert r.status == 418
    async with session.post(echo.url + "/status/503?retry_after=2") as r:
        assert r.status == 503 and r.headers["Retry-After"] == "2"
    t = time.monotonic()
    async with session.get(echo.url + "/delay/0.2") as r:
        assert r.status == 200
    assert time.monotonic() - t >= 0.2
    for expect in (1, 2):
        async with session.get(echo.url + "/cache/30") as r:
            assert r.headers["Cache-Control"] == "public, max-age=30" and (await r.json())["n"] == expect


async def test_echo_streams_100mb_without_buffering(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    n = 100 * 1024 * 1024
    got = 0
    async with session.get(echo.url + f"/bytes/{n}?chunk=1048576") as r:
        async for chunk in r.content.iter_chunked(1 << 20):
            got += len(chunk)
    assert got == n


# ------------------------------------------------------------------------------------------
# Faults (aiohttp client against the echo fake)
# ------------------------------------------------------------------------------------------
async def _post(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, bytes, Any]:
    async with session.post(url, data=b"payload", **kw) as r:
        return r.status, await r.read(), r.headers


async def test_status_burst_with_count_and_match(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    echo.faults.status(503, count=3, path="/pay", method="POST", retry_after=2, headers={"X-Fault": "yes"})
    statuses = []
    for _ in range(4):
        status, _, headers = await _post(session, echo.url + "/pay/x")
        statuses.append(status)
    assert statuses == [503, 503, 503, 200]
    assert echo.ledger.requests[0].fault == "status" and not echo.ledger.requests[0].processed
    echo.faults.status(500, count=1, path="/pay")
    assert (await _post(session, echo.url + "/other"))[0] == 200  # path does not match
    async with session.get(echo.url + "/pay") as r:
        assert r.status == 500
    date = formatdate(time.time() + 30, usegmt=True)
    echo.faults.too_many_requests(date, count=1)
    status, _, headers = await _post(session, echo.url + "/x")
    assert status == 429 and headers["Retry-After"] == date
    echo.faults.status(502, count=1, after=1, body='{"custom": true}', should_retry=False)
    assert (await _post(session, echo.url + "/x"))[0] == 200
    status, body, headers = await _post(session, echo.url + "/x")
    assert status == 502 and json.loads(body) == {"custom": True} and headers["Stripe-Should-Retry"] == "false"
    assert echo.ledger.count("echo.POST") == 3


async def test_retry_after_and_shapes_per_provider(session: aiohttp.ClientSession) -> None:
    async with running_fakes(("stripe", "paypal", "sendgrid", "mailgun")) as fakes:
        for fake in fakes.values():
            fake.faults.too_many_requests(3, count=1)
        bodies = {}
        for name, fake in fakes.items():
            async with session.post(fake.url + "/anything") as r:
                assert r.status == 429 and r.headers["Retry-After"] == "3"
                bodies[name] = await r.json()
        assert bodies["stripe"]["error"]["type"] == "rate_limit_error"
        assert bodies["paypal"]["name"] == "RATE_LIMIT_REACHED"
        assert bodies["sendgrid"]["errors"][0]["message"] == "too many requests"
        assert "message" in bodies["mailgun"]


async def test_delay_and_drip(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    echo.faults.delay(0.3, count=1)
    t = time.monotonic()
    assert (await _post(session, echo.url + "/x"))[0] == 200
    assert time.monotonic() - t >= 0.3
    echo.faults.delay(0.2, phase="after", count=1)
    t = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await _post(session, echo.url + "/x", timeout=aiohttp.ClientTimeout(total=0.1))
    assert echo.ledger.count("echo.POST") == 2  # processed, then answered late
    echo.faults.drip(chunk_size=64, interval=0.05, count=1)
    t = time.monotonic()
    async with session.get(echo.url + "/drip") as r:
        first = await r.content.readany()
        rest = await r.read()
    assert time.monotonic() - t >= 0.1 and len(first) <= 64
    assert json.loads(first + rest)["path"] == "/drip"
    echo.faults.drip(chunk_size=4096, interval=0.05, count=1, path="/bytes")
    async with session.get(echo.url + "/bytes/20000") as r:
        assert len(await r.read()) == 20000


async def test_hang_and_resets(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    echo.faults.hang(count=1)
    with pytest.raises(asyncio.TimeoutError):
        await _post(session, echo.url + "/x", timeout=aiohttp.ClientTimeout(total=0.2))
    echo.faults.reset(count=1)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError)):
        await _post(session, echo.url + "/x")
    echo.faults.reset_mid_body(count=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await _post(session, echo.url + "/x")
    echo.faults.truncate(count=1)
    with pytest.raises(aiohttp.ClientPayloadError):
        await _post(session, echo.url + "/x")
    echo.faults.reset_mid_body(count=1, after_bytes=1_000_000, path="/bytes")
    got = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(echo.url + "/bytes/10000000") as r:
            async for chunk in r.content.iter_chunked(65536):
                got += len(chunk)
    assert 0 < got <= 1_000_000
    echo.faults.truncate(count=1, path="/bytes", extra_bytes=10)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.get(echo.url + "/bytes/1000") as r:
            await r.read()
    echo.faults.garbage(count=1)
    with pytest.raises(aiohttp.ClientResponseError):  # "Bad status line"
        await _post(session, echo.url + "/x")
    # NB: aiohttp's client silently retries an idempotent request once after a disconnect
    echo.faults.reset(count=2, method="GET")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with session.get(echo.url + "/x") as r:
            await r.read()
    assert (await _post(session, echo.url + "/x"))[0] == 200
    assert [r.fault for r in echo.ledger.requests] == [
        "hang",
        "reset",
        "reset_mid_body",
        "truncate",
        "reset_mid_body",
        "truncate",
        "garbage",
        "reset",
        "reset",
        None,
    ]


async def test_rate_limit_outage_and_random(echo: FakeServer, session: aiohttp.ClientSession) -> None:
    echo.faults.rate_limit(5, burst=5)
    statuses = [(await _post(session, echo.url + "/x"))[0] for _ in range(8)]
    assert statuses == [200] * 5 + [429] * 3
    status, _, headers = await _post(session, echo.url + "/x")
    assert status == 429 and int(headers["Retry-After"]) >= 1 and headers["X-RateLimit-Remaining"] == "0"
    await asyncio.sleep(0.25)
    assert (await _post(session, echo.url + "/x"))[0] == 200
    echo.faults.clear()

    echo.faults.outage(0.3)
    assert (await _post(session, echo.url + "/x"))[0] == 503
    assert (await _post(session, echo.url + "/y"))[0] == 503
    await asyncio.sleep(0.35)
    assert (await _post(session, echo.url + "/x"))[0] == 200
    echo.faults.outage(0.3, mode="reset")
    with pytest.raises(aiohttp.ClientConnectionError):
        await _post(session, echo.url + "/x")
    echo.faults.clear()

    async def pattern(seed: int) -> list[int]:
        echo.faults.set({"kind": "random", "ratio": 0.5, "seed": seed, "status": 502})
        return [(await _post(session, echo.url + "/x"))[0] for _ in range(20)]

    first, second = await pattern(7), await pattern(7)
    assert first == second and 3 <= first.count(502) <= 17 and set(first) == {200, 502}


def test_faults_api_validation() -> None:
    faults = Faults()
    with pytest.raises(FaultError):
        faults.add(kind="nope")
    with pytest.raises(FaultError):
        faults.add({"kind": "status", "bogus": 1})
    f = faults.add({"kind": "status", "status": 500, "count": 1})
    assert f.status == 500 and len(faults) == 1
    assert faults.match("GET", "/x") is not None and faults.match("GET", "/x") is None
    assert len(faults) == 0
    assert Fault("rate_limit", rate=2).status == 429 and Fault("random").status == 500


# ------------------------------------------------------------------------------------------
# Control API, ledger over HTTP, servers
# ------------------------------------------------------------------------------------------
async def test_http_control_api(stripe_fake: FakeServer, session: aiohttp.ClientSession) -> None:
    ctl = stripe_fake.url + "/__fake__"
    async with session.post(ctl + "/faults", json={"kind": "status", "status": 503, "count": 2}) as r:
        added = await r.json()
        assert r.status == 200 and added["added"][0]["status"] == 503
    async with session.post(ctl + "/faults", json={"kind": "bad"}) as r:
        assert r.status == 400
    # control paths are never faulted
    async with session.get(ctl + "/faults") as r:
        assert r.status == 200 and len((await r.json())["faults"]) == 1
    url = stripe_fake.url + "/v1/payment_intents"
    form = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    for expected in (503, 503, 200):
        async with session.post(url, data=form, headers={**STRIPE_AUTH, "Idempotency-Key": "h1"}) as r:
            assert r.status == expected
    async with session.get(ctl + "/ledger") as r:
        led = await r.json()
    assert led["name"] == "stripe" and len(led["requests"]) == 3
    assert led["counts"]["payment_intent.created"] == 1
    assert led["counts_by_key"]["charge.succeeded"] == {"h1": 1}
    assert led["requests"][0]["idempotency_key"] == "h1" and led["requests"][0]["fault"] == "status"
    assert "metadata" not in led["requests"][2]["body"] and "amount=2000" in led["requests"][2]["body"]
    async with session.post(
        ctl + "/faults", json={"faults": [{"kind": "reset"}, {"kind": "delay", "seconds": 0.1}], "replace": True}
    ) as r:
        ids = [f["id"] for f in (await r.json())["faults"]]
    async with session.delete(ctl + f"/faults/{ids[0]}") as r:
        assert r.status == 200
    assert [f.kind for f in stripe_fake.faults.rules] == ["delay"]
    async with session.delete(ctl + "/faults") as r:
        assert r.status == 200 and len(stripe_fake.faults) == 0
    async with session.post(ctl + "/reset") as r:
        assert r.status == 200
    assert stripe_fake.ledger.requests == [] and stripe_fake.ledger.side_effects == []
    async with session.post(url, data=form, headers={**STRIPE_AUTH, "Idempotency-Key": "h1"}) as r:
        assert "Idempotent-Replayed" not in r.headers  # state was reset too


async def test_shared_ledger_and_faults_objects() -> None:
    ledger, faults = Ledger("mine"), Faults()
    app = make_stripe_app(faults, ledger=ledger)
    async with FakeServer(app) as fake:
        assert fake.ledger is ledger and fake.faults is faults and fake.name == "stripe"
        assert fake.url == f"http://127.0.0.1:{fake.port}"


async def test_start_fakes() -> None:
    fakes = await start_fakes()
    try:
        assert set(fakes) == {"stripe", "paypal", "sendgrid", "mailgun"}
        assert len({f.port for f in fakes.values()}) == 4
        async with aiohttp.ClientSession() as s:
            for name, fake in fakes.items():
                async with s.get(fake.url + "/__fake__/health") as r:
                    assert (await r.json())["name"] == name
    finally:
        await stop_fakes(fakes)


@pytest.fixture
def cli_proc() -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fault = json.dumps({"kind": "status", "status": 503, "count": 1})
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakes", "echo", "--port", "0", "--fault", fault],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def test_cli_serves_and_stops_on_sigterm(cli_proc: subprocess.Popen[str]) -> None:
    assert cli_proc.stdout is not None
    line = await asyncio.to_thread(cli_proc.stdout.readline)
    url = line.strip()
    assert url.startswith("http://127.0.0.1:")
    async with aiohttp.ClientSession() as s:
        for expected in (503, 200):
            async with s.post(url + "/x") as r:
                assert r.status == expected
        async with s.get(url + "/__fake__/ledger") as r:
            assert len((await r.json())["requests"]) == 2
    cli_proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(cli_proc.wait, 10) == 0


async def test_stop_and_restart_on_same_port(echo: FakeServer) -> None:
    port = echo.port
    await echo.stop()
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorError):
            async with s.post(echo.url + "/x") as r:
                await r.read()
        await echo.start()
        assert echo.port == port and echo.running
        async with s.post(echo.url + "/x") as r:
            assert r.status == 200


# ------------------------------------------------------------------------------------------
# Webhooks the fakes send (opt-in)
# ------------------------------------------------------------------------------------------
class Endpoint:
    """A merchant's webhook endpoint: records every POST and answers the next of `statuses`
    (then 200)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[dict[str, str], bytes]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.posts.append((dict(request.headers), body))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200, text="ok")

    async def serve(self, run_app: Any) -> str:
        app = web.Application()
        app.router.add_post("/hooks", self.handle)
        return f"{(await run_app(app)).url}/hooks"


WHSEC = "whsec_fakes_test_0123456789"


async def test_fakes_send_no_webhooks_unless_asked(run_app: Any, session: aiohttp.ClientSession) -> None:
    endpoint = Endpoint()
    await endpoint.serve(run_app)
    async with FakeServer("stripe") as fake:
        async with session.post(
            fake.url + "/v1/payment_intents",
            data={"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
            headers=STRIPE_AUTH,
        ) as r:
            assert r.status == 200
        assert not fake.webhooks.enabled and await fake.webhooks.drain(1)
        assert fake.webhooks.events == [] and endpoint.posts == []


async def test_stripe_webhooks_verify_with_the_sdk_and_are_redelivered(run_app: Any) -> None:
    endpoint = Endpoint()
    url = await endpoint.serve(run_app)
    async with FakeServer("stripe", webhooks={"url": url, "redeliver": 1.0}, webhook_secret=WHSEC) as fake:
        client = _stripe_client(fake.url)
        params: dict[str, Any] = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        pi = await asyncio.to_thread(client.v1.payment_intents.create, params=params, options={"idempotency_key": "k1"})
        # An idempotent replay did nothing again: no second event.
        await asyncio.to_thread(client.v1.payment_intents.create, params=params, options={"idempotency_key": "k1"})
        with pytest.raises(stripe.CardError):
            await asyncio.to_thread(
                client.v1.payment_intents.create, params={**params, "payment_method": "pm_card_chargeDeclined"}
            )
        manual = await asyncio.to_thread(
            client.v1.payment_intents.create, params={**params, "amount": 3000, "capture_method": "manual"}
        )
        await asyncio.to_thread(client.v1.payment_intents.capture, manual.id)
        assert await fake.webhooks.drain(10)
    events = [stripe.Webhook.construct_event(body.decode(), h["Stripe-Signature"], WHSEC) for h, body in endpoint.posts]
    # Every event twice (redeliver: 1.0), same id and body, each try signed anew.
    assert len(events) == 6 and len({e.id for e in events}) == 3
    kinds = sorted((e.type, e.data.object.amount) for e in events)
    assert kinds == [
        ("payment_intent.payment_failed", 2000),
        ("payment_intent.payment_failed", 2000),
        ("payment_intent.succeeded", 2000),
        ("payment_intent.succeeded", 2000),
        ("payment_intent.succeeded", 3000),
        ("payment_intent.succeeded", 3000),
    ]
    ok = next(e for e in events if e.data.object.id == pi.id)
    assert ok.request.idempotency_key == "k1" and ok.data.object.status == "succeeded"
    assert fake.webhooks.delivered() == {e.id: 2 for e in events}
    # The SDK refuses what the fake did not sign, or signed with another secret.
    headers, body = endpoint.posts[0]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode().replace("2000", "9000"), headers["Stripe-Signature"], WHSEC)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), headers["Stripe-Signature"], "whsec_other")


async def test_webhook_retries_are_bounded(run_app: Any) -> None:
    flaky, down = Endpoint(500, 502), Endpoint(*([503] * 10))
    flaky_url, down_url = await flaky.serve(run_app), await down.serve(run_app)
    fast = {"attempts": 3, "backoff": 0.01}
    async with (
        FakeServer("stripe", webhooks={"url": flaky_url, **fast}) as ok_fake,
        FakeServer("stripe", webhooks={"url": down_url, **fast}) as down_fake,
        FakeServer("stripe", webhooks={"url": "http://127.0.0.1:9/hooks", **fast}) as refused_fake,
    ):
        for fake in (ok_fake, down_fake, refused_fake):
            await asyncio.to_thread(
                _stripe_client(fake.url).v1.payment_intents.create,
                params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
            )
            assert await fake.webhooks.drain(10)
        # Retried on a non-2xx, until the 2xx: three tries, one delivery.
        assert [a.status for a in ok_fake.webhooks.attempts] == [500, 502, 200] and len(flaky.posts) == 3
        assert ok_fake.webhooks.failed() == []
        # Never more than `attempts` tries, then given up (and listed).
        assert [a.status for a in down_fake.webhooks.attempts] == [503, 503, 503] and len(down.posts) == 3
        (event,) = down_fake.webhooks.events
        assert down_fake.webhooks.failed() == [(event.id, 1)] and down_fake.webhooks.delivered() == {}
        refused = refused_fake.webhooks.attempts
        assert len(refused) == 3 and all(a.status is None and a.error for a in refused)


async def test_paypal_capture_webhooks_verify_with_the_fakes_verify_api(
    run_app: Any, session: aiohttp.ClientSession
) -> None:
    endpoint = Endpoint()
    url = await endpoint.serve(run_app)
    async with FakeServer("paypal", webhooks={"url": url}, webhook_id="WH-TEST-1") as fake:
        async with session.post(
            fake.url + "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + base64.b64encode(b"id:secret").decode()},
        ) as r:
            auth = {"Authorization": "Bearer " + (await r.json())["access_token"]}
        order = {
            "intent": "CAPTURE",
            "purchase_units": [{"amount": {"currency_code": "USD", "value": "20.00"}}],
            "payment_source": {"card": {"vault_id": "V1"}},
        }
        async with session.post(
            fake.url + "/v2/checkout/orders", json=order, headers={**auth, "PayPal-Request-Id": "r1"}
        ) as r:
            assert r.status == 201
            created = await r.json()
        assert await fake.webhooks.drain(10)
        ((headers, body),) = endpoint.posts
        event = json.loads(body)
        assert event["event_type"] == "PAYMENT.CAPTURE.COMPLETED" and event["id"].startswith("WH-")
        capture = created["purchase_units"][0]["payments"]["captures"][0]
        assert event["resource"]["id"] == capture["id"]
        assert event["resource"]["supplementary_data"]["related_ids"]["order_id"] == created["id"]

        async def verify(webhook_event: Any, **change: str) -> tuple[int, Any]:
            request = {
                "auth_algo": headers["PAYPAL-AUTH-ALGO"],
                "cert_url": headers["PAYPAL-CERT-URL"],
                "transmission_id": headers["PAYPAL-TRANSMISSION-ID"],
                "transmission_sig": headers["PAYPAL-TRANSMISSION-SIG"],
                "transmission_time": headers["PAYPAL-TRANSMISSION-TIME"],
                "webhook_id": "WH-TEST-1",
                "webhook_event": webhook_event,
                **change,
            }
            async with session.post(
                fake.url + "/v1/notifications/verify-webhook-signature", json=request, headers=auth
            ) as r:
                return r.status, await r.json()

        assert await verify(event) == (200, {"verification_status": "SUCCESS"})
        tampered = {**event, "summary": "Payment completed for 9999.00 USD"}
        assert await verify(tampered) == (200, {"verification_status": "FAILURE"})
        assert await verify(event, webhook_id="WH-OTHER") == (200, {"verification_status": "FAILURE"})
        assert await verify(event, transmission_id="other") == (200, {"verification_status": "FAILURE"})
        status, answer = await verify(event, transmission_sig="")
        assert status == 400 and answer["name"] == "VALIDATION_ERROR"
        async with session.post(fake.url + "/v1/notifications/verify-webhook-signature", json={}) as r:
            assert r.status == 401  # behind PayPal's OAuth, like every endpoint


async def test_sendgrid_event_webhook_batches_verify_with_the_sdk(run_app: Any) -> None:
    from sendgrid.helpers.eventwebhook import EventWebhook

    from fakes.sendgrid import SENDGRID_WEBHOOKS

    endpoint = Endpoint(503)
    url = await endpoint.serve(run_app)
    async with FakeServer(
        "sendgrid", webhooks={"url": url, "backoff": 0.01}, webhook_batch=0.2, webhook_batch_size=3
    ) as fake:
        async with aiohttp.ClientSession() as s:
            for i in range(4):
                mail = {
                    "personalizations": [{"to": [{"email": f"c{i}@example.org"}]}],
                    "from": {"email": "shop@example.com"},
                    "subject": "s",
                    "content": [{"type": "text/plain", "value": "x"}],
                    "categories": ["receipts"],
                    "custom_args": {"email_id": str(i)},
                }
                async with s.post(fake.url + "/v3/mail/send", json=mail, headers={"Authorization": "Bearer SG.k"}) as r:
                    assert r.status == 202
        assert await fake.webhooks.drain(10)
        public_key = fake.app[SENDGRID_WEBHOOKS].public_key
    verifier = EventWebhook(public_key)
    delivered = []
    for headers, body in endpoint.posts:
        assert verifier.verify_signature(
            body.decode(),
            headers["X-Twilio-Email-Event-Webhook-Signature"],
            headers["X-Twilio-Email-Event-Webhook-Timestamp"],
        )
        delivered.append(json.loads(body))
    # A batch of 3 (the size), then the last one after the window; the first POST was
    # answered 503 and tried again.
    assert [len(b) for b in delivered] == [3, 3, 1]
    assert delivered[0] == delivered[1]
    events = [e for b in delivered[1:] for e in b]
    assert sorted(e["email_id"] for e in events) == ["0", "1", "2", "3"]
    assert {e["event"] for e in events} == {"delivered"} and events[0]["category"] == ["receipts"]
    assert not verifier.verify_signature(
        endpoint.posts[1][1].decode().replace("c0@", "cX@"),
        endpoint.posts[1][0]["X-Twilio-Email-Event-Webhook-Signature"],
        endpoint.posts[1][0]["X-Twilio-Email-Event-Webhook-Timestamp"],
    )


async def test_mailgun_webhooks_verify_with_the_sdk(run_app: Any) -> None:
    from mailgun.security import SecurityGuard

    endpoint = Endpoint()
    url = await endpoint.serve(run_app)
    async with FakeServer("mailgun", webhooks={"url": url}, webhook_signing_key="key-signing-1") as fake:
        async with aiohttp.ClientSession() as s:
            form = {"from": "shop@mg.example.com", "to": "Ann <ann@example.org>", "text": "x", "v:email_id": "7"}
            auth = {"Authorization": "Basic " + base64.b64encode(b"api:key-1").decode()}
            async with s.post(fake.url + "/v3/mg.example.com/messages", data=form, headers=auth) as r:
                message_id = (await r.json())["id"]
        assert await fake.webhooks.drain(10)
    ((_, body),) = endpoint.posts
    payload = json.loads(body)
    sig = payload["signature"]
    assert SecurityGuard.verify_webhook("key-signing-1", sig["token"], sig["timestamp"], sig["signature"])
    assert not SecurityGuard.verify_webhook("key-other", sig["token"], sig["timestamp"], sig["signature"])
    data = payload["event-data"]
    assert (data["event"], data["recipient"], data["user-variables"]) == (
        "delivered",
        "ann@example.org",
        {"email_id": "7"},
    )
    assert data["message"]["headers"]["message-id"] == message_id.strip("<>")


async def test_webhook_settings_over_the_control_api(run_app: Any, session: aiohttp.ClientSession) -> None:
    endpoint = Endpoint()
    url = await endpoint.serve(run_app)
    async with FakeServer("stripe") as fake:
        async with session.post(fake.url + "/__fake__/webhooks", json={"url": url, "redeliver": 2}) as r:
            assert r.status == 400 and not fake.webhooks.enabled  # nothing changes on an error
        async with session.post(fake.url + "/__fake__/webhooks", json={"url": url, "attempts": 2}) as r:
            assert r.status == 200 and (await r.json())["settings"]["attempts"] == 2
        await asyncio.to_thread(
            _stripe_client(fake.url).v1.payment_intents.create,
            params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
        )
        assert await fake.webhooks.drain(10)
        async with session.get(fake.url + "/__fake__/webhooks") as r:
            listed = await r.json()
        assert [e["type"] for e in listed["events"]] == ["payment_intent.succeeded"]
        assert listed["delivered"] == {listed["events"][0]["id"]: 1} and len(endpoint.posts) == 1
    with pytest.raises(ValueError, match="unknown webhooks settings"):
        FakeServer("stripe", webhooks={"uri": url})


async def test_a_courier_process_sends_the_same_webhooks(run_app: Any, session: aiohttp.ClientSession) -> None:
    """With a courier, the POSTs leave from a child process: signed, retried (bounded) and
    redelivered the same way, every try reported back to the fake."""
    from fakes.courier import Courier
    from fakes.paypal import PAYPAL_WEBHOOKS

    endpoint = Endpoint(503)
    url = await endpoint.serve(run_app)
    down = Endpoint(*([500] * 10))
    down_url = await down.serve(run_app)
    async with (
        Courier() as courier,
        FakeServer("stripe", webhooks={"url": url, "redeliver": 1.0, "backoff": 0.01}, webhook_secret=WHSEC) as fake,
        FakeServer("paypal", webhooks={"url": down_url, "attempts": 2, "backoff": 0.01}) as paypal,
    ):
        fake.webhooks.courier = paypal.webhooks.courier = courier
        pi = await asyncio.to_thread(
            _stripe_client(fake.url).v1.payment_intents.create,
            params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
        )
        async with session.post(
            paypal.url + "/v1/oauth2/token",
            data={"grant_type": "client_credentials"},
            headers={"Authorization": "Basic " + base64.b64encode(b"id:secret").decode()},
        ) as r:
            auth = {"Authorization": "Bearer " + (await r.json())["access_token"]}
        order = {
            "intent": "CAPTURE",
            "purchase_units": [{"amount": {"currency_code": "USD", "value": "20.00"}}],
            "payment_source": {"card": {"vault_id": "V1"}},
        }
        async with session.post(
            paypal.url + "/v2/checkout/orders", json=order, headers={**auth, "PayPal-Request-Id": "o"}
        ):
            pass
        assert await fake.webhooks.drain(10) and await paypal.webhooks.drain(10)
        # The PayPal POSTs the courier signed pass the fake's verify API.
        headers, body = down.posts[0]
        verify = {
            "auth_algo": headers["PAYPAL-AUTH-ALGO"],
            "cert_url": headers["PAYPAL-CERT-URL"],
            "transmission_id": headers["PAYPAL-TRANSMISSION-ID"],
            "transmission_sig": headers["PAYPAL-TRANSMISSION-SIG"],
            "transmission_time": headers["PAYPAL-TRANSMISSION-TIME"],
            "webhook_id": paypal.app[PAYPAL_WEBHOOKS].webhook_id,
            "webhook_event": json.loads(body),
        }
        async with session.post(
            paypal.url + "/v1/notifications/verify-webhook-signature", json=verify, headers=auth
        ) as r:
            assert await r.json() == {"verification_status": "SUCCESS"}
    # Stripe: the first try answered 503, retried, then the redelivery: three POSTs, two 2xx.
    assert [(a.delivery, a.attempt, a.status) for a in fake.webhooks.attempts] == [
        (1, 1, 503),
        (1, 2, 200),
        (2, 1, 200),
    ]
    events = [stripe.Webhook.construct_event(b.decode(), h["Stripe-Signature"], WHSEC) for h, b in endpoint.posts]
    assert {e.data.object.id for e in events} == {pi.id} and len(events) == 3
    # PayPal: two tries, then given up, as in process.
    assert [a.status for a in paypal.webhooks.attempts] == [500, 500] and len(paypal.webhooks.failed()) == 1


async def test_a_share_of_events_is_redelivered_evenly(run_app: Any) -> None:
    endpoint = Endpoint()
    url = await endpoint.serve(run_app)
    async with FakeServer("stripe", webhooks={"url": url, "redeliver": 0.5}) as fake:
        client = _stripe_client(fake.url)
        for amount in (1001, 1002, 1003, 1004):
            await asyncio.to_thread(
                client.v1.payment_intents.create,
                params={"amount": amount, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
            )
        assert await fake.webhooks.drain(10)
    # Every second event twice: the same event id and bytes both times.
    assert [fake.webhooks.delivered()[e.id] for e in fake.webhooks.events] == [1, 2, 1, 2]
    bodies = [body for _, body in endpoint.posts]
    assert len(bodies) == 6 and len(set(bodies)) == 4


async def test_a_fake_with_several_listening_sockets(session: aiohttp.ClientSession) -> None:
    fake = FakeServer("echo", listeners=4)
    with pytest.raises(ValueError):
        FakeServer("echo", listeners=0)
    async with fake:
        port = fake.port
        answers = await asyncio.gather(*(session.get(fake.url + f"/x{i}") for i in range(40)))
        assert {r.status for r in answers} == {200}
        for r in answers:
            r.release()
        await fake.stop()
        await fake.start()  # the same port again
        assert fake.port == port
        async with session.get(fake.url + "/again") as r:
            assert r.status == 200
    assert len(fake.ledger.requests) == 41
