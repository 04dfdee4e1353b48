"""Inbound webhooks, the pure half: provider signatures checked against the official SDKs
(stripe, sendgrid, mailgun), event splitting, and fallback -> primary event translation
(contract 7.5, 7.8). No I/O: plugins take bytes and secrets and return values."""

from __future__ import annotations

from plugins.base import GenericPlugin
from plugins.mailgun import MailgunPlugin
from plugins.paypal import PayPalPlugin
from plugins.sendgrid import SendGridPlugin
from plugins.stripe import StripePlugin
from plugins.webhooks import (
    InboundEvent,
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
