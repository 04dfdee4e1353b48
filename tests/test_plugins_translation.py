"""Golden request/answer pairs for every mapping, both directions, driven without I/O."""

from __future__ import annotations

import dataclasses
import json
from typing import Any
from urllib.parse import parse_qsl

import pytest

from plugins import mail_mailgun_to_sendgrid as mg2sg
from plugins import mail_sendgrid_to_mailgun as sg2mg
from plugins import pay_paypal_to_stripe as p2s
from plugins import pay_stripe_to_paypal as s2p
from plugins.base import FailoverContext, Refused, Translated, TranslatorRun, WireAnswer, WireRequest
from plugins.forms import encode_multipart, encode_stripe_form, parse_form, parse_stripe_form
from plugins.money import paypal_to_stripe, stripe_to_paypal
from plugins.registry import load_plugin


def drive(run: TranslatorRun, answers: list[WireAnswer]) -> tuple[list[WireRequest], Translated]:
    """Run a translator with canned answers; return what it sent and its final answer."""
    sent: list[WireRequest] = []
    try:
        step = next(run)
        for answer in answers:
            sent.append(step)
            step = run.send(answer)
        raise AssertionError(f"translator wanted more answers after {len(sent)}: {step}")
    except StopIteration as stop:
        return sent, stop.value


def ok(status: int, body: Any, **headers: str) -> WireAnswer:
    return WireAnswer(status, {"Content-Type": "application/json", **headers}, json.dumps(body).encode())


CTX = FailoverContext(
    source="stripe",
    target="paypal",
    payment_methods={"pm_card_visa": "8TX02017P3456"},
    idempotency_key="key-1",
    request_id="rid-1",
    now=1_700_000_000,
)

# ---- money -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "cur", "code", "value"),
    [
        (1099, "usd", "USD", "10.99"),
        (500, "jpy", "JPY", "500"),
        (150000, "huf", "HUF", "1500"),
        (3000, "twd", "TWD", "30"),
    ],
)
def test_money_worked_examples(amount: int, cur: str, code: str, value: str) -> None:
    assert stripe_to_paypal(amount, cur) == (code, value)
    assert paypal_to_stripe(value, code) == (amount, cur)


@pytest.mark.parametrize(
    ("amount", "cur", "reason"),
    [
        (150050, "huf", "amount_not_representable"),
        (5120, "kwd", "unsupported_currency"),
        (1000, "inr", "unsupported_currency"),
        (1000, "brl", "unsupported_currency"),
    ],
)
def test_money_refusals(amount: int, cur: str, reason: str) -> None:
    with pytest.raises(Refused) as info:
        stripe_to_paypal(amount, cur)
    assert info.value.reason == reason


def test_paypal_amounts_stripe_cannot_take() -> None:
    for value, code in (("10.999", "USD"), ("1000000.00", "USD"), ("0.10", "USD"), ("1.5", "JPY")):
        with pytest.raises(Refused):
            paypal_to_stripe(value, code)


def test_stripe_form_round_trip() -> None:
    text = "amount=1&metadata[a]=b&expand[]=x&expand[]=y&items[0][price]=p&items[1][price]=q"
    parsed = parse_stripe_form(text)
    assert parsed == {
        "amount": "1",
        "metadata": {"a": "b"},
        "expand": ["x", "y"],
        "items": [{"price": "p"}, {"price": "q"}],
    }
    assert parse_stripe_form(encode_stripe_form(parsed).decode()) == parsed


def test_multipart_round_trip() -> None:
    from plugins.forms import FilePart

    body, ctype = encode_multipart(
        [("to", "a@b.c"), ("subject", "Hé")], [FilePart("attachment", "r.pdf", "application/pdf", b"\x00\x01")]
    )
    fields, files = parse_form(body, ctype)
    assert fields == [("to", "a@b.c"), ("subject", "Hé")]
    assert files == [FilePart("attachment", "r.pdf", "application/pdf", b"\x00\x01")]


# ---- Stripe -> PayPal --------------------------------------------------------------------------

ORDER = {
    "id": "5O190127TN364715T",
    "intent": "CAPTURE",
    "status": "COMPLETED",
    "create_time": "2023-11-14T22:13:20Z",
    "purchase_units": [
        {
            "reference_id": "default",
            "amount": {"currency_code": "USD", "value": "10.99"},
            "payments": {
                "captures": [
                    {
                        "id": "3C679366HH908993F",
                        "status": "COMPLETED",
                        "amount": {"currency_code": "USD", "value": "10.99"},
                    }
                ]
            },
        }
    ],
}


def test_stripe_create_to_paypal_order() -> None:
    body = encode_stripe_form(
        {
            "amount": 1099,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "description": "Order 6735",
            "metadata": {"order_id": "6735"},
            "statement_descriptor_suffix": "SHOP",
            "off_session": True,
            "shipping": {"name": "Ann", "address": {"line1": "1 Main", "city": "X", "country": "US"}},
        }
    )
    sent, out = drive(s2p.translate(WireRequest("POST", "/v1/payment_intents", body=body), CTX), [ok(201, ORDER)])
    assert len(sent) == 1
    req = sent[0]
    assert req.path == "/v2/checkout/orders"
    assert req.headers["PayPal-Request-Id"] == CTX.derived_key("create") and req.headers["PayPal-Request-Id"].endswith(
        "-create"
    )
    assert req.headers["Prefer"] == "return=representation"
    order = req.json()
    assert order["intent"] == "CAPTURE"
    unit = order["purchase_units"][0]
    assert unit["amount"] == {"currency_code": "USD", "value": "10.99"}
    assert unit["description"] == "Order 6735" and unit["soft_descriptor"] == "SHOP"
    assert unit["shipping"] == {
        "name": {"full_name": "Ann"},
        "address": {"address_line_1": "1 Main", "admin_area_2": "X", "country_code": "US"},
    }
    assert order["payment_source"] == {
        "card": {
            "vault_id": "8TX02017P3456",
            "stored_credential": {
                "payment_initiator": "MERCHANT",
                "payment_type": "UNSCHEDULED",
                "usage": "SUBSEQUENT",
            },
        }
    }
    pi = json.loads(out.answer.body)
    assert out.answer.status == 200
    assert pi["id"] == "pi_ppf_5O190127TN364715T" and pi["object"] == "payment_intent"
    assert pi["status"] == "succeeded" and pi["amount_received"] == 1099 and pi["client_secret"] is None
    assert pi["latest_charge"] == "ch_ppf_3C679366HH908993F" and pi["metadata"] == {"order_id": "6735"}
    assert dict(out.ledger)["pi_ppf_5O190127TN364715T"]["capture_id"] == "3C679366HH908993F"
    assert "ch_ppf_3C679366HH908993F" in dict(out.ledger)


def test_stripe_manual_two_steps() -> None:
    created = {
        **ORDER,
        "status": "APPROVED",
        "intent": "AUTHORIZE",
        "purchase_units": [{"amount": {"currency_code": "USD", "value": "10.99"}}],
    }
    authorized = {
        **created,
        "status": "COMPLETED",
        "purchase_units": [
            {
                "amount": {"currency_code": "USD", "value": "10.99"},
                "payments": {
                    "authorizations": [
                        {"id": "AUTH1", "status": "CREATED", "amount": {"currency_code": "USD", "value": "10.99"}}
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
            "capture_method": "manual",
        }
    )
    sent, out = drive(
        s2p.translate(WireRequest("POST", "/v1/payment_intents", body=body), CTX),
        [ok(201, created), ok(201, authorized)],
    )
    assert [s.path for s in sent] == ["/v2/checkout/orders", f"/v2/checkout/orders/{ORDER['id']}/authorize"]
    assert sent[1].headers["PayPal-Request-Id"].endswith("-authorize")
    pi = json.loads(out.answer.body)
    assert pi["status"] == "requires_capture" and pi["amount_capturable"] == 1099


@pytest.mark.parametrize(
    ("status", "issue", "want_status", "want_code"),
    [
        (422, "INSTRUMENT_DECLINED", 402, "card_declined"),
        (422, "CARD_EXPIRED", 402, "expired_card"),
        (409, "PREVIOUS_REQUEST_IN_PROGRESS", 429, "lock_timeout"),
        (429, "RATE_LIMIT_REACHED", 429, "rate_limit"),
        (400, "MISSING_REQUIRED_PARAMETER", 400, "parameter_missing"),
        (404, "INVALID_RESOURCE_ID", 404, "resource_missing"),
        (401, None, 500, None),
        (503, None, 500, None),
    ],
)
def test_paypal_errors_to_stripe(status: int, issue: str | None, want_status: int, want_code: str | None) -> None:
    err = {"name": "X", "message": "m", "debug_id": "dbg1", "details": [{"issue": issue}] if issue else []}
    answer = s2p.stripe_error_from_paypal(ok(status, err))
    assert answer.status == want_status
    body = json.loads(answer.body)["error"]
    assert body.get("code") == want_code
    assert body["type"] in ("card_error", "invalid_request_error", "api_error")


def test_stripe_refund_to_paypal() -> None:
    record = {
        "kind": "payment_intent",
        "owner": "paypal",
        "order_id": "O1",
        "capture_id": "C1",
        "currency": "usd",
        "amount": 1099,
    }
    ctx = FailoverContext(source="stripe", target="paypal", idempotency_key="rk", records={"pi_ppf_O1": record})
    body = encode_stripe_form(
        {"payment_intent": "pi_ppf_O1", "amount": 500, "reason": "requested_by_customer", "metadata": {"x": "y"}}
    )
    refund = {
        "id": "R1",
        "status": "COMPLETED",
        "amount": {"currency_code": "USD", "value": "5.00"},
        "create_time": "2023-11-14T22:13:20Z",
    }
    sent, out = drive(s2p.translate(WireRequest("POST", "/v1/refunds", body=body), ctx), [ok(201, refund)])
    assert sent[0].path == "/v2/payments/captures/C1/refund"
    assert sent[0].json() == {
        "amount": {"currency_code": "USD", "value": "5.00"},
        "note_to_payer": "requested by customer",
    }
    assert sent[0].headers["PayPal-Request-Id"].endswith("-refund")
    re_obj = json.loads(out.answer.body)
    assert re_obj == {
        **re_obj,
        "id": "re_ppf_R1",
        "object": "refund",
        "amount": 500,
        "currency": "usd",
        "status": "succeeded",
        "payment_intent": "pi_ppf_O1",
        "charge": "ch_ppf_C1",
        "metadata": {"x": "y"},
        "reason": "requested_by_customer",
    }


def test_stripe_refund_unmappable_refuses() -> None:
    ctx = FailoverContext(source="stripe", target="paypal", records={"pi_ppf_O1": {"capture_id": "C1"}})
    body = encode_stripe_form({"payment_intent": "pi_ppf_O1", "reverse_transfer": True})
    with pytest.raises(Refused) as info:
        drive(s2p.translate(WireRequest("POST", "/v1/refunds", body=body), ctx), [])
    assert info.value.reason == "unmappable_field"


# ---- PayPal -> Stripe --------------------------------------------------------------------------

PCTX = FailoverContext(
    source="paypal", target="stripe", payment_methods={"VAULT1": "cus_1:pm_card_visa"}, idempotency_key="pp-req-1"
)
PI = {
    "id": "pi_3abc",
    "object": "payment_intent",
    "amount": 2000,
    "amount_received": 2000,
    "currency": "usd",
    "status": "succeeded",
    "capture_method": "automatic",
    "created": 1_700_000_000,
    "latest_charge": {"id": "ch_1", "amount_refunded": 0},
}


def test_paypal_order_to_stripe_pi() -> None:
    order = {
        "intent": "CAPTURE",
        "purchase_units": [
            {
                "reference_id": "r1",
                "custom_id": "c1",
                "invoice_id": "i1",
                "description": "d",
                "soft_descriptor": "SHOP",
                "amount": {"currency_code": "USD", "value": "20.00"},
            }
        ],
        "payment_source": {"card": {"vault_id": "VAULT1", "stored_credential": {"payment_initiator": "MERCHANT"}}},
    }
    sent, out = drive(
        p2s.translate(WireRequest("POST", "/v2/checkout/orders", body=json.dumps(order).encode()), PCTX), [ok(200, PI)]
    )
    req = sent[0]
    assert req.path == "/v1/payment_intents" and req.headers["Idempotency-Key"] == PCTX.derived_key("create")
    assert dict(parse_qsl(req.body.decode())) == {
        "amount": "2000",
        "currency": "usd",
        "confirm": "true",
        "capture_method": "automatic",
        "customer": "cus_1",
        "payment_method": "pm_card_visa",
        "description": "d",
        "metadata[paypal_custom_id]": "c1",
        "metadata[paypal_invoice_id]": "i1",
        "metadata[paypal_reference_id]": "r1",
        "statement_descriptor_suffix": "SHOP",
        "off_session": "true",
        "expand[0]": "latest_charge",
    }
    assert out.answer.status == 201
    reply = json.loads(out.answer.body)
    assert reply["id"] == p2s.synthetic("O", "pi_3abc") and reply["status"] == "COMPLETED"
    cap = reply["purchase_units"][0]["payments"]["captures"][0]
    assert cap["status"] == "COMPLETED" and cap["amount"] == {"currency_code": "USD", "value": "20.00"}
    assert cap["custom_id"] == "c1"
    assert {k for k, _ in out.ledger} == {reply["id"], cap["id"], p2s.synthetic("A", "pi_3abc")}


@pytest.mark.parametrize(
    ("pi_status", "order_status"),
    [
        ("succeeded", "COMPLETED"),
        ("processing", "COMPLETED"),
        ("requires_capture", "COMPLETED"),
        ("requires_action", "PAYER_ACTION_REQUIRED"),
        ("requires_confirmation", "APPROVED"),
        ("canceled", "VOIDED"),
    ],
)
def test_pi_status_to_order_status(pi_status: str, order_status: str) -> None:
    assert p2s.order_from_pi({**PI, "status": pi_status}, {})["status"] == order_status


@pytest.mark.parametrize(
    ("status", "code", "want_status", "issue"),
    [
        (402, "card_declined", 422, "INSTRUMENT_DECLINED"),
        (402, "expired_card", 422, "CARD_EXPIRED"),
        (402, "authentication_required", 422, "PAYER_ACTION_REQUIRED"),
        (404, "resource_missing", 404, "INVALID_RESOURCE_ID"),
        (429, "rate_limit", 429, "RATE_LIMIT_REACHED"),
        (429, "lock_timeout", 409, "PREVIOUS_REQUEST_IN_PROGRESS"),
        (400, "parameter_missing", 400, "MISSING_REQUIRED_PARAMETER"),
        (401, None, 500, None),
        (500, None, 500, None),
    ],
)
def test_stripe_errors_to_paypal(status: int, code: str | None, want_status: int, issue: str | None) -> None:
    answer = p2s.paypal_error_from_stripe(
        ok(status, {"error": {"type": "x", "code": code, "message": "m"}}, **{"Request-Id": "req_1"})
    )
    body = json.loads(answer.body)
    assert answer.status == want_status and body["debug_id"] == "req_1" and body["name"]
    assert (body.get("details") or [{}])[0].get("issue") == issue


def test_paypal_refund_to_stripe() -> None:
    record = {"kind": "order", "owner": "stripe", "pi": "pi_3abc"}
    cid = p2s.synthetic("C", "pi_3abc")
    ctx = FailoverContext(source="paypal", target="stripe", idempotency_key="rr", records={cid: record})
    body = json.dumps({"amount": {"currency_code": "USD", "value": "5.00"}, "note_to_payer": "sorry"}).encode()
    refund = {
        "id": "re_1",
        "object": "refund",
        "amount": 500,
        "currency": "usd",
        "status": "succeeded",
        "created": 1_700_000_000,
    }
    sent, out = drive(
        p2s.translate(WireRequest("POST", f"/v2/payments/captures/{cid}/refund", body=body), ctx), [ok(200, refund)]
    )
    assert dict(parse_qsl(sent[0].body.decode())) == {
        "payment_intent": "pi_3abc",
        "amount": "500",
        "metadata[paypal_note_to_payer]": "sorry",
    }
    reply = json.loads(out.answer.body)
    assert out.answer.status == 201 and reply["status"] == "COMPLETED" and reply["amount"]["value"] == "5.00"
    assert reply["note_to_payer"] == "sorry" and reply["id"].startswith("EGF")


# ---- SendGrid -> Mailgun -----------------------------------------------------------------------

MCTX = FailoverContext(
    source="sendgrid", target="mailgun", target_settings={"domain": "mg.example.com"}, templates={"d-1": "welcome"}
)


def _sg(
    body: dict[str, Any], answers: list[WireAnswer], ctx: FailoverContext = MCTX
) -> tuple[list[WireRequest], Translated]:
    return drive(sg2mg.translate(WireRequest("POST", "/v3/mail/send", body=json.dumps(body).encode()), ctx), answers)


MG_OK = ok(200, {"id": "<20111114174239.25659.5817@mg.example.com>", "message": "Queued. Thank you."})


def test_sendgrid_to_mailgun_fields() -> None:
    body = {
        "personalizations": [
            {
                "to": [{"email": "a@x.org", "name": "A"}],
                "bcc": [{"email": "b@x.org"}],
                "custom_args": {"k": "p"},
                "headers": {"X-P": "1"},
                "send_at": 1_700_000_000,
            }
        ],
        "from": {"email": "s@x.com"},
        "subject": "S",
        "content": [{"type": "text/plain", "value": "t"}],
        "custom_args": {"k": "top", "j": "2"},
        "reply_to_list": [{"email": "r1@x.com"}, {"email": "r2@x.com"}],
        "mail_settings": {"sandbox_mode": {"enable": True}},
        "tracking_settings": {"click_tracking": {"enable": False}, "open_tracking": {"enable": True}},
    }
    sent, out = _sg(body, [MG_OK])
    assert sent[0].path == "/v3/mg.example.com/messages"
    assert parse_qsl(sent[0].body.decode()) == [
        ("from", "s@x.com"),
        ("to", "A <a@x.org>"),
        ("bcc", "b@x.org"),
        ("subject", "S"),
        ("text", "t"),
        ("h:Reply-To", "r1@x.com, r2@x.com"),
        ("o:testmode", "yes"),
        ("o:tracking-clicks", "no"),
        ("o:tracking-opens", "yes"),
        ("h:X-P", "1"),
        ("v:k", "p"),
        ("v:j", "2"),
        ("o:deliverytime", "Tue, 14 Nov 2023 22:13:20 +0000"),
    ]
    assert out.answer.status == 200  # sandbox: SendGrid answers 200
    assert out.answer.headers["X-Message-Id"] == "20111114174239.25659.5817@mg.example.com"


def test_sendgrid_batch_personalizations() -> None:
    body = {
        "personalizations": [
            {"to": [{"email": "a@x.org"}], "subject": "Hi A"},
            {"to": [{"email": "b@x.org"}], "subject": "Hi B"},
        ],
        "from": {"email": "s@x.com"},
        "content": [{"type": "text/html", "value": "<p>x</p>"}],
    }
    sent, out = _sg(body, [MG_OK])
    fields = parse_qsl(sent[0].body.decode())
    assert ("subject", "%recipient.subject%") in fields
    assert [v for k, v in fields if k == "to"] == ["a@x.org", "b@x.org"]
    rv = json.loads(dict(fields)["recipient-variables"])
    assert rv == {"a@x.org": {"subject": "Hi A"}, "b@x.org": {"subject": "Hi B"}}
    assert out.answer.status == 202


def test_sendgrid_fan_out_with_substitutions() -> None:
    body = {
        "personalizations": [
            {"to": [{"email": "a@x.org"}], "cc": [{"email": "c@x.org"}], "substitutions": {"-name-": "Ann"}},
            {"to": [{"email": "b@x.org"}], "substitutions": {"-name-": "Bob"}},
        ],
        "from": {"email": "s@x.com"},
        "subject": "Hi -name-",
        "content": [{"type": "text/plain", "value": "Dear -name-"}],
    }
    lossy = dataclasses.replace(MCTX, allow_lossy=True)  # a fan-out is not atomic: opt-in
    sent, out = _sg(body, [MG_OK, ok(200, {"id": "<second@mg>", "message": "Queued. Thank you."})], lossy)
    assert len(sent) == 2
    first, second = (dict(parse_qsl(s.body.decode())) for s in sent)
    assert first["subject"] == "Hi Ann" and first["text"] == "Dear Ann" and first["cc"] == "c@x.org"
    assert second["subject"] == "Hi Bob" and second["to"] == "b@x.org"
    assert out.answer.headers["X-Egressd-Message-Ids"].endswith("second@mg")


FAN_OUT = {
    "personalizations": [
        {"to": [{"email": "a@x.org"}], "substitutions": {"-name-": "Ann"}},
        {"to": [{"email": "b@x.org"}], "substitutions": {"-name-": "Bob"}},
    ],
    "from": {"email": "s@x.com"},
    "subject": "Hi -name-",
    "content": [{"type": "text/plain", "value": "Dear -name-"}],
}


def test_sendgrid_fan_out_is_refused_by_default() -> None:
    with pytest.raises(Refused) as info:
        _sg(FAN_OUT, [])
    assert info.value.reason == "not_atomic"


def test_sendgrid_partial_fan_out_says_what_went_out() -> None:
    lossy = dataclasses.replace(MCTX, allow_lossy=True)
    sent, out = _sg(FAN_OUT, [MG_OK, ok(500, {"message": "boom"})], lossy)
    assert len(sent) == 2 and out.answer.status == 500
    assert "first 1 of 2 sends went out" in out.answer.json()["errors"][0]["message"]


def test_sendgrid_over_limit_answered_without_mailgun() -> None:
    body = {
        "personalizations": [{"to": [{"email": f"u{i}@x.org"} for i in range(1001)]}],
        "from": {"email": "s@x.com"},
        "subject": "S",
        "content": [{"type": "text/plain", "value": "t"}],
    }
    sent, out = _sg(body, [])
    assert sent == [] and out.answer.status == 400 and "errors" in json.loads(out.answer.body)


@pytest.mark.parametrize(
    ("status", "body", "want_status", "field"),
    [
        (400, {"message": "from parameter is missing"}, 400, "from"),
        (400, {"message": "to parameter is not a valid address"}, 400, "personalizations.0.to"),
        (401, "Forbidden", 500, None),
        (404, {"message": "Domain not found: mg"}, 500, None),
        (413, {"message": "too big"}, 413, None),
        (500, {"message": "x"}, 500, None),
    ],
)
def test_mailgun_errors_to_sendgrid(status: int, body: Any, want_status: int, field: str | None) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    answer = sg2mg.sendgrid_error_from_mailgun(WireAnswer(status, {}, raw))
    assert answer.status == want_status
    assert json.loads(answer.body)["errors"][0]["field"] == field


def test_mailgun_429_to_sendgrid() -> None:
    msg = "Domain mg is not allowed to send: request limit exceeded, try again after Tue, 14 Nov 2023 22:13:20 +0000"
    answer = sg2mg.sendgrid_error_from_mailgun(ok(429, {"message": msg}))
    assert answer.status == 429 and answer.headers["X-RateLimit-Reset"] == "1700000000"
    assert answer.headers["X-RateLimit-Remaining"] == "0"


# ---- Mailgun -> SendGrid -----------------------------------------------------------------------


def test_mailgun_to_sendgrid_fields() -> None:
    ctx = FailoverContext(source="mailgun", target="sendgrid", templates={"welcome": "d-1"})
    form = [
        ("from", "Shop <s@x.com>"),
        ("to", "a@x.org, B <b@x.org>"),
        ("cc", "c@x.org"),
        ("subject", "S"),
        ("template", "welcome"),
        ("t:variables", '{"n":1}'),
        ("o:tag", "t1"),
        ("o:tag", "t2"),
        ("o:deliverytime", "Tue, 14 Nov 2023 22:13:20 +0000"),
        ("o:testmode", "yes"),
        ("o:tracking", "no"),
        ("h:Reply-To", "r@x.com"),
        ("h:X-Mailgun-Variables", '{"a": 1}'),
        ("h:X-Custom", "v"),
        ("v:k", "v"),
    ]
    from urllib.parse import urlencode

    req = WireRequest(
        "POST",
        "/v3/mg.example.com/messages",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=urlencode(form).encode(),
    )
    sent, out = drive(mg2sg.translate(req, ctx), [WireAnswer(200, {"X-Message-Id": "abc"}, b"")])
    mail = sent[0].json()
    assert mail == {
        "from": {"email": "s@x.com", "name": "Shop"},
        "subject": "S",
        "template_id": "d-1",
        "personalizations": [
            {
                "to": [{"email": "a@x.org"}, {"email": "b@x.org", "name": "B"}],
                "cc": [{"email": "c@x.org"}],
                "dynamic_template_data": {"n": 1},
            }
        ],
        "categories": ["t1", "t2"],
        "send_at": 1_700_000_000,
        "mail_settings": {"sandbox_mode": {"enable": True}},
        "tracking_settings": {"click_tracking": {"enable": False}, "open_tracking": {"enable": False}},
        "reply_to": {"email": "r@x.com"},
        "headers": {"X-Custom": "v"},
        "custom_args": {"a": "1", "k": "v"},
    }
    assert json.loads(out.answer.body) == {"id": "<abc>", "message": "Queued. Thank you."}


def test_mailgun_recipient_variables_and_inline() -> None:
    from plugins.forms import FilePart

    ctx = FailoverContext(source="mailgun", target="sendgrid")
    body, ctype = encode_multipart(
        [
            ("from", "s@x.com"),
            ("to", "a@x.org"),
            ("to", "b@x.org"),
            ("subject", "Hi %recipient.first%"),
            ("html", '<img src="cid:logo.png">'),
            ("recipient-variables", '{"a@x.org": {"first": "Ann"}}'),
        ],
        [FilePart("inline", "logo.png", "image/png", b"PNG")],
    )
    req = WireRequest("POST", "/v3/d/messages", headers={"Content-Type": ctype}, body=body)
    sent, _out = drive(mg2sg.translate(req, ctx), [WireAnswer(202, {"X-Message-Id": "m"}, b"")])
    mail = sent[0].json()
    assert [p["to"] for p in mail["personalizations"]] == [[{"email": "a@x.org"}], [{"email": "b@x.org"}]]
    assert mail["personalizations"][0]["substitutions"]["%recipient.first%"] == "Ann"
    assert mail["attachments"] == [
        {
            "content": "UE5H",
            "filename": "logo.png",
            "disposition": "inline",
            "type": "image/png",
            "content_id": "logo.png",
        }
    ]


@pytest.mark.parametrize(
    ("status", "want_status", "text"),
    [
        (400, 400, "personalizations.0.to: bad"),
        (401, 500, "configuration"),
        (413, 413, "size"),
        (429, 429, "request limit exceeded"),
        (500, 500, "Internal Server Error"),
    ],
)
def test_sendgrid_errors_to_mailgun(status: int, want_status: int, text: str) -> None:
    answer = mg2sg.mailgun_error_from_sendgrid(
        ok(
            status,
            {"errors": [{"message": "bad", "field": "personalizations.0.to"}]},
            **{"X-RateLimit-Reset": "1700000000"},
        ),
        None,
    )
    assert answer.status == want_status and text in json.loads(answer.body)["message"]


def test_mailgun_lossy_refuses_unless_allowed() -> None:
    req = WireRequest(
        "POST",
        "/v3/d/messages",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=b"from=s%40x.com&to=a%40x.org&text=t&o%3Arequire-tls=yes",
    )
    with pytest.raises(Refused):
        drive(mg2sg.translate(req, FailoverContext(source="mailgun", target="sendgrid")), [])
    sent, _ = drive(
        mg2sg.translate(req, FailoverContext(source="mailgun", target="sendgrid", allow_lossy=True)),
        [WireAnswer(202, {"X-Message-Id": "m"}, b"")],
    )
    assert len(sent) == 1


# ---- plugin interface --------------------------------------------------------------------------


def test_plugins_declare_pairs_and_ids() -> None:
    stripe, paypal = load_plugin("stripe"), load_plugin("paypal")
    sendgrid, mailgun = load_plugin("sendgrid"), load_plugin("mailgun", {"domain": "d"})
    assert stripe.failover_to(paypal) is s2p.translate and paypal.failover_to(stripe) is p2s.translate
    assert sendgrid.failover_to(mailgun) is sg2mg.translate and mailgun.failover_to(sendgrid) is mg2sg.translate
    assert stripe.failover_to(sendgrid) is None and load_plugin("generic").failover_to(stripe) is None
    assert stripe.references(WireRequest("GET", "/v1/payment_intents/pi_ppf_X")) == ("pi_ppf_X",)
    assert stripe.references(WireRequest("GET", "/v1/payment_intents/pi_3abc")) == ()
    assert stripe.owns_id("pi_3abc") and not stripe.owns_id("pi_ppf_X")
    oid = p2s.synthetic("O", "pi_1")
    assert paypal.references(WireRequest("GET", f"/v2/checkout/orders/{oid}")) == (oid,)
    assert stripe.honours_idempotency("POST", "/", {"Idempotency-Key": "k"})
    assert not sendgrid.honours_idempotency("POST", "/", {})
    assert stripe.probe_verdict(WireAnswer(200)) == "processed" and stripe.probe_verdict(WireAnswer(503)) == "unknown"


# ---- what a refusal names (the app is told: contract 7.4 `detail=`) ----------------------------


def _refusal(run: TranslatorRun) -> Refused:
    with pytest.raises(Refused) as info:
        next(run)
    return info.value


STRIPE_BASE = {"amount": 1099, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}


def _s2p_create(params: dict[str, Any], ctx: FailoverContext = CTX, **headers: str) -> Refused:
    request = WireRequest("POST", "/v1/payment_intents", headers=headers, body=encode_stripe_form(params))
    return _refusal(s2p.translate(request, ctx))


@pytest.mark.parametrize(
    ("params", "headers", "reason", "names"),
    [
        ({"payment_method": "pm_unknown_42"}, {}, "no_crosswalk_entry", ("payment_method",)),
        ({"payment_method": None}, {}, "no_crosswalk_entry", ("payment_method",)),
        ({"amount": "12.5"}, {}, "amount_not_representable", ("amount",)),
        ({"currency": "kwd"}, {}, "unsupported_currency", ("currency",)),
        ({"on_behalf_of": "acct_9"}, {}, "unmappable_field", ("on_behalf_of",)),
        ({}, {"Stripe-Account": "acct_9"}, "unmappable_field", ("Stripe-Account",)),
        ({"description": "x" * 128}, {}, "lossy", ("description",)),
        ({"statement_descriptor_suffix": "S" * 23}, {}, "lossy", ("statement_descriptor_suffix",)),
        ({"payment_method_types": ["card", "link"]}, {}, "lossy", ("payment_method_types",)),
        ({"expand": ["latest_charge", "customer"], "return_url": "https://x"}, {}, "lossy", ("return_url", "expand")),
    ],
)
def test_stripe_create_refusals_name_the_field(
    params: dict[str, Any], headers: dict[str, str], reason: str, names: tuple[str, ...]
) -> None:
    refused = _s2p_create({**STRIPE_BASE, **params}, **headers)
    assert (refused.reason, refused.names) == (reason, names)
    if "pm_unknown_42" in str(params):
        assert "pm_unknown_42" in refused.detail  # the log text may quote it; the names never do


def test_stripe_follow_up_refusals_name_the_field() -> None:
    # an object that lives on the primary: named by where the app put its id
    assert _refusal(s2p.translate(WireRequest("GET", "/v1/payment_intents/pi_3real"), CTX)).names == ("intent",)
    assert _refusal(s2p.translate(WireRequest("GET", "/v1/refunds/re_3real"), CTX)).names == ("refund",)
    body = encode_stripe_form({"charge": "ch_3real", "amount": 100})
    refused = _refusal(s2p.translate(WireRequest("POST", "/v1/refunds", body=body), CTX))
    assert (refused.reason, refused.names) == ("not_failed_over", ("charge",))
    ctx = FailoverContext(source="stripe", target="paypal", records={"pi_ppf_O1": {"capture_id": "C1"}})
    body = encode_stripe_form({"payment_intent": "pi_ppf_O1", "expand": ["charge"]})
    assert _refusal(s2p.translate(WireRequest("POST", "/v1/refunds", body=body), ctx)).names == ("expand",)


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/v1/customers", "POST /v1/customers"),
        ("POST", "/v1/customers/cus_NffrFeUfNV2Hib/sources", "POST /v1/customers/{id}/sources"),
        ("GET", "/v1/charges/ch_3MmlLrLkdIwHu7ix0snN0B15", "GET /v1/charges/{id}"),
        ("POST", "/v1/payment_intents/pi_3abc/confirm", "POST /v1/payment_intents/{id}/confirm"),
    ],
)
def test_an_operation_without_equivalent_is_named_without_its_ids(method: str, path: str, name: str) -> None:
    refused = _refusal(s2p.translate(WireRequest(method, path), CTX))
    assert refused.reason in ("unsupported_operation", "not_failed_over")
    if refused.reason == "unsupported_operation":
        assert refused.names == (name,)


def test_paypal_refusals_name_paypal_fields() -> None:
    def create(order: dict[str, Any]) -> Refused:
        request = WireRequest("POST", "/v2/checkout/orders", body=json.dumps(order).encode())
        return _refusal(p2s.translate(request, PCTX))

    unit = {"amount": {"currency_code": "USD", "value": "20.00"}}
    source = {"card": {"vault_id": "VAULT1"}}
    assert create({"purchase_units": [unit], "payment_source": {"card": {"vault_id": "NOPE"}}}).names == (
        "payment_source.card.vault_id",
    )
    raw = create({"purchase_units": [unit], "payment_source": {"card": {"number": "4111111111111111"}}})
    assert raw.names == ("payment_source.card",) and "4111" not in ",".join(raw.names)
    amount = create(
        {"purchase_units": [{"amount": {"currency_code": "USD", "value": "20.001"}}], "payment_source": source}
    )
    assert (amount.reason, amount.names) == ("amount_not_representable", ("purchase_units[0].amount.value",))
    currency = create(
        {"purchase_units": [{"amount": {"currency_code": "BRL", "value": "20"}}], "payment_source": source}
    )
    assert currency.names == ("purchase_units[0].amount.currency_code",)
    lossy = create({"purchase_units": [{**unit, "items": []}], "payment_source": source, "application_context": {}})
    assert lossy.names == ("purchase_units[0].items", "application_context")
    payee = create({"purchase_units": [{**unit, "payee": {}}], "payment_source": source})
    assert payee.names == ("purchase_units[0].payee",)
    events = _refusal(p2s.translate(WireRequest("GET", "/v1/reporting/transactions"), PCTX))
    assert events.names == ("GET /v1/reporting/transactions",)


def test_mail_refusals_name_the_app_fields() -> None:
    with pytest.raises(Refused) as info:
        _sg({**FAN_OUT, "asm": {"group_id": 1}, "content": [{"type": "text/x-amp-html", "value": "x"}]}, [])
    assert info.value.names == ("asm", "content.0.type")
    with pytest.raises(Refused) as info:
        _sg(FAN_OUT, [])
    assert info.value.names == ("personalizations",)
    request = WireRequest("GET", "/v3/mg.example.com/events")
    refused = _refusal(mg2sg.translate(request, FailoverContext(source="mailgun", target="sendgrid")))
    assert refused.names == ("GET /v3/{domain}/events",)
    form = WireRequest(
        "POST",
        "/v3/d/messages",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=b"from=s%40x.com&to=a%40x.org&text=t&o%3Adeliverytime=tomorrow",
    )
    assert _refusal(mg2sg.translate(form, FailoverContext(source="mailgun", target="sendgrid"))).names == (
        "o:deliverytime",
    )


# ---- expand[]: honoured where the translation can build the object ---------------------------

ORDER_WITH_SOURCE = {
    **ORDER,
    "payment_source": {"card": {"last_digits": "4242", "brand": "VISA", "type": "CREDIT", "expiry": "2030-04"}},
}


def test_stripe_expand_builds_the_charge_and_payment_method() -> None:
    body = encode_stripe_form({**STRIPE_BASE, "expand": ["latest_charge", "payment_method"]})
    sent, out = drive(
        s2p.translate(WireRequest("POST", "/v1/payment_intents", body=body), CTX), [ok(201, ORDER_WITH_SOURCE)]
    )
    assert "expand" not in json.dumps(sent[0].json())  # nothing of it reaches PayPal
    pi = out.answer.json()
    charge = pi["latest_charge"]
    assert charge["id"] == "ch_ppf_3C679366HH908993F" and charge["object"] == "charge"
    assert charge["status"] == "succeeded" and charge["captured"] is True and charge["paid"] is True
    assert charge["amount"] == charge["amount_captured"] == 1099 and charge["amount_refunded"] == 0
    assert charge["payment_intent"] == pi["id"] and charge["payment_method"] == "pm_card_visa"
    assert charge["payment_method_details"]["card"]["last4"] == "4242"
    pm = pi["payment_method"]
    assert pm["id"] == "pm_card_visa" and pm["object"] == "payment_method" and pm["type"] == "card"
    assert pm["card"] == {
        "brand": "visa",
        "country": None,
        "exp_month": 4,
        "exp_year": 2030,
        "funding": "credit",
        "last4": "4242",
    }
    # the ledger keeps ids, not the expanded objects
    assert "latest_charge" not in dict(out.ledger)[pi["id"]]


def test_stripe_expand_on_retrieve_and_unknown_card_details() -> None:
    ctx = FailoverContext(
        source="stripe",
        target="paypal",
        records={"pi_ppf_O1": {"order_id": "O1", "amount": 1099, "currency": "usd", "payment_method": "pm_x"}},
    )
    request = WireRequest("GET", "/v1/payment_intents/pi_ppf_O1", query="expand[0]=payment_method")
    _sent, out = drive(s2p.translate(request, ctx), [ok(200, {**ORDER, "id": "O1"})])
    pm = out.answer.json()["payment_method"]
    assert pm["id"] == "pm_x" and pm["card"]["brand"] == "unknown" and pm["card"]["last4"] is None
    unknown = WireRequest("GET", "/v1/payment_intents/pi_ppf_O1", query="expand[0]=customer")
    assert _refusal(s2p.translate(unknown, ctx)).names == ("expand",)
    lossy_ok = dataclasses.replace(ctx, allow_lossy=True)
    _sent, out = drive(s2p.translate(unknown, lossy_ok), [ok(200, {**ORDER, "id": "O1"})])
    assert out.answer.json()["customer"] is None  # dropped only because the policy allows lossy
