"""Inbound webhooks, the pure half: provider signatures checked against the official SDKs
(stripe, sendgrid, mailgun), event splitting, and fallback -> primary event translation
(contract 7.5, 7.8). No I/O: plugins take bytes and secrets and return values."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

import pytest
import stripe
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from mailgun.security import SecurityGuard
from sendgrid.helpers.eventwebhook import EventWebhook

from plugins import pay_stripe_to_paypal as s2p
from plugins.base import FailoverContext, GenericPlugin, Translated, TranslatorRun, WireAnswer, WireRequest
from plugins.forms import encode_stripe_form
from plugins.mailgun import MailgunPlugin
from plugins.paypal import PayPalPlugin
from plugins.sendgrid import SendGridPlugin
from plugins.stripe import StripePlugin
from plugins.webhooks import (
    InboundEvent,
    TranslatedEvent,
    WebhookSecrets,
    array_spans,
    top_level_spans,
)

STRIPE = StripePlugin()
PAYPAL = PayPalPlugin()
SENDGRID = SendGridPlugin()
MAILGUN = MailgunPlugin()
WHSEC = "whsec_test_0123456789abcdef"
TOL = 300.0


# ---- Stripe ------------------------------------------------------------------------------------

STRIPE_EVENT = json.dumps(
    {
        "id": "evt_1NG8Du2eZvKYlo2CUI79vXWy",
        "object": "event",
        "api_version": "2026-06-24.dahlia",
        "created": 1_700_000_000,
        "data": {"object": {"id": "pi_3abc", "object": "payment_intent", "amount": 2000, "status": "succeeded"}},
        "livemode": False,
        "type": "payment_intent.succeeded",
    },
    indent=2,
).encode()


def test_stripe_sign_is_accepted_by_the_sdk() -> None:
    now = time.time()
    headers = STRIPE.sign_webhook(STRIPE_EVENT, WebhookSecrets(secret=WHSEC), now)
    assert headers is not None and set(headers) == {"Stripe-Signature"}
    assert headers["Stripe-Signature"].startswith(f"t={int(now)},v1=")
    event = stripe.Webhook.construct_event(STRIPE_EVENT, headers["Stripe-Signature"], WHSEC)
    assert event.id == "evt_1NG8Du2eZvKYlo2CUI79vXWy" and event.data.object.amount == 2000
    # Through signed_delivery: the body goes unchanged, the header is the same.
    delivery = STRIPE.signed_delivery(STRIPE_EVENT, WebhookSecrets(secret=WHSEC), now)
    assert delivery is not None and delivery.body == STRIPE_EVENT and dict(delivery.headers) == headers


def test_stripe_resign_makes_an_old_event_pass_again() -> None:
    """7.8: a delivery retried days later carries a fresh timestamp, so the SDK's 300 s
    check passes; the original (or a stale) signature would not."""
    now = time.time()
    old = STRIPE.sign_webhook(STRIPE_EVENT, WebhookSecrets(secret=WHSEC), now - 3 * 86400)
    assert old is not None
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(STRIPE_EVENT, old["Stripe-Signature"], WHSEC)
    fresh = STRIPE.sign_webhook(STRIPE_EVENT, WebhookSecrets(secret=WHSEC), now)
    assert fresh is not None
    assert stripe.Webhook.construct_event(STRIPE_EVENT, fresh["Stripe-Signature"], WHSEC).id.startswith("evt_")


def test_stripe_verify_accepts_what_stripe_signs() -> None:
    now = time.time()
    header = stripe.WebhookSignature.generate_signature_header(STRIPE_EVENT.decode(), WHSEC, timestamp=int(now))
    verdict = STRIPE.verify_webhook(STRIPE_EVENT, {"Stripe-Signature": header}, WebhookSecrets(secret=WHSEC), now, TOL)
    assert (verdict.ok, verdict.reason) == (True, "ok")
    # Header names are matched whatever their case.
    verdict = STRIPE.verify_webhook(STRIPE_EVENT, {"stripe-signature": header}, WebhookSecrets(secret=WHSEC), now, TOL)
    assert verdict.ok


def _stripe_header(body: bytes, secret: str, t: int) -> str:
    return stripe.WebhookSignature.generate_signature_header(body.decode(), secret, timestamp=t)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered", "bad_signature"),
        ("wrong_secret", "bad_signature"),
        ("old", "timestamp_outside_tolerance"),
        ("future", "timestamp_outside_tolerance"),
        ("missing", "missing_signature"),
        ("no_v1", "missing_signature"),
        ("no_t", "malformed_signature"),
        ("bad_t", "malformed_signature"),
        ("no_secret", "no_secret"),
    ],
)
def test_stripe_verify_refuses(case: str, reason: str) -> None:
    now = 1_800_000_000.0
    t = int(now)
    body = STRIPE_EVENT
    secrets = WebhookSecrets(secret=WHSEC)
    headers = {"Stripe-Signature": _stripe_header(body, WHSEC, t)}
    if case == "tampered":
        body = body.replace(b"2000", b"2001")
    elif case == "wrong_secret":
        headers = {"Stripe-Signature": _stripe_header(body, "whsec_other", t)}
    elif case == "old":
        headers = {"Stripe-Signature": _stripe_header(body, WHSEC, t - 301)}
    elif case == "future":
        headers = {"Stripe-Signature": _stripe_header(body, WHSEC, t + 301)}
    elif case == "missing":
        headers = {}
    elif case == "no_v1":
        headers = {"Stripe-Signature": f"t={t},v0=abc"}
    elif case == "no_t":
        headers = {"Stripe-Signature": headers["Stripe-Signature"].split(",", 1)[1]}
    elif case == "bad_t":
        headers = {"Stripe-Signature": headers["Stripe-Signature"].replace(f"t={t}", "t=12x")}
    elif case == "no_secret":
        secrets = WebhookSecrets()
    verdict = STRIPE.verify_webhook(body, headers, secrets, now, TOL)
    assert (verdict.ok, verdict.reason) == (False, reason)
    assert WHSEC not in repr(verdict)


def test_stripe_verify_at_the_tolerance_edge() -> None:
    now = 1_800_000_000.0
    header = _stripe_header(STRIPE_EVENT, WHSEC, int(now) - 300)
    secrets = WebhookSecrets(secret=WHSEC)
    assert STRIPE.verify_webhook(STRIPE_EVENT, {"Stripe-Signature": header}, secrets, now, 300).ok
    assert not STRIPE.verify_webhook(STRIPE_EVENT, {"Stripe-Signature": header}, secrets, now, 299).ok


def test_stripe_rotation_any_v1_passes() -> None:
    now = 1_800_000_000.0
    t = int(now)
    mine = _stripe_header(STRIPE_EVENT, WHSEC, t).split("v1=")[1]
    other = _stripe_header(STRIPE_EVENT, "whsec_rolled", t).split("v1=")[1]
    secrets = WebhookSecrets(secret=WHSEC)
    for value in (f"t={t},v1={other},v1={mine}", f"t={t},v1={mine},v1={other}", f"t={t},v0=xx,v1={mine}"):
        assert STRIPE.verify_webhook(STRIPE_EVENT, {"Stripe-Signature": value}, secrets, now, TOL).ok, value
    both_other = {"Stripe-Signature": f"t={t},v1={other},v1={other}"}
    assert STRIPE.verify_webhook(STRIPE_EVENT, both_other, secrets, now, TOL).reason == "bad_signature"
    # The other secret's holder accepts the same header too (both were signed).
    rolled = WebhookSecrets(secret="whsec_rolled")
    assert STRIPE.verify_webhook(STRIPE_EVENT, {"Stripe-Signature": f"t={t},v1={mine},v1={other}"}, rolled, now, TOL).ok


def test_stripe_events_and_no_signing_without_secret() -> None:
    events = STRIPE.webhook_events(STRIPE_EVENT, {})
    assert events == [
        InboundEvent(
            id="evt_1NG8Du2eZvKYlo2CUI79vXWy",
            type="payment_intent.succeeded",
            body=STRIPE_EVENT,
            object_ids=("pi_3abc",),
            ledger_ids=(),
        )
    ]
    assert STRIPE.webhook_events(b"not json", {}) == []
    assert STRIPE.sign_webhook(STRIPE_EVENT, WebhookSecrets(), 1.0) is None
    assert STRIPE.signed_delivery(STRIPE_EVENT, WebhookSecrets(), 1.0) is None


# ---- SendGrid ----------------------------------------------------------------------------------


def _p256() -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """A key pair: (key, public key as SendGrid shows it: base64 DER, private key PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key, base64.b64encode(der).decode(), pem


SG_BATCH = (
    b'[\n  {"email": "ann@example.com", "timestamp": 1700000000, "event": "delivered",'
    b' "sg_event_id": "sg-ev-1", "sg_message_id": "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",'
    b' "response": "250 OK"},\n'
    b'  {"email":"bob@example.com","timestamp":1700000001,"event":"open","sg_event_id":"sg-ev-2",'
    b'"sg_message_id":"W8ZnYx0vRuqAojlNq2nKsw.recvd-5f8-1-0","useragent":"UA","ip":"192.0.2.1","order":"7"}\n]'
)


def test_sendgrid_sign_is_accepted_by_the_sdk() -> None:
    _key, public, pem = _p256()
    now = time.time()
    headers = SENDGRID.sign_webhook(SG_BATCH, WebhookSecrets(signing_key=pem), now)
    assert headers is not None
    assert headers["X-Twilio-Email-Event-Webhook-Timestamp"] == str(int(now))
    sig = headers["X-Twilio-Email-Event-Webhook-Signature"]
    ts = headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    sdk = EventWebhook(public)
    assert sdk.verify_signature(SG_BATCH.decode(), sig, ts) is True
    assert sdk.verify_signature(SG_BATCH.decode().replace("250", "550"), sig, ts) is False
    assert sdk.verify_signature(SG_BATCH.decode(), sig, str(int(now) + 1)) is False
    # And our own verify agrees with the SDK.
    assert SENDGRID.verify_webhook(SG_BATCH, headers, WebhookSecrets(public_key=public), now, TOL).ok
    other = _p256()[1]
    assert EventWebhook(other).verify_signature(SG_BATCH.decode(), sig, ts) is False
    assert SENDGRID.verify_webhook(SG_BATCH, headers, WebhookSecrets(public_key=other), now, TOL).reason == (
        "bad_signature"
    )


def test_sendgrid_without_signing_key_sends_as_received() -> None:
    assert SENDGRID.sign_webhook(SG_BATCH, WebhookSecrets(public_key="x"), 1.0) is None
    assert SENDGRID.signed_delivery(SG_BATCH, WebhookSecrets(), 1.0) is None
    # A key that is not P-256 cannot sign either (and `key_problem` says so for `check`).
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )
    assert SENDGRID.sign_webhook(SG_BATCH, WebhookSecrets(signing_key=rsa_pem), 1.0) is None
    from plugins.webhooks_sendgrid import key_problem

    assert key_problem(signing_key=rsa_pem) is not None and key_problem(signing_key=_p256()[2]) is None


def _sendgrid_signed(key: ec.EllipticCurvePrivateKey, body: bytes, ts: int) -> dict[str, str]:
    """What SendGrid sends: a (randomized) ECDSA P-256 SHA-256 signature of ts + body."""
    sig = key.sign(str(ts).encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(sig).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": str(ts),
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("good", "ok"),
        ("pem_public_key", "ok"),
        ("tampered", "bad_signature"),
        ("wrong_key", "bad_signature"),
        ("old", "timestamp_outside_tolerance"),
        ("ts_changed", "bad_signature"),
        ("missing_sig", "missing_signature"),
        ("missing_ts", "missing_signature"),
        ("bad_base64", "malformed_signature"),
        ("bad_ts", "malformed_signature"),
        ("no_public_key", "no_public_key"),
        ("rsa_public_key", "bad_public_key"),
    ],
)
def test_sendgrid_verify(case: str, reason: str) -> None:
    key, public, _pem = _p256()
    now = 1_800_000_000.0
    ts = int(now)
    body = SG_BATCH
    headers = _sendgrid_signed(key, body, ts)
    secrets = WebhookSecrets(public_key=public)
    assert EventWebhook(public).verify_signature(
        body.decode(),
        headers["X-Twilio-Email-Event-Webhook-Signature"],
        headers["X-Twilio-Email-Event-Webhook-Timestamp"],
    )
    if case == "pem_public_key":
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        secrets = WebhookSecrets(public_key=pem.decode())
    elif case == "tampered":
        body = body.replace(b"ann@", b"eve@")
    elif case == "wrong_key":
        secrets = WebhookSecrets(public_key=_p256()[1])
    elif case == "old":
        headers = _sendgrid_signed(key, body, ts - 301)
    elif case == "ts_changed":
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = str(ts - 1)
    elif case == "missing_sig":
        del headers["X-Twilio-Email-Event-Webhook-Signature"]
    elif case == "missing_ts":
        del headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    elif case == "bad_base64":
        headers["X-Twilio-Email-Event-Webhook-Signature"] = "not base64!"
    elif case == "bad_ts":
        headers["X-Twilio-Email-Event-Webhook-Timestamp"] = "soon"
    elif case == "no_public_key":
        secrets = WebhookSecrets()
    elif case == "rsa_public_key":
        rsa_der = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            .public_key()
            .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        secrets = WebhookSecrets(public_key=base64.b64encode(rsa_der).decode())
    verdict = SENDGRID.verify_webhook(body, headers, secrets, now, TOL)
    assert (verdict.ok, verdict.reason) == (reason == "ok", reason)


def test_sendgrid_batch_is_split_per_event_with_its_own_bytes() -> None:
    events = SENDGRID.webhook_events(SG_BATCH, {})
    assert [(e.id, e.type) for e in events] == [("sg-ev-1", "delivered"), ("sg-ev-2", "open")]
    first, second = events
    assert first.body == SG_BATCH[SG_BATCH.index(b"{") : SG_BATCH.index(b"}") + 1]
    assert json.loads(second.body)["order"] == "7" and second.body in SG_BATCH
    assert first.object_ids == ("14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",)
    assert first.ledger_ids == (
        "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.0",
        "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88",
        "14c5d75ce93.dfd.64b469.filter0001.16648",
        "14c5d75ce93.dfd.64b469.filter0001",
        "14c5d75ce93.dfd.64b469",
        "14c5d75ce93.dfd",
        "14c5d75ce93",
    )
    assert second.ledger_ids == ("W8ZnYx0vRuqAojlNq2nKsw.recvd-5f8-1-0", "W8ZnYx0vRuqAojlNq2nKsw")
    # No sg_event_id: the event's own bytes stand in (identical content = same event).
    [nameless] = SENDGRID.webhook_events(b'[{"event":"open","email":"a@b.c"}]', {})
    assert nameless.id == "sha256:" + hashlib.sha256(b'{"event":"open","email":"a@b.c"}').hexdigest()
    assert SENDGRID.webhook_events(b'{"event":"open"}', {}) == []
    assert SENDGRID.webhook_events(b"[1, 2", {}) == []


# ---- Mailgun -----------------------------------------------------------------------------------

MG_KEY = "key-mailgun-signing-0123456789"


def _mg_sig(key: str, timestamp: str, token: str) -> str:
    """The documented scheme (providers.md 5.5), independently of the plugin."""
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def mailgun_body(event_data: Mapping[str, Any], *, key: str = MG_KEY, ts: int = 1_800_000_000) -> bytes:
    token = "t" * 50
    signature = {"timestamp": str(ts), "token": token, "signature": _mg_sig(key, str(ts), token)}
    # Pretty-printed, as Mailgun's own bodies are not compact: the bytes must survive re-signing.
    return json.dumps({"signature": signature, "event-data": event_data}, indent=2).encode()


MG_DELIVERED = {
    "id": "CPgfbmQMTCKtHW6uIWtuVe",
    "timestamp": 1_800_000_000.908181,
    "log-level": "info",
    "event": "delivered",
    "recipient": "ann@example.com",
    "recipient-domain": "example.com",
    "tags": ["receipt"],
    "message": {"headers": {"message-id": "20231114221320.1.ABCDEF@mg.shop.example", "to": "ann@example.com"}},
    "user-variables": {"order_id": "6735"},
    "delivery-status": {"code": 250, "message": "OK", "description": "", "attempt-no": 1, "tls": True},
}


def test_mailgun_verify_documented_scheme_and_sdk_agree() -> None:
    body = mailgun_body(MG_DELIVERED)
    sig = json.loads(body)["signature"]
    now = 1_800_000_010.0
    assert MAILGUN.verify_webhook(body, {}, WebhookSecrets(secret=MG_KEY), now, TOL).ok
    # The SDK agrees (its TTL is against the real clock, so disabled here).
    assert SecurityGuard.verify_webhook(MG_KEY, sig["token"], sig["timestamp"], sig["signature"], max_age_seconds=0)
    assert not SecurityGuard.verify_webhook("other", sig["token"], sig["timestamp"], sig["signature"], 0)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_key", "bad_signature"),
        ("token_changed", "bad_signature"),
        ("old", "timestamp_outside_tolerance"),
        ("missing", "missing_signature"),
        ("not_json", "malformed_body"),
        ("ts_not_digits", "malformed_signature"),
        ("no_secret", "no_secret"),
    ],
)
def test_mailgun_verify_refuses(case: str, reason: str) -> None:
    now = 1_800_000_000.0
    body = mailgun_body(MG_DELIVERED, ts=int(now))
    secrets = WebhookSecrets(secret=MG_KEY)
    if case == "wrong_key":
        body = mailgun_body(MG_DELIVERED, key="key-other", ts=int(now))
    elif case == "token_changed":
        body = body.replace(b'"' + b"t" * 50, b'"u' + b"t" * 49, 1)
    elif case == "old":
        body = mailgun_body(MG_DELIVERED, ts=int(now) - 301)
    elif case == "missing":
        body = json.dumps({"event-data": MG_DELIVERED}).encode()
    elif case == "not_json":
        body = b"timestamp=1&token=x&signature=y"
    elif case == "ts_not_digits":
        payload = json.loads(body)
        payload["signature"]["timestamp"] = "1.5e9"
        body = json.dumps(payload).encode()
    elif case == "no_secret":
        secrets = WebhookSecrets()
    verdict = MAILGUN.verify_webhook(body, {}, secrets, now, TOL)
    assert (verdict.ok, verdict.reason) == (False, reason)


def test_mailgun_resign_rewrites_only_the_signature() -> None:
    body = mailgun_body(MG_DELIVERED, ts=1_700_000_000)  # days old: the app's check would refuse it
    now = time.time()
    secrets = WebhookSecrets(secret=MG_KEY)
    assert MAILGUN.sign_webhook(body, secrets, now) is None  # not a header scheme
    delivery = MAILGUN.signed_delivery(body, secrets, now)
    assert delivery is not None and dict(delivery.headers) == {}
    sig = json.loads(delivery.body)["signature"]
    assert sig["timestamp"] == str(int(now)) and len(sig["token"]) == 50 and sig["token"] != "t" * 50
    assert SecurityGuard.verify_webhook(MG_KEY, sig["token"], sig["timestamp"], sig["signature"])  # real clock TTL
    assert MAILGUN.verify_webhook(delivery.body, {}, secrets, now, TOL).ok
    # Every byte outside the signature object is Mailgun's.
    text, new = body.decode(), delivery.body.decode()
    old_spans = top_level_spans(text)
    new_spans = top_level_spans(new)
    assert old_spans is not None and new_spans is not None
    (_, s0, e0), (_, s1, e1) = old_spans[0], new_spans[0]
    assert text[:s0] == new[:s1] and text[e0:] == new[e1:]
    # Pure: the same inputs give the same body; another second gives another token.
    assert MAILGUN.signed_delivery(body, secrets, now) == delivery
    later = MAILGUN.signed_delivery(body, secrets, now + 1)
    assert later is not None and json.loads(later.body)["signature"]["token"] != sig["token"]


def test_mailgun_resign_needs_one_signature_member_and_the_key() -> None:
    secrets = WebhookSecrets(secret=MG_KEY)
    twice = b'{"signature": {}, "event-data": {}, "signature": {}}'
    assert MAILGUN.signed_delivery(twice, secrets, 1.0) is None
    assert MAILGUN.signed_delivery(b'{"event-data": {}}', secrets, 1.0) is None
    assert MAILGUN.signed_delivery(b"[]", secrets, 1.0) is None
    assert MAILGUN.signed_delivery(mailgun_body(MG_DELIVERED), WebhookSecrets(), 1.0) is None


def test_mailgun_events() -> None:
    body = mailgun_body(MG_DELIVERED)
    assert MAILGUN.webhook_events(body, {}) == [
        InboundEvent(
            id="CPgfbmQMTCKtHW6uIWtuVe",
            type="delivered",
            body=body,
            object_ids=("20231114221320.1.ABCDEF@mg.shop.example",),
            ledger_ids=("20231114221320.1.ABCDEF@mg.shop.example",),
        )
    ]
    assert MAILGUN.webhook_events(b'{"signature": {}}', {}) == []


# ---- PayPal ------------------------------------------------------------------------------------

PP_HEADERS = {
    "PAYPAL-AUTH-ALGO": "SHA256withRSA",
    "PAYPAL-CERT-URL": "https://api.sandbox.paypal.com/v1/notifications/certs/CERT-360caa42-fca2a594-a5cafa77",
    "PAYPAL-TRANSMISSION-ID": "69cd13f0-d67a-11e5-baa3-778b53f4ae55",
    "PAYPAL-TRANSMISSION-SIG": (
        "lmI95Jx3Y9nhR5SJWlHVIWpg4AgFk7n9bCHSRxbrd8A9zrhdu2rMyFrmz+Zjh3s3boXB07VXCXUZy/UFzUlnGJn0wDugt7FlSvdK"
        "eIJenLRemUxYCPVoEZzg9VFNqOa48gMkvF+XTpxBeUx/kWy6B5cp7GkT2+pOowfRK7OaynuxUoKW3JcMWw272VKjLTtTAShncla7"
        "tGF+55rxyt2KNZIIqxNMJ48RDZheGU5w1npu9dZHnPgTXB9iomeVRoD8O/jhRpnKsGrDschyNdkeh81BJJMH4Ctc6lnCCquoP/Gz"
        "Czz33MMsNdid7vL/NIWaCsekQpW26FpWPi/tfj8nLA=="
    ),
    "PAYPAL-TRANSMISSION-TIME": "2026-02-16T21:01:49Z",
}
PP_NOW = 1_771_275_709.0  # 2026-02-16T21:01:49Z
PP_CAPTURE_COMPLETED = {
    "id": "WH-58D329510W468432D-8HN650336L201105X",
    "event_version": "1.0",
    "create_time": "2026-02-16T21:01:49.000Z",
    "resource_type": "capture",
    "resource_version": "2.0",
    "event_type": "PAYMENT.CAPTURE.COMPLETED",
    "summary": "Payment completed for $ 10.99 USD",
    "resource": {
        "id": "3C679366HH908993F",
        "status": "COMPLETED",
        "amount": {"currency_code": "USD", "value": "10.99"},
        "final_capture": True,
        "seller_protection": {"status": "ELIGIBLE"},
        "supplementary_data": {"related_ids": {"order_id": "5O190127TN364715T"}},
        "create_time": "2026-02-16T21:01:40Z",
        "update_time": "2026-02-16T21:01:40Z",
        "links": [
            {"href": "https://api.sandbox.paypal.com/v2/payments/captures/3C679366HH908993F", "rel": "self"},
            {"href": "https://api.sandbox.paypal.com/v2/payments/captures/3C679366HH908993F/refund", "rel": "refund"},
            {"href": "https://api.sandbox.paypal.com/v2/checkout/orders/5O190127TN364715T", "rel": "up"},
        ],
    },
}


def test_paypal_verify_builds_the_remote_check() -> None:
    body = json.dumps(PP_CAPTURE_COMPLETED, indent=1).encode()
    verdict = PAYPAL.verify_webhook(body, PP_HEADERS, WebhookSecrets(webhook_id="1JE4291016473214C"), PP_NOW, TOL)
    assert (verdict.ok, verdict.reason) == (False, "remote_check_required")
    check = verdict.remote
    assert check is not None
    assert (check.method, check.path) == ("POST", "/v1/notifications/verify-webhook-signature")
    assert dict(check.headers) == {"Content-Type": "application/json"}
    sent = json.loads(check.body)
    assert sent == {
        "auth_algo": "SHA256withRSA",
        "cert_url": PP_HEADERS["PAYPAL-CERT-URL"],
        "transmission_id": PP_HEADERS["PAYPAL-TRANSMISSION-ID"],
        "transmission_sig": PP_HEADERS["PAYPAL-TRANSMISSION-SIG"],
        "transmission_time": PP_HEADERS["PAYPAL-TRANSMISSION-TIME"],
        "webhook_id": "1JE4291016473214C",
        "webhook_event": PP_CAPTURE_COMPLETED,
    }
    # The event goes to PayPal as the bytes it sent (not re-encoded).
    assert check.body.endswith(b',"webhook_event":' + body + b"}")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no_webhook_id", "no_webhook_id"),
        ("missing_header", "missing_signature"),
        ("foreign_cert_url", "untrusted_cert_url"),
        ("http_cert_url", "untrusted_cert_url"),
        ("lookalike_cert_url", "untrusted_cert_url"),
        ("old", "timestamp_outside_tolerance"),
        ("bad_time", "malformed_signature"),
        ("not_json", "malformed_body"),
    ],
)
def test_paypal_verify_refuses_locally(case: str, reason: str) -> None:
    headers = dict(PP_HEADERS)
    body = json.dumps(PP_CAPTURE_COMPLETED).encode()
    secrets = WebhookSecrets(webhook_id="1JE4291016473214C")
    now = PP_NOW
    if case == "no_webhook_id":
        secrets = WebhookSecrets()
    elif case == "missing_header":
        del headers["PAYPAL-TRANSMISSION-SIG"]
    elif case == "foreign_cert_url":
        headers["PAYPAL-CERT-URL"] = "https://evil.example/cert.pem"
    elif case == "http_cert_url":
        headers["PAYPAL-CERT-URL"] = "http://api.paypal.com/v1/notifications/certs/X"
    elif case == "lookalike_cert_url":
        headers["PAYPAL-CERT-URL"] = "https://api.paypal.com.evil.example/certs/X"
    elif case == "old":
        now = PP_NOW + 301
    elif case == "bad_time":
        headers["PAYPAL-TRANSMISSION-TIME"] = "yesterday"
    elif case == "not_json":
        body = b"[]"
    verdict = PAYPAL.verify_webhook(body, headers, secrets, now, TOL)
    assert (verdict.ok, verdict.reason, verdict.remote) == (False, reason, None)


@pytest.mark.parametrize(
    ("status", "body", "ok", "reason", "transient"),
    [
        (200, b'{"verification_status": "SUCCESS"}', True, "ok", False),
        (200, b'{"verification_status": "FAILURE"}', False, "bad_signature", False),
        (200, b"<html>", False, "remote_check_unreadable", True),
        (400, b'{"name": "VALIDATION_ERROR"}', False, "remote_check_refused", False),
        (401, b"", False, "remote_check_unavailable", True),
        (503, b"", False, "remote_check_unavailable", True),
    ],
)
def test_paypal_remote_verdict(status: int, body: bytes, ok: bool, reason: str, transient: bool) -> None:
    verdict = PAYPAL.remote_verdict(status, body)
    assert (verdict.ok, verdict.reason, verdict.transient) == (ok, reason, transient)


def test_paypal_cannot_sign_and_events() -> None:
    body = json.dumps(PP_CAPTURE_COMPLETED).encode()
    assert PAYPAL.sign_webhook(body, WebhookSecrets(webhook_id="W"), 1.0) is None
    assert PAYPAL.signed_delivery(body, WebhookSecrets(webhook_id="W"), 1.0) is None
    assert PAYPAL.webhook_events(body, {}) == [
        InboundEvent(
            id="WH-58D329510W468432D-8HN650336L201105X",
            type="PAYMENT.CAPTURE.COMPLETED",
            body=body,
            object_ids=("3C679366HH908993F", "5O190127TN364715T"),
            ledger_ids=("ch_ppf_3C679366HH908993F", "pi_ppf_5O190127TN364715T"),
        )
    ]


# ---- translation PayPal -> Stripe -----------------------------------------------------------------


def drive(run: TranslatorRun, answers: list[WireAnswer]) -> Translated:
    try:
        next(run)
        for answer in answers:
            run.send(answer)
        raise AssertionError("translator wanted more answers")
    except StopIteration as stop:
        result: Translated = stop.value
        return result


def _ok(status: int, body: Any) -> WireAnswer:
    return WireAnswer(status, {"Content-Type": "application/json"}, json.dumps(body).encode())


def failover_ledger(capture_status: str = "COMPLETED") -> dict[str, dict[str, Any]]:
    """The routing ledger as a real Stripe -> PayPal failover writes it (the translator's
    own entries, through JSON as `failover._finish` stores them)."""
    order = {
        "id": "5O190127TN364715T",
        "intent": "CAPTURE",
        "status": "COMPLETED",
        "create_time": "2026-02-16T21:01:39Z",
        "purchase_units": [
            {
                "reference_id": "default",
                "amount": {"currency_code": "USD", "value": "10.99"},
                "payments": {
                    "captures": [
                        {
                            "id": "3C679366HH908993F",
                            "status": capture_status,
                            "amount": {"currency_code": "USD", "value": "10.99"},
                        }
                    ]
                },
            }
        ],
    }
    body = encode_stripe_form(
        {
            "amount": 1099,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "description": "Order 6735",
            "metadata": {"order_id": "6735"},
        }
    )
    ctx = FailoverContext(
        source="stripe",
        target="paypal",
        payment_methods={"pm_card_visa": "8TX02017P3456"},
        idempotency_key="key-1",
        request_id="rid-1",
        now=1_771_275_699,
    )
    out = drive(s2p.translate(WireRequest("POST", "/v1/payment_intents", body=body), ctx), [_ok(201, order)])
    return {k: json.loads(json.dumps(v, default=str)) for k, v in out.ledger}


def _translate(plugin: Any, body: bytes, ledger: Mapping[str, Any], target: str) -> TranslatedEvent | None:
    """What the listener does: split, prefetch the event's ledger ids, translate."""
    [event] = plugin.webhook_events(body, {})
    prefetched = {i: ledger[i] for i in event.ledger_ids if i in ledger}
    result: TranslatedEvent | None = plugin.translate_event(event, prefetched.get, target=target)
    return result


def _app_receives(translated: TranslatedEvent) -> Any:
    """Sign with the primary's scheme and check it the way the app's SDK does."""
    now = time.time()
    delivery = STRIPE.signed_delivery(translated.body, WebhookSecrets(secret=WHSEC), now)
    assert delivery is not None and delivery.body == translated.body
    return stripe.Webhook.construct_event(delivery.body, delivery.headers["Stripe-Signature"], WHSEC)


def test_paypal_capture_completed_becomes_payment_intent_succeeded() -> None:
    ledger = failover_ledger()
    assert set(ledger) == {"pi_ppf_5O190127TN364715T", "ch_ppf_3C679366HH908993F"}
    body = json.dumps(PP_CAPTURE_COMPLETED).encode()
    translated = _translate(PAYPAL, body, ledger, "stripe")
    assert translated is not None
    assert translated.type == "payment_intent.succeeded"
    event = _app_receives(translated)
    assert event.type == "payment_intent.succeeded" and event.object == "event"
    assert event.id == translated.event_id and event.id.startswith("evt_ppf_")
    assert event.created == 1_771_275_709 and event.livemode is False
    pi = event.data.object
    assert isinstance(pi, stripe.PaymentIntent)
    assert pi.id == "pi_ppf_5O190127TN364715T"
    assert (pi.amount, pi.amount_received, pi.currency, pi.status) == (1099, 1099, "usd", "succeeded")
    assert pi.latest_charge == "ch_ppf_3C679366HH908993F"
    assert pi.metadata.to_dict() == {"order_id": "6735"} and pi.description == "Order 6735"
    assert pi.payment_method == "pm_card_visa" and pi.last_payment_error is None
    # Derived from the PayPal event id: the same on every redelivery, another for another event.
    again = _translate(PAYPAL, body, ledger, "stripe")
    assert again is not None and again.event_id == translated.event_id and again.body == translated.body
    other = json.dumps({**PP_CAPTURE_COMPLETED, "id": "WH-OTHER"}).encode()
    moved = _translate(PAYPAL, other, ledger, "stripe")
    assert moved is not None and moved.event_id != translated.event_id


def test_paypal_translation_finds_the_intent_by_either_id() -> None:
    ledger = failover_ledger()
    only_capture = {"ch_ppf_3C679366HH908993F": ledger["ch_ppf_3C679366HH908993F"]}
    no_order = json.loads(json.dumps(PP_CAPTURE_COMPLETED))
    del no_order["resource"]["supplementary_data"]
    for event_body, held in ((PP_CAPTURE_COMPLETED, only_capture), (no_order, ledger)):
        translated = _translate(PAYPAL, json.dumps(event_body).encode(), held, "stripe")
        assert translated is not None and json.loads(translated.body)["data"]["object"]["id"] == (
            "pi_ppf_5O190127TN364715T"
        )


def test_paypal_capture_denied_becomes_payment_failed() -> None:
    ledger = failover_ledger("PENDING")
    denied = json.loads(json.dumps(PP_CAPTURE_COMPLETED))
    denied.update(id="WH-DENIED-1", event_type="PAYMENT.CAPTURE.DENIED")
    denied["resource"]["status"] = "DECLINED"
    translated = _translate(PAYPAL, json.dumps(denied).encode(), ledger, "stripe")
    assert translated is not None
    event = _app_receives(translated)
    assert event.type == "payment_intent.payment_failed"
    pi = event.data.object
    assert (pi.id, pi.status, pi.amount_received) == ("pi_ppf_5O190127TN364715T", "requires_payment_method", 0)
    assert pi.last_payment_error.code == "card_declined" and pi.payment_method is None


@pytest.mark.parametrize(("refunded", "minor", "full"), [("5.00", 500, False), ("10.99", 1099, True)])
def test_paypal_capture_refunded_becomes_charge_refunded(refunded: str, minor: int, full: bool) -> None:
    ledger = failover_ledger()
    event_body = {
        "id": "WH-REFUND-1",
        "create_time": "2026-02-17T10:00:00Z",
        "resource_type": "refund",
        "event_type": "PAYMENT.CAPTURE.REFUNDED",
        "resource": {
            "id": "1JU08902781691411",
            "status": "COMPLETED",
            "amount": {"currency_code": "USD", "value": refunded},
            "seller_payable_breakdown": {"total_refunded_amount": {"currency_code": "USD", "value": refunded}},
            "create_time": "2026-02-17T10:00:00Z",
            "links": [
                {"href": "https://api.paypal.com/v2/payments/refunds/1JU08902781691411", "rel": "self"},
                {"href": "https://api.paypal.com/v2/payments/captures/3C679366HH908993F", "rel": "up"},
            ],
        },
    }
    body = json.dumps(event_body).encode()
    [inbound] = PAYPAL.webhook_events(body, {})
    assert inbound.ledger_ids == ("re_ppf_1JU08902781691411", "ch_ppf_3C679366HH908993F")
    translated = _translate(PAYPAL, body, ledger, "stripe")
    assert translated is not None
    event = _app_receives(translated)
    assert event.type == "charge.refunded" and event.created == 1_771_322_400
    charge = event.data.object
    assert isinstance(charge, stripe.Charge)
    assert (charge.id, charge.payment_intent) == ("ch_ppf_3C679366HH908993F", "pi_ppf_5O190127TN364715T")
    assert (charge.amount, charge.amount_captured, charge.amount_refunded) == (1099, 1099, minor)
    assert (charge.currency, charge.refunded, charge.captured, charge.status) == ("usd", full, True, "succeeded")


def test_paypal_events_without_translation() -> None:
    ledger = failover_ledger()
    body = json.dumps(PP_CAPTURE_COMPLETED).encode()
    # The ledger does not know the objects: the app never saw them through egressd.
    assert _translate(PAYPAL, body, {}, "stripe") is None
    strangers = json.loads(json.dumps(PP_CAPTURE_COMPLETED))
    strangers["resource"].update(id="9XX00000000000000", supplementary_data={"related_ids": {"order_id": "8YY"}})
    strangers["resource"]["links"] = []
    assert _translate(PAYPAL, json.dumps(strangers).encode(), ledger, "stripe") is None
    # An event type with no Stripe counterpart in 7.5.
    pending = {**PP_CAPTURE_COMPLETED, "event_type": "PAYMENT.CAPTURE.PENDING"}
    assert _translate(PAYPAL, json.dumps(pending).encode(), ledger, "stripe") is None
    # COMPLETED whose capture is not completed is not passed off as a success.
    odd = json.loads(json.dumps(PP_CAPTURE_COMPLETED))
    odd["resource"]["status"] = "PENDING"
    assert _translate(PAYPAL, json.dumps(odd).encode(), ledger, "stripe") is None
    # Only into Stripe's shape.
    assert _translate(PAYPAL, body, ledger, "sendgrid") is None
    # The reverse (Stripe events -> PayPal) is not made: PayPal's signature cannot be.
    assert _translate(STRIPE, STRIPE_EVENT, {"pi_3abc": {"kind": "order"}}, "paypal") is None


# ---- translation Mailgun -> SendGrid --------------------------------------------------------------

MID = "20231114221320.1.ABCDEF@mg.shop.example"
URL = "https://shop.example/x"
#: The record the routing ledger would need (see the report: mail failover writes none yet).
MAIL_LEDGER = {MID: {"kind": "message", "owner": "mailgun", "x_message_id": MID}}


def _mg(**event: Any) -> bytes:
    data = {
        "id": "MG-EVENT-1",
        "timestamp": 1_800_000_000.5,
        "recipient": "ann@example.com",
        "message": {"headers": {"message-id": MID}},
        "user-variables": {"order_id": "6735"},
        **event,
    }
    return mailgun_body(data)


BASE_SG = {
    "email": "ann@example.com",
    "timestamp": 1_800_000_000,
    "sg_message_id": MID,
    "smtp-id": f"<{MID}>",
    "order_id": "6735",
}


@pytest.mark.parametrize(
    ("mailgun", "sendgrid"),
    [
        (
            {"event": "delivered", "delivery-status": {"code": 250, "message": "OK", "description": ""}},
            {"event": "delivered", "response": "250 OK"},
        ),
        (
            {
                "event": "failed",
                "severity": "permanent",
                "reason": "bounce",
                "delivery-status": {"code": 550, "message": "No such user", "description": "5.1.1 unknown user"},
            },
            {"event": "bounce", "reason": "5.1.1 unknown user", "status": "5.0.0", "type": "bounce"},
        ),
        (
            {
                "event": "failed",
                "severity": "permanent",
                "reason": "generic",
                "delivery-status": {"code": 550, "message": "Mailbox unavailable", "enhanced-code": "5.2.1"},
            },
            {"event": "bounce", "reason": "Mailbox unavailable", "status": "5.2.1", "type": "bounce"},
        ),
        (
            {"event": "failed", "severity": "permanent", "reason": "suppress-bounce", "delivery-status": {}},
            {"event": "dropped", "reason": "Bounced Address"},
        ),
        (
            {
                "event": "failed",
                "severity": "temporary",
                "reason": "generic",
                "delivery-status": {"code": 451, "message": "Try later", "attempt-no": 3},
            },
            {"event": "deferred", "response": "451 Try later", "attempt": "3"},
        ),
        (
            {"event": "opened", "ip": "192.0.2.7", "client-info": {"user-agent": "Mozilla/5.0"}},
            {"event": "open", "useragent": "Mozilla/5.0", "ip": "192.0.2.7"},
        ),
        (
            {"event": "clicked", "url": URL, "ip": "192.0.2.7", "client-info": {"user-agent": "U"}},
            {"event": "click", "useragent": "U", "ip": "192.0.2.7", "url": URL},
        ),
        ({"event": "unsubscribed"}, {"event": "unsubscribe"}),
        ({"event": "complained"}, {"event": "spamreport"}),
    ],
)
def test_mailgun_events_become_sendgrid_events(mailgun: dict[str, Any], sendgrid: dict[str, Any]) -> None:
    translated = _translate(MAILGUN, _mg(**mailgun), MAIL_LEDGER, "sendgrid")
    assert translated is not None
    [event] = json.loads(translated.body)
    assert event == {**BASE_SG, "sg_event_id": translated.event_id, **sendgrid}
    assert translated.type == sendgrid["event"] and translated.content_type == "application/json"


def test_mailgun_translation_ids_args_and_signature() -> None:
    body = _mg(
        event="delivered",
        tags=["receipt", "eu"],
        **{"user-variables": {"order_id": "6735", "n": 5, "meta": {"a": 1}, "event": "spoof", "email": "x"}},
    )
    translated = _translate(MAILGUN, body, MAIL_LEDGER, "sendgrid")
    assert translated is not None
    [event] = json.loads(translated.body)
    assert event["event"] == "delivered" and event["email"] == "ann@example.com"
    assert event["category"] == ["receipt", "eu"]
    assert (event["order_id"], event["n"], event["meta"]) == ("6735", "5", '{"a":1}')
    # sg_event_id: derived from the Mailgun event id, stable, and another for another event.
    again = _translate(MAILGUN, body, MAIL_LEDGER, "sendgrid")
    other = _translate(MAILGUN, body.replace(b"MG-EVENT-1", b"MG-EVENT-2"), MAIL_LEDGER, "sendgrid")
    assert again is not None and other is not None
    assert event["sg_event_id"] == translated.event_id == again.event_id != other.event_id
    # The id the app was given comes from the ledger record.
    fanned = {MID: {"kind": "message", "owner": "mailgun", "x_message_id": "FIRST-OF-TWO"}}
    moved = _translate(MAILGUN, body, fanned, "sendgrid")
    assert moved is not None and json.loads(moved.body)[0]["sg_message_id"] == "FIRST-OF-TWO"
    # Signed with egressd's SendGrid signing key, the app's SDK accepts it.
    _key, public, pem = _p256()
    delivery = SENDGRID.signed_delivery(translated.body, WebhookSecrets(signing_key=pem), time.time())
    assert delivery is not None and delivery.body == translated.body
    assert EventWebhook(public).verify_signature(
        delivery.body.decode(),
        delivery.headers["X-Twilio-Email-Event-Webhook-Signature"],
        delivery.headers["X-Twilio-Email-Event-Webhook-Timestamp"],
    )


def test_mailgun_events_without_translation() -> None:
    delivered = _mg(event="delivered")
    assert _translate(MAILGUN, delivered, {}, "sendgrid") is None  # not sent through a failover
    assert _translate(MAILGUN, delivered, MAIL_LEDGER, "stripe") is None
    for extra in ({"event": "accepted"}, {"event": "failed"}, {"event": "failed", "severity": "soft"}):
        assert _translate(MAILGUN, _mg(**extra), MAIL_LEDGER, "sendgrid") is None, extra


# ---- translation SendGrid -> Mailgun (reverse, honest: egressd holds Mailgun's key) -----------------


def test_sendgrid_bounce_becomes_a_signed_mailgun_failure() -> None:
    batch = json.dumps(
        [
            {
                "email": "ann@example.com",
                "timestamp": 1_800_000_000,
                "event": "bounce",
                "sg_event_id": "sg-bounce-1",
                "sg_message_id": "W8ZnYx0vRuqAojlNq2nKsw.filterdrecv-5f8-1-0",
                "reason": "550 5.1.1 unknown user",
                "status": "5.1.1",
                "type": "bounce",
                "category": ["receipt"],
                "order_id": "6735",
            }
        ]
    ).encode()
    xid = "W8ZnYx0vRuqAojlNq2nKsw"
    ledger = {xid: {"kind": "message", "owner": "sendgrid", "message_id": xid}}
    translated = _translate(SENDGRID, batch, ledger, "mailgun")
    assert translated is not None and translated.type == "failed"
    now = time.time()
    delivery = MAILGUN.signed_delivery(translated.body, WebhookSecrets(secret=MG_KEY), now)
    assert delivery is not None
    payload = json.loads(delivery.body)
    sig = payload["signature"]
    assert SecurityGuard.verify_webhook(MG_KEY, sig["token"], sig["timestamp"], sig["signature"])
    data = payload["event-data"]
    assert data == {
        "id": translated.event_id,
        "timestamp": 1_800_000_000.0,
        "log-level": "error",
        "event": "failed",
        "severity": "permanent",
        "reason": "bounce",
        "recipient": "ann@example.com",
        "recipient-domain": "example.com",
        "message": {"headers": {"message-id": "W8ZnYx0vRuqAojlNq2nKsw"}},
        "tags": ["receipt"],
        "delivery-status": {
            "code": 550,
            "message": "550 5.1.1 unknown user",
            "description": "550 5.1.1 unknown user",
            "enhanced-code": "5.1.1",
        },
        "user-variables": {"order_id": "6735"},
    }
    assert _translate(SENDGRID, batch, {}, "mailgun") is None
    processed = batch.replace(b'"bounce"', b'"processed"', 1)
    assert _translate(SENDGRID, processed, ledger, "mailgun") is None


# ---- the API itself ----------------------------------------------------------------------------


def test_a_plugin_without_webhooks() -> None:
    generic = GenericPlugin()
    verdict = generic.verify_webhook(b"{}", {}, WebhookSecrets(secret="s"), 1.0, TOL)
    assert (verdict.ok, verdict.reason) == (False, "no_webhook_support")
    assert generic.remote_verdict(200, b"{}").ok is False
    assert generic.webhook_events(b"{}", {}) == []
    assert generic.sign_webhook(b"{}", WebhookSecrets(secret="s"), 1.0) is None
    assert generic.signed_delivery(b"{}", WebhookSecrets(secret="s"), 1.0) is None
    event = InboundEvent(id="x", type="y", body=b"{}")
    assert generic.translate_event(event, {}.get, target="stripe") is None


def test_secrets_stay_out_of_repr() -> None:
    text = repr(WebhookSecrets(secret=WHSEC, signing_key="-----BEGIN PRIVATE KEY-----x", webhook_id="WH1"))
    assert WHSEC not in text and "PRIVATE" not in text and "WH1" in text


def test_json_spans_keep_bytes() -> None:
    text = ' { "a" : "}{,\\"" , "signature":{"x":[1,{"y":"}"}]} ,"b":2 } '
    spans = top_level_spans(text)
    assert spans is not None
    assert [(k, text[s:e]) for k, s, e in spans] == [
        ("a", '"}{,\\""'),
        ("signature", '{"x":[1,{"y":"}"}]}'),
        ("b", "2"),
    ]
    assert top_level_spans("[]") is None and top_level_spans('{"a":1} x') is None and top_level_spans("{}") == []
    assert array_spans(' [ {"a":"]"} , 2 ] ') == [(3, 12), (15, 16)]
    assert array_spans("[]") == [] and array_spans("[1,]") is None and array_spans("{}") is None
