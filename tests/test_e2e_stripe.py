"""The official Stripe SDK, pointed at egressd, against the packaged fake Stripe."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import requests
import stripe

from fakes.server import FakeServer
from tests.conftest import proxy_url


def client(base: str, retries: int = 0) -> stripe.StripeClient:
    session = requests.Session()
    session.trust_env = False  # never an HTTP_PROXY from the environment
    return stripe.StripeClient(
        "sk_test_e2e",
        base_addresses={"api": base},
        max_network_retries=retries,
        http_client=stripe.RequestsClient(session=session),
    )


@pytest.fixture
async def fake_stripe() -> Any:
    async with FakeServer("stripe") as fake:
        yield fake


async def test_payment_and_refund_through_egressd(fake_stripe: FakeServer, start_proxy: Any) -> None:
    server = await start_proxy(
        [
            {
                "upstream": "stripe",
                "target": fake_stripe.url,
                "provider": "stripe",
                "retry": {"attempts": 4, "backoff": {"initial": "10ms", "max": "50ms"}},
            }
        ]
    )
    sdk = client(proxy_url(server) + "/stripe")
    fake_stripe.faults.status(503, count=2, path="/v1/payment_intents")
    pi = await asyncio.to_thread(
        sdk.v1.payment_intents.create,
        params={
            "amount": 2000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": "42"},
        },
    )
    assert pi.status == "succeeded" and pi.amount == 2000
    assert fake_stripe.ledger.count("payment_intent.created") == 1  # two 503s absorbed, one charge
    got = await asyncio.to_thread(sdk.v1.payment_intents.retrieve, pi.id)
    assert got.id == pi.id
    refund = await asyncio.to_thread(sdk.v1.refunds.create, params={"payment_intent": pi.id, "amount": 500})
    assert refund.amount == 500 and refund.status == "succeeded"


async def test_proxy_made_errors_raise_the_sdks_own_classes(fake_stripe: FakeServer, start_proxy: Any) -> None:
    server = await start_proxy(
        [
            {
                "upstream": "stripe",
                "target": fake_stripe.url,
                "provider": "stripe",
                "rate_limit": {"rate": "1/m", "burst": 1},
                "timeouts": {"connect": "1s", "attempt": "1s", "total": "2s"},
            }
        ]
    )
    sdk = client(proxy_url(server) + "/stripe")
    params = {"amount": 100, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
    await asyncio.to_thread(sdk.v1.payment_intents.create, params=params)
    with pytest.raises(stripe.RateLimitError) as limited:
        await asyncio.to_thread(sdk.v1.payment_intents.create, params=params)
    assert "egressd" in str(limited.value) and limited.value.http_status == 429
    fake_stripe.faults.hang(seconds=5)
    server2 = await start_proxy(
        [
            {
                "upstream": "stripe",
                "target": fake_stripe.url,
                "provider": "stripe",
                "timeouts": {"connect": "1s", "attempt": "500ms", "total": "1s"},
            }
        ]
    )
    with pytest.raises(stripe.APIError) as timed_out:
        await asyncio.to_thread(client(proxy_url(server2) + "/stripe").v1.payment_intents.retrieve, "pi_123")
    assert timed_out.value.http_status == 504
    assert "egressd" in str(timed_out.value)
