"""End-to-end failover Stripe <-> PayPal with the official SDKs, egressd and the packaged fakes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe

from fakes import FakeServer
from tests.conftest import proxy_url

stripe.enable_telemetry = False

CROSSWALK = {"pm_card_visa": "8TX02017P3456"}


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("stripe", "paypal")}
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def stripe_policy(stripe_url: str, **failover: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "to": "paypal",
        "on": ["circuit_open", "exhausted", "connect_error", 503],
        "crosswalk": {"payment_methods": CROSSWALK},
    }
    rule.update(failover)
    return {
        "upstream": "stripe",
        "target": stripe_url,
        "provider": "stripe",
        "timeouts": {"connect": "1s", "attempt": "2s", "total": "10s"},
        "retry": {"attempts": 2, "backoff": {"initial": "5ms", "max": "10ms"}},
        "idempotency": {"replay_ttl": "24h"},
        "failover": [rule],
    }


def paypal_policy(paypal_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "upstream": "paypal",
        "target": paypal_url,
        "provider": "paypal",
        "auth": {
            "oauth_client_credentials": {
                "token_url": paypal_url + "/v1/oauth2/token",
                "client_id": "client-id-123",
                "client_secret": "secret-456",
            }
        },
        "retry": {"attempts": 2, "backoff": {"initial": "5ms", "max": "10ms"}},
        "idempotency": {"header": "PayPal-Request-Id", "generate": False},
        **extra,
    }


def client(base: str) -> stripe.StripeClient:
    return stripe.StripeClient("sk_test_123", base_addresses={"api": base + "/stripe"}, max_network_retries=0)


async def test_stripe_down_fails_over_to_paypal_and_follow_ups_route(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    sc = client(proxy_url(server))
    pi = await asyncio.to_thread(
        sc.v1.payment_intents.create,
        params={
            "amount": 2000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "metadata": {"order_id": "42"},
            "description": "Order 42",
        },
    )
    assert pi.id.startswith("pi_ppf_")
    assert pi.status == "succeeded"
    assert pi.amount == 2000 and pi.amount_received == 2000
    assert pi.metadata["order_id"] == "42"
    assert pf.ledger.count("order.captured") == 1
    assert sf.ledger.count("payment_intent.created") == 0
    # follow-ups go to PayPal even though Stripe is healthy again
    await sf.start()
    seen_by_stripe = len(sf.ledger.requests)
    got = await asyncio.to_thread(sc.v1.payment_intents.retrieve, pi.id)
    assert got.id == pi.id and got.status == "succeeded" and got.metadata["order_id"] == "42"
    rf = await asyncio.to_thread(sc.v1.refunds.create, params={"payment_intent": pi.id, "amount": 500})
    assert rf.id.startswith("re_ppf_") and rf.amount == 500 and rf.status == "succeeded"
    assert pf.ledger.count("refund.created") == 1
    again = await asyncio.to_thread(sc.v1.refunds.retrieve, rf.id)
    assert again.amount == 500
    assert len(sf.ledger.requests) == seen_by_stripe  # Stripe never saw the follow-ups

    async with aiohttp.ClientSession() as http:
        async with http.get(
            proxy_url(server) + f"/stripe/v1/payment_intents/{pi.id}", headers={"Authorization": "Bearer sk_test_123"}
        ) as resp:
            assert resp.headers["X-Egressd-Upstream"] == "paypal"
            assert resp.headers["X-Egressd-Failover"] == "used; from=stripe"


async def _stripe_error(sc: stripe.StripeClient, params: dict[str, Any]) -> stripe.StripeError:
    with pytest.raises(stripe.StripeError) as info:
        await asyncio.to_thread(sc.v1.payment_intents.create, params=params)
    return info.value


BASE = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}


@pytest.mark.parametrize(
    ("params", "reason", "detail"),
    [
        ({"payment_method": "pm_card_mastercard"}, "no_crosswalk_entry", "payment_method"),
        ({"currency": "kwd", "amount": 5120}, "unsupported_currency", "currency"),
        ({"currency": "inr"}, "unsupported_currency", "currency"),
        ({"currency": "huf", "amount": 150050}, "amount_not_representable", "amount"),
        ({"confirm": False}, "unsupported_operation", "confirm"),
        ({"receipt_email": "a@example.com"}, "unmappable_field", "receipt_email"),
        ({"application_fee_amount": 100}, "unmappable_field", "application_fee_amount"),
        ({"payment_method_options": {"card": {"request_three_d_secure": "any"}}}, "lossy", "payment_method_options"),
        ({"expand": ["customer"]}, "lossy", "expand"),  # a Customer object cannot be built from PayPal's answer
        (
            {"expand": ["latest_charge.balance_transaction"], "setup_future_usage": "off_session"},
            "lossy",
            "setup_future_usage,expand",
        ),
    ],
)
async def test_refusals_return_the_primary_error_and_say_why(
    start_proxy: Any, fakes: dict[str, FakeServer], params: dict[str, Any], reason: str, detail: str
) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    err = await _stripe_error(client(proxy_url(server)), {**BASE, **params})
    assert err.http_status == 502  # the primary's own error: upstream_unreachable
    assert isinstance(err, stripe.APIError)
    assert err.headers is not None
    assert err.headers["X-Egressd-Failover"] == f"refused; reason={reason}; detail={detail}"
    assert err.headers["X-Egressd-Upstream"] == "stripe"
    # the SDK's message says the same, in the app's terms, and never a value
    names = detail.replace(",", ", ")
    assert err.user_message is not None and err.user_message.endswith(f"failover to paypal refused: {reason} ({names})")
    for value in ("pm_card_mastercard", "a@example.com", "request_three_d_secure", "8TX02017P3456"):
        assert value not in err.user_message and value not in err.headers["X-Egressd-Failover"]
    assert len(pf.ledger.requests_to("/v2")) == 0


async def test_connect_header_refusal_names_the_header(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    with pytest.raises(stripe.APIError) as info:
        await asyncio.to_thread(
            client(proxy_url(server)).v1.payment_intents.create,
            params=BASE,
            options={"stripe_account": "acct_1Secret"},
        )
    err = info.value
    assert err.headers is not None
    assert err.headers["X-Egressd-Failover"] == "refused; reason=unmappable_field; detail=Stripe-Account"
    assert str(err.user_message).endswith("failover to paypal refused: unmappable_field (Stripe-Account)")
    assert "acct_1Secret" not in str(err.user_message)


async def test_expand_latest_charge_and_payment_method_are_honoured(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    """`expand[]` shapes the answer only: the translation builds the expanded objects from
    PayPal's answer, so the app's `pi.latest_charge.status` keeps working after failover."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    sc = client(proxy_url(server))
    pi = await asyncio.to_thread(
        sc.v1.payment_intents.create, params={**BASE, "expand": ["latest_charge", "payment_method"]}
    )
    assert pi.status == "succeeded" and pi.id.startswith("pi_ppf_")
    charge = pi.latest_charge
    assert isinstance(charge, stripe.Charge)
    assert charge.id.startswith("ch_ppf_") and charge.object == "charge"
    assert charge.status == "succeeded" and charge.captured and charge.paid
    assert charge.amount == 2000 and charge.amount_captured == 2000 and charge.currency == "usd"
    assert charge.payment_intent == pi.id
    pm = pi.payment_method
    assert isinstance(pm, stripe.PaymentMethod)
    assert pm.id == "pm_card_visa" and pm.type == "card"
    assert pm.card is not None and pm.card.brand == "visa" and pm.card.last4 == "1111"
    assert pf.ledger.count("order.captured") == 1
    # the same on a retrieve of the failed-over PaymentIntent
    again = await asyncio.to_thread(sc.v1.payment_intents.retrieve, pi.id, params={"expand": ["latest_charge"]})
    assert isinstance(again.latest_charge, stripe.Charge) and again.latest_charge.id == charge.id
    plain = await asyncio.to_thread(sc.v1.payment_intents.retrieve, pi.id)
    assert plain.latest_charge == charge.id  # not asked for: the id, as Stripe does


async def test_follow_up_that_cannot_be_expressed_at_the_owner_says_why(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    """A refund of a PaymentIntent that lives at PayPal, with a parameter PayPal cannot
    take: egressd answers itself (the primary does not know the id) and says why."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    sc = client(proxy_url(server))
    pi = await asyncio.to_thread(sc.v1.payment_intents.create, params=BASE)
    await sf.start()
    with pytest.raises(stripe.InvalidRequestError) as info:
        await asyncio.to_thread(sc.v1.refunds.create, params={"payment_intent": pi.id, "refund_application_fee": True})
    err = info.value
    assert err.http_status == 400 and err.headers is not None
    assert err.headers["X-Egressd-Failover"] == "refused; reason=unmappable_field; detail=refund_application_fee"
    assert str(err.user_message).endswith("failover to paypal refused: unmappable_field (refund_application_fee)")
    assert pf.ledger.count("refund.created") == 0 and len(sf.ledger.requests_to("/v1/refunds")) == 0


async def test_expand_on_manual_capture(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    sc = client(proxy_url(server))
    pi = await asyncio.to_thread(
        sc.v1.payment_intents.create, params={**BASE, "capture_method": "manual", "expand": ["latest_charge"]}
    )
    assert pi.status == "requires_capture"
    assert isinstance(pi.latest_charge, stripe.Charge)
    assert pi.latest_charge.captured is False and pi.latest_charge.amount_captured == 0
    captured = await asyncio.to_thread(sc.v1.payment_intents.capture, pi.id, params={"expand": ["latest_charge"]})
    assert captured.status == "succeeded"
    assert isinstance(captured.latest_charge, stripe.Charge) and captured.latest_charge.status == "succeeded"


async def test_lossy_allowed_by_policy(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url, allow_lossy=True), paypal_policy(pf.url)])
    pi = await asyncio.to_thread(
        client(proxy_url(server)).v1.payment_intents.create,
        params={**BASE, "payment_method_options": {"card": {"request_three_d_secure": "any"}}},
    )
    assert pi.status == "succeeded" and pf.ledger.count("order.captured") == 1


async def test_zero_decimal_currency_converts(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    pi = await asyncio.to_thread(
        client(proxy_url(server)).v1.payment_intents.create, params={**BASE, "amount": 500, "currency": "jpy"}
    )
    assert pi.amount == 500 and pi.currency == "jpy"
    order = pf.ledger.effects("order.created")[0]
    assert order.data["amount"] == {"currency_code": "JPY", "value": "500"}


async def test_ambiguous_timeout_never_fails_over(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    sf.faults.delay(1.0, path="/v1/payment_intents")
    policy = stripe_policy(sf.url, on=["timeout", "exhausted", 503])
    policy["timeouts"] = {"connect": "1s", "attempt": "200ms", "total": "5s"}
    policy["retry"]["attempts"] = 1
    server = await start_proxy([policy, paypal_policy(pf.url)])
    err = await _stripe_error(client(proxy_url(server)), BASE)
    assert err.http_status == 504
    assert err.headers is not None
    assert err.headers["X-Egressd-Failover"] == "refused; reason=ambiguous; detail=timeout"
    assert str(err.user_message).endswith("failover to paypal refused: ambiguous (timeout)")
    assert pf.ledger.count("order.created") == 0


async def test_ambiguous_timeout_probe_answers(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    sf.faults.delay(1.0, path="/v1/payment_intents", count=1)
    policy = stripe_policy(sf.url, on=["timeout"])
    policy["timeouts"] = {"connect": "1s", "attempt": "200ms", "total": "5s"}
    policy["retry"]["attempts"] = 1
    server = await start_proxy([policy, paypal_policy(pf.url)])
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy_url(server) + "/stripe/v1/payment_intents",
            data="amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true",
            headers={
                "Authorization": "Bearer sk_test_1",
                "Idempotency-Key": "probe-1",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        ) as resp:
            body = await resp.json()
            assert resp.status == 200, body
            assert resp.headers["X-Egressd-Upstream"] == "stripe"
            assert resp.headers["X-Egressd-Failover"].startswith("skipped; reason=ambiguous")
    assert body["id"].startswith("pi_3")
    assert sf.ledger.count("charge.succeeded") == 1 and pf.ledger.count("order.created") == 0


async def test_circuit_open_connect_error_manual_capture_and_replay(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    dead = sf.url
    await sf.stop()  # connection refused: provably never sent
    policy = stripe_policy(dead)
    policy["circuit_breaker"] = {"window": "30s", "min_requests": 1, "failure_rate": 0.5, "open_for": "30s"}
    server = await start_proxy([policy, paypal_policy(pf.url)])
    sc = client(proxy_url(server))
    params = {**BASE, "capture_method": "manual"}
    pi = await asyncio.to_thread(sc.v1.payment_intents.create, params=params, options={"idempotency_key": "k-1"})
    assert pi.status == "requires_capture" and pi.amount_capturable == 2000
    # same key again: proxy-side replay, no second PayPal side effect
    again = await asyncio.to_thread(sc.v1.payment_intents.create, params=params, options={"idempotency_key": "k-1"})
    assert again.id == pi.id
    assert pf.ledger.count("order.authorized") == 1
    captured = await asyncio.to_thread(sc.v1.payment_intents.capture, pi.id)
    assert captured.status == "succeeded" and captured.amount_received == 2000
    assert pf.ledger.count("authorization.captured") == 1
    # the circuit is open now: still fails over
    pi2 = await asyncio.to_thread(sc.v1.payment_intents.create, params=BASE)
    assert pi2.status == "succeeded"


async def test_decline_at_paypal_is_a_card_error(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    server = await start_proxy(
        [stripe_policy(sf.url, crosswalk={"payment_methods": {"pm_card_visa": "DECLINE123"}}), paypal_policy(pf.url)]
    )
    err = await _stripe_error(client(proxy_url(server)), BASE)
    assert isinstance(err, stripe.CardError) and err.code == "card_declined"
    assert err.headers is not None and err.headers["X-Egressd-Failover"] == "used; from=stripe"


async def test_fallback_token_failure_is_not_a_401(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    pf.faults.status(401, path="/v1/oauth2/token", body='{"error":"invalid_client"}')
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    err = await _stripe_error(client(proxy_url(server)), BASE)
    assert err.http_status == 502 and isinstance(err, stripe.APIError)
    assert "egressd" in str(err)
    assert (
        err.headers is not None
        and err.headers["X-Egressd-Failover"] == "failed; to=paypal; reason=upstream_auth_failed"
    )


# ---- PayPal -> Stripe with the official PayPal SDK -------------------------------------------


def paypal_client(base: str) -> Any:
    import time

    from paypalserversdk.configuration import Environment, Server
    from paypalserversdk.http.auth.o_auth_2 import ClientCredentialsAuthCredentials
    from paypalserversdk.models.o_auth_token import OAuthToken
    from paypalserversdk.paypal_serversdk_client import PaypalServersdkClient

    tok = OAuthToken(access_token="APPTOKEN", token_type="Bearer", expires_in=3600, expiry=int(time.time()) + 3600)
    creds = ClientCredentialsAuthCredentials(o_auth_client_id="id", o_auth_client_secret="s", o_auth_token=tok)
    pp = PaypalServersdkClient(client_credentials_auth_credentials=creds, environment=Environment.SANDBOX)
    pp.config.environments = {Environment.SANDBOX: {Server.DEFAULT: base + "/paypal"}}
    return pp


def reverse_policies(stripe_url: str, paypal_url: str, **rule: Any) -> list[dict[str, Any]]:
    failover: dict[str, Any] = {
        "to": "stripe",
        "on": ["circuit_open", "exhausted", "connect_error", 503],
        "crosswalk": {"payment_methods": {"8TX02017P3456": "pm_card_visa"}},
        **rule,
    }
    return [
        {
            "upstream": "paypal",
            "target": paypal_url,
            "provider": "paypal",
            "retry": {"attempts": 1},
            "idempotency": {"header": "PayPal-Request-Id", "generate": False},
            "failover": [failover],
        },
        {"upstream": "stripe", "target": stripe_url, "provider": "stripe", "auth": {"bearer": "sk_test_proxy"}},
    ]


def _order(vault: str | None = "8TX02017P3456", intent: str = "CAPTURE", units: int = 1) -> Any:
    from paypalserversdk.models.amount_with_breakdown import AmountWithBreakdown
    from paypalserversdk.models.card_request import CardRequest
    from paypalserversdk.models.checkout_payment_intent import CheckoutPaymentIntent
    from paypalserversdk.models.order_request import OrderRequest
    from paypalserversdk.models.payment_source import PaymentSource
    from paypalserversdk.models.purchase_unit_request import PurchaseUnitRequest

    pus = [
        PurchaseUnitRequest(
            reference_id=f"u{i}", custom_id="order-42", amount=AmountWithBreakdown(currency_code="USD", value="20.00")
        )
        for i in range(units)
    ]
    source = PaymentSource(card=CardRequest(vault_id=vault)) if vault else None
    return OrderRequest(intent=getattr(CheckoutPaymentIntent, intent), purchase_units=pus, payment_source=source)


async def test_paypal_down_fails_over_to_stripe(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await pf.stop()  # PayPal down: connection refused, provably not processed
    server = await start_proxy(reverse_policies(sf.url, pf.url))
    pp = paypal_client(proxy_url(server))
    r = await asyncio.to_thread(
        pp.orders.create_order,
        {"body": _order(), "prefer": "return=representation", "paypal_request_id": "order-42-create"},
    )
    assert r.status_code == 201
    assert r.body.status == "COMPLETED" and r.body.id.startswith("EGF")
    cap = r.body.purchase_units[0].payments.captures[0]
    assert cap.status == "COMPLETED" and cap.amount.value == "20.00"
    assert sf.ledger.count("charge.succeeded") == 1
    pi_req = sf.ledger.requests_to("/v1/payment_intents", "POST")[0]
    assert pi_req.header("Authorization") == "Bearer sk_test_proxy"
    assert "metadata[paypal_custom_id]=order-42" in (pi_req.body or b"").decode()
    # replay with the same PayPal-Request-Id: no second charge
    r2 = await asyncio.to_thread(
        pp.orders.create_order,
        {"body": _order(), "prefer": "return=representation", "paypal_request_id": "order-42-create"},
    )
    assert r2.body.id == r.body.id and sf.ledger.count("charge.succeeded") == 1
    # follow-ups: get order, refund the capture, get the refund: all at Stripe
    await pf.start()
    got = await asyncio.to_thread(pp.orders.get_order, {"id": r.body.id})
    assert got.body.status == "COMPLETED"
    from paypalserversdk.models.money import Money
    from paypalserversdk.models.refund_request import RefundRequest

    rf = await asyncio.to_thread(
        pp.payments.refund_captured_payment,
        {
            "capture_id": cap.id,
            "body": RefundRequest(amount=Money(currency_code="USD", value="5.00")),
            "paypal_request_id": "refund-1",
        },
    )
    assert rf.body.status == "COMPLETED" and rf.body.amount.value == "5.00"
    assert sf.ledger.count("refund.created") == 1
    got_rf = await asyncio.to_thread(pp.payments.get_refund, {"refund_id": rf.body.id})
    assert got_rf.body.id == rf.body.id
    assert len(pf.ledger.requests_to("/v2")) == 0  # PayPal never saw the create, its repeat or the follow-ups


@pytest.mark.parametrize(
    ("order", "reason", "detail"),
    [
        ({"vault": "UNKNOWNVAULT"}, "no_crosswalk_entry", "payment_source.card.vault_id"),
        ({"vault": None}, "buyer_approval_required", "payment_source"),
        ({"units": 2}, "multiple_purchase_units", "purchase_units"),
    ],
)
async def test_paypal_refusals(
    start_proxy: Any, fakes: dict[str, FakeServer], order: dict[str, Any], reason: str, detail: str
) -> None:
    from paypalserversdk.exceptions.error_exception import ErrorException

    sf, pf = fakes["stripe"], fakes["paypal"]
    await pf.stop()  # PayPal down: connection refused, provably not processed
    server = await start_proxy(reverse_policies(sf.url, pf.url))
    pp = paypal_client(proxy_url(server))
    with pytest.raises(ErrorException) as info:
        await asyncio.to_thread(pp.orders.create_order, {"body": _order(**order), "paypal_request_id": "x-1"})
    assert info.value.response_code == 502
    assert info.value.response.headers["X-Egressd-Failover"] == f"refused; reason={reason}; detail={detail}"
    assert info.value.message.endswith(f"failover to stripe refused: {reason} ({detail})")
    assert "UNKNOWNVAULT" not in info.value.message
    assert sf.ledger.count("payment_intent.created") == 0


async def test_paypal_decline_at_stripe(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    from paypalserversdk.exceptions.error_exception import ErrorException

    sf, pf = fakes["stripe"], fakes["paypal"]
    await pf.stop()  # PayPal down: connection refused, provably not processed
    server = await start_proxy(
        reverse_policies(sf.url, pf.url, crosswalk={"payment_methods": {"8TX02017P3456": "pm_card_chargeDeclined"}})
    )
    with pytest.raises(ErrorException) as info:
        await asyncio.to_thread(
            paypal_client(proxy_url(server)).orders.create_order, {"body": _order(), "paypal_request_id": "d-1"}
        )
    err = info.value
    assert err.response_code == 422 and err.name == "UNPROCESSABLE_ENTITY"
    assert err.details[0].issue == "INSTRUMENT_DECLINED"


async def test_fallback_down_is_failed_in_primary_shape(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()  # Stripe down: connection refused, provably not processed
    pf.faults.outage(60, path="/v2")
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    err = await _stripe_error(client(proxy_url(server)), BASE)
    assert isinstance(err, stripe.APIError) and err.http_status == 500
    assert err.headers is not None and err.headers["X-Egressd-Failover"] == "used; from=stripe"
    assert err.headers["Stripe-Should-Retry"] == "true"  # PayPal-Request-Id makes the resend safe


# ---- 5xx answers to unsafe calls are ambiguous ------------------------------------------------

FORM = "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true"


async def _post_pi(server: Any, key: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy_url(server) + "/stripe/v1/payment_intents",
            data=FORM,
            headers={
                "Authorization": "Bearer sk_test_123",
                "Content-Type": "application/x-www-form-urlencoded",
                "Idempotency-Key": key,
            },
        ) as r:
            return r.status, dict(r.headers), await r.text()


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_stripe_5xx_after_processing_never_fails_over(
    start_proxy: Any, fakes: dict[str, FakeServer], status: int
) -> None:
    """Stripe charged, then answered 5xx: failing over would charge the customer twice."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    sf.faults.status(status, path="/v1/payment_intents", processed=True)
    policy = stripe_policy(sf.url, on=["circuit_open", "exhausted", 500, 502, 503, 504])
    policy["retry"]["on"] = [429, 500, 502, 503, 504, "connect_error", "timeout"]
    server = await start_proxy([policy, paypal_policy(pf.url)])
    got, headers, _body = await _post_pi(server, "abc123")
    assert got == status  # the primary's own answer (Stripe replays its stored result to the probe)
    assert headers["X-Egressd-Failover"] == f"refused; reason=ambiguous; detail={status}"
    assert headers["X-Egressd-Upstream"] == "stripe"
    assert sf.ledger.count("payment_intent.created") == 1
    assert pf.ledger.count("order.captured") == 0 and pf.ledger.count("order.created") == 0


async def test_stripe_503_outage_fails_over_once_the_circuit_is_open(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    """A 503 nobody documents as "not processed" is ambiguous for a POST; the breaker then
    opens, and calls that are never sent (circuit_open) do fail over."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    sf.faults.outage(60)
    policy = stripe_policy(sf.url)
    policy["circuit_breaker"] = {"window": "30s", "min_requests": 2, "failure_rate": 0.5, "open_for": "30s"}
    server = await start_proxy([policy, paypal_policy(pf.url)])
    got, headers, _ = await _post_pi(server, "k-1")
    assert got == 503 and headers["X-Egressd-Failover"] == "refused; reason=ambiguous; detail=503"
    assert pf.ledger.count("order.created") == 0
    got, headers, body = await _post_pi(server, "k-2")
    assert got == 200, body
    assert headers["X-Egressd-Upstream"] == "paypal" and headers["X-Egressd-Failover"] == "used; from=stripe"
    assert pf.ledger.count("order.captured") == 1


async def test_failover_attempts_add_up_and_replay_names_the_fallback(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()
    server = await start_proxy([stripe_policy(sf.url), paypal_policy(pf.url)])
    got, headers, body = await _post_pi(server, "attempts-1")
    assert got == 200, body
    paypal_sends = len(pf.ledger.requests_to("/v2"))
    assert paypal_sends >= 1
    # two connect errors at Stripe (retry.attempts: 2), then one attempt per PayPal send
    assert headers["X-Egressd-Attempts"] == str(2 + paypal_sends)
    assert headers["X-Egressd-Upstream"] == "paypal"
    again, replay_headers, replay_body = await _post_pi(server, "attempts-1")
    assert again == 200 and replay_body == body
    assert replay_headers["Idempotent-Replayed"] == "true"
    assert replay_headers["X-Egressd-Upstream"] == "paypal"
    assert len(pf.ledger.requests_to("/v2")) == paypal_sends
