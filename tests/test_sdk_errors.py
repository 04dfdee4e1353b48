"""Proxy-made answers (unreachable, rate limited) parse in every official SDK."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import stripe
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

from tests.conftest import proxy_url
from tests.test_failover_payments import _order, paypal_client

stripe.enable_telemetry = False


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def policy(name: str, provider: Any, **extra: Any) -> dict[str, Any]:
    return {"upstream": name, "target": dead_url(), "provider": provider, "retry": {"attempts": 1}, **extra}


async def test_stripe_sdk(start_proxy: Any) -> None:
    limited = policy("stripe", "stripe", rate_limit={"rate": "1/m", "burst": 1})
    server = await start_proxy([limited])
    sc = stripe.StripeClient("sk_test_1", base_addresses={"api": proxy_url(server) + "/stripe"}, max_network_retries=0)
    with pytest.raises(stripe.APIError) as info:
        await asyncio.to_thread(sc.v1.payment_intents.retrieve, "pi_1")
    assert info.value.http_status == 502 and "egressd: cannot connect" in str(info.value)
    with pytest.raises(stripe.RateLimitError) as limit:
        await asyncio.to_thread(sc.v1.payment_intents.retrieve, "pi_1")
    assert limit.value.http_status == 429 and "egressd" in str(limit.value)


async def test_sendgrid_sdk(start_proxy: Any) -> None:
    server = await start_proxy([policy("sendgrid", "sendgrid")])
    client = SendGridAPIClient("SG.k", host=proxy_url(server) + "/sendgrid")
    with pytest.raises(HTTPError) as info:
        await asyncio.to_thread(client.client.mail.send.post, request_body={"personalizations": []})
    assert info.value.status_code == 502
    assert info.value.to_dict["errors"][0]["message"].startswith("egressd: ")


async def test_paypal_sdk(start_proxy: Any) -> None:
    from paypalserversdk.exceptions.error_exception import ErrorException

    server = await start_proxy([policy("paypal", "paypal")])
    with pytest.raises(ErrorException) as info:
        await asyncio.to_thread(paypal_client(proxy_url(server)).orders.create_order, {"body": _order()})
    err = info.value
    assert err.response_code == 502 and err.name == "SERVICE_UNAVAILABLE"
    assert err.message.startswith("egressd: ") and err.debug_id
    assert err.details[0].issue == "UPSTREAM_UNREACHABLE"
    assert "egressd" in str(err)


async def test_mailgun_sdk(start_proxy: Any) -> None:
    from mailgun.client import Client
    from mailgun.config import RetryPolicy

    server = await start_proxy([policy("mailgun", {"name": "mailgun", "domain": "mg.example.com"})])

    def send() -> Any:
        with Client(
            auth=("api", "key"), api_url=proxy_url(server) + "/mailgun", retry_policy=RetryPolicy(max_retries=0)
        ) as mg:
            return mg.messages.create(
                domain="mg.example.com", data={"from": "a@example.com", "to": "b@example.org", "text": "x"}
            )

    resp = await asyncio.to_thread(send)
    assert resp.status_code == 502 and resp.json()["message"].startswith("egressd: ")


async def test_stripe_sdk_idempotency_mismatch_is_an_idempotency_error(start_proxy: Any) -> None:
    """A key reused with other parameters: Stripe's own shape (400, `idempotency_error`),
    so code that catches `stripe.IdempotencyError` works through egressd (issue 13 item 11)."""
    from fakes import FakeServer

    async with FakeServer("stripe") as sf:
        doc = {"upstream": "stripe", "target": sf.url, "provider": "stripe", "idempotency": {"replay_ttl": "24h"}}
        server = await start_proxy([doc])
        sc = stripe.StripeClient(
            "sk_test_1", base_addresses={"api": proxy_url(server) + "/stripe"}, max_network_retries=0
        )
        params = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        await asyncio.to_thread(sc.v1.payment_intents.create, params=params, options={"idempotency_key": "order-7"})
        with pytest.raises(stripe.IdempotencyError) as info:
            await asyncio.to_thread(
                sc.v1.payment_intents.create, params={**params, "amount": 2500}, options={"idempotency_key": "order-7"}
            )
        assert info.value.http_status == 400
        assert info.value.headers is not None and info.value.headers["X-Egressd-Error"] == "idempotency_mismatch"
        assert sf.ledger.count("payment_intent.created") == 1
