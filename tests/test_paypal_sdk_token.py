"""One paypal upstream for the app's SDK and for failover (issue 13 item 3).

With `auth: oauth_client_credentials` (which failover to PayPal needs), the official
paypal-server-sdk still fetches its own token: its `POST /v1/oauth2/token` (the app's
Basic credentials) passes through untouched (`PayPalPlugin.app_auth_paths`), and its API
calls carry egressd's token (the app's Bearer is replaced, as for every call).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import aiohttp
import pytest

from fakes import FakeServer
from tests.conftest import proxy_url

APP_ID, APP_SECRET = "app-client-id", "app-secret-789"
PROXY_ID, PROXY_SECRET = "egressd-client-id", "egressd-secret-456"


def _basic(cid: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{cid}:{secret}".encode()).decode()


def paypal_policy(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": "paypal",
        "target": url,
        "provider": "paypal",
        "auth": {
            "oauth_client_credentials": {
                "token_url": url + "/v1/oauth2/token",
                "client_id": PROXY_ID,
                "client_secret": PROXY_SECRET,
            }
        },
        "retry": {"attempts": 2, "backoff": {"initial": "5ms", "max": "10ms"}},
        "idempotency": {"header": "PayPal-Request-Id", "generate": False},
        **extra,
    }


def sdk_client(base: str, client_id: str = APP_ID, secret: str = APP_SECRET) -> Any:
    """The official SDK as an app configures it: its own credentials, no pre-seeded token."""
    from paypalserversdk.configuration import Environment, Server
    from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials
    from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

    creds = ClientCredentialsAuthCredentials(o_auth_client_id=client_id, o_auth_client_secret=secret)
    pp = PaypalServersdkClient(client_credentials_auth_credentials=creds, environment=Environment.SANDBOX)
    pp.config.environments = {Environment.SANDBOX: {Server.DEFAULT: base + "/paypal"}}
    return pp


def create_order(pp: Any, key: str = "order-42-create") -> Any:
    from paypalserversdk.models.amount_with_breakdown import AmountWithBreakdown
    from paypalserversdk.models.checkout_payment_intent import CheckoutPaymentIntent
    from paypalserversdk.models.order_request import OrderRequest
    from paypalserversdk.models.purchase_unit_request import PurchaseUnitRequest

    body = OrderRequest(
        intent=CheckoutPaymentIntent.CAPTURE,
        purchase_units=[PurchaseUnitRequest(amount=AmountWithBreakdown(currency_code="USD", value="20.00"))],
    )
    return pp.orders.create_order({"body": body, "paypal_request_id": key})


def _fakes() -> FakeServer:
    # Two PayPal apps of the same merchant: the app's and egressd's; both get valid tokens.
    return FakeServer("paypal", clients={APP_ID: APP_SECRET, PROXY_ID: PROXY_SECRET})


async def test_sdk_token_call_passes_through_and_orders_use_egressd_token(
    start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with _fakes() as pf:
        server = await start_proxy([paypal_policy(pf.url)])
        pp = sdk_client(proxy_url(server))
        created = await asyncio.to_thread(create_order, pp)
        assert created.status_code == 201, created.text
        assert created.body.id and created.body.status == "CREATED"
        again = await asyncio.to_thread(create_order, pp, "order-43-create")  # the SDK reuses its cached token
        assert again.status_code == 201

        # The SDK's token call reached PayPal with the app's own Basic credentials, once.
        issued = {e.data["client_id"]: e.object_id for e in pf.ledger.effects("token.issued")}
        assert set(issued) == {APP_ID, PROXY_ID}
        assert pf.ledger.count("token.issued") == 2  # one each: the app's and egressd's
        token_calls = pf.ledger.requests_to("/v1/oauth2/token", "POST")
        auths = sorted(r.header("Authorization") or "" for r in token_calls)
        assert auths == sorted([_basic(APP_ID, APP_SECRET), _basic(PROXY_ID, PROXY_SECRET)])
        assert not any(a.startswith("Bearer ") for a in auths)  # never egressd's token

        # The order calls carried egressd's token, not the app's (replaced, as always).
        orders = pf.ledger.requests_to("/v2/checkout/orders", "POST")
        assert len(orders) == 2
        for r in orders:
            auth = r.header("Authorization") or ""
            assert auth.startswith("Bearer " + issued[PROXY_ID]), auth[:20]
            assert not auth.startswith("Bearer " + issued[APP_ID])

    # Neither secret (nor either token, nor the Basic credentials) is logged.
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    assert caplog.records  # egressd did log (its access lines), just not the secrets
    for secret in (APP_SECRET, PROXY_SECRET, _basic(APP_ID, APP_SECRET)[6:], _basic(PROXY_ID, PROXY_SECRET)[6:]):
        assert secret not in logged
    for prefix in issued.values():
        assert prefix not in logged


async def test_app_token_call_with_wrong_credentials_gets_paypals_401(start_proxy: Any) -> None:
    """The app's own credentials are the app's business: PayPal's 401 reaches it as is
    (no refresh-and-resend, no `upstream_auth_failed`), and egressd fetches no token."""
    async with _fakes() as pf:
        server = await start_proxy([paypal_policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            async with http.post(
                proxy_url(server) + "/paypal/v1/oauth2/token",
                data="grant_type=client_credentials",
                headers={
                    "Authorization": _basic(APP_ID, "wrong"),
                    "Content-Type": "application/x-www-form-urlencoded",
                },
            ) as r:
                status, headers, body = r.status, r.headers, await r.json()
        assert status == 401
        assert "X-Egressd-Error" not in headers
        assert body["error"] == "invalid_client"
        assert pf.ledger.count("token.issued") == 0
        token_calls = pf.ledger.requests_to("/v1/oauth2/token", "POST")
        assert [r.header("Authorization") for r in token_calls] == [_basic(APP_ID, "wrong")]


async def test_static_auth_also_leaves_the_token_call_alone(start_proxy: Any) -> None:
    """`auth: bearer` is injected everywhere but on the provider's own token endpoint."""
    async with FakeServer("paypal", clients={APP_ID: APP_SECRET}, extra_tokens={"STATIC"}) as pf:
        server = await start_proxy([paypal_policy(pf.url, auth={"bearer": "STATIC"})])
        pp = sdk_client(proxy_url(server))
        created = await asyncio.to_thread(create_order, pp)
        assert created.status_code == 201, created.text
        [token_call] = pf.ledger.requests_to("/v1/oauth2/token", "POST")
        assert token_call.header("Authorization") == _basic(APP_ID, APP_SECRET)
        [order] = pf.ledger.requests_to("/v2/checkout/orders", "POST")
        assert order.header("Authorization") == "Bearer STATIC"


async def test_the_apps_token_is_never_recorded_or_collapsed(start_proxy: Any) -> None:
    """The token endpoint's answer is the app's credential: the idempotency stage neither
    generates a key for it, nor records it (it would reach the data dir), nor collapses two
    identical token calls into one answer within the fingerprint window."""
    async with _fakes() as pf:
        idem = {"header": "PayPal-Request-Id", "generate": True, "fingerprint_window": "10m"}
        server = await start_proxy([paypal_policy(pf.url, idempotency=idem)])
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.post(
                    proxy_url(server) + "/paypal/v1/oauth2/token",
                    data="grant_type=client_credentials",
                    headers={
                        "Authorization": _basic(APP_ID, APP_SECRET),
                        "Content-Type": "application/x-www-form-urlencoded",
                    },
                ) as r:
                    assert r.status == 200 and "Idempotent-Replayed" not in r.headers
        token_calls = pf.ledger.requests_to("/v1/oauth2/token", "POST")
        assert len(token_calls) == 2
        assert all(c.header("PayPal-Request-Id") is None for c in token_calls)
