"""Properties: a random valid SendGrid request translated to Mailgun keeps every recipient,
subject and body; a refused Stripe request names fields, never values."""

from __future__ import annotations

import json
from email.utils import getaddresses
from typing import Any
from urllib.parse import parse_qsl, unquote

from hypothesis import given, settings
from hypothesis import strategies as st

from plugins import mail_sendgrid_to_mailgun as sg2mg
from plugins import pay_stripe_to_paypal as s2p
from plugins.base import FailoverContext, Refused, WireAnswer, WireRequest, detail_value, encode_name
from plugins.forms import encode_stripe_form, parse_form

# allow_lossy: fan-outs (several Mailgun sends) are opt-in; these mails have no lossy fields.
CTX = FailoverContext(
    source="sendgrid", target="mailgun", target_settings={"domain": "mg.example.com"}, allow_lossy=True
)
local = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=10).filter(
    lambda s: s[0].isalnum()
)
email = st.builds(lambda a, d: f"{a}@{d}.example", local, st.sampled_from(["a", "b", "c"]))
name = st.one_of(
    st.none(),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12).filter(
        lambda s: ";" not in s and "," not in s
    ),
)
text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


def mailbox(e: str, n: str | None) -> dict[str, str]:
    return {"email": e, **({"name": n} if n else {})}


@st.composite
def sendgrid_mail(draw: Any) -> dict[str, Any]:
    n_pers = draw(st.integers(1, 4))
    used: set[str] = set()
    pers = []
    for _ in range(n_pers):
        p: dict[str, Any] = {}
        for kind, lo in (("to", 1), ("cc", 0), ("bcc", 0)):
            addrs = draw(st.lists(email, min_size=lo, max_size=3, unique=True))
            addrs = [a for a in addrs if a not in used] or ([] if lo == 0 else [f"x{len(used)}@z.example"])
            used.update(addrs)
            if addrs:
                p[kind] = [mailbox(a, draw(name)) for a in addrs]
        if draw(st.booleans()):
            p["subject"] = draw(text)
        pers.append(p)
    content = []
    if draw(st.booleans()):
        content.append({"type": "text/plain", "value": draw(text)})
    if not content or draw(st.booleans()):
        content.append({"type": "text/html", "value": draw(text)})
    return {
        "personalizations": pers,
        "from": mailbox(draw(email), draw(name)),
        "subject": draw(text),
        "content": content,
    }


@settings(max_examples=150, deadline=None)
@given(sendgrid_mail())
def test_translation_keeps_recipients_subject_and_body(mail: dict[str, Any]) -> None:
    run = sg2mg.translate(WireRequest("POST", "/v3/mail/send", body=json.dumps(mail).encode()), CTX)
    sent = []
    step = next(run)
    try:
        while True:
            sent.append(step)
            step = run.send(WireAnswer(200, {}, b'{"id":"<m@x>","message":"Queued. Thank you."}'))
    except StopIteration as stop:
        assert stop.value.answer.status == 202
    expected = {
        (k, a["email"].lower()) for p in mail["personalizations"] for k in ("to", "cc", "bcc") for a in p.get(k, [])
    }
    got: set[tuple[str, str]] = set()
    subjects: list[str] = []
    bodies: set[tuple[str, str]] = set()
    for req in sent:
        fields, _ = parse_form(req.body, req.headers["Content-Type"])
        rv = {}
        for key, value in fields:
            if key in ("to", "cc", "bcc"):
                got |= {(key, e.lower()) for _, e in getaddresses([value])}
            if key in ("text", "html"):
                bodies.add((key, value))
            if key == "recipient-variables":
                rv = json.loads(value)
        subject = dict(fields)["subject"]
        if subject == "%recipient.subject%":
            subjects += [v["subject"] for v in rv.values()]
        else:
            subjects += [subject] * sum(1 for k, _ in fields if k == "to")
    assert got == expected
    want_subjects = (
        sorted(p.get("subject") or mail["subject"] for p in mail["personalizations"] for _ in p["to"])
        if len(sent) > 1 or any("recipient-variables" in r.body.decode() for r in sent)
        else None
    )
    if want_subjects is not None:
        assert sorted(subjects) == want_subjects
    else:
        assert subjects[0] == (mail["personalizations"][0].get("subject") or mail["subject"])
    want_bodies = {("text" if c["type"] == "text/plain" else "html", c["value"]) for c in mail["content"]}
    assert bodies == want_bodies
    from_field = (
        dict(parse_qsl(sent[0].body.decode())).get("from") if "urlencoded" in sent[0].headers["Content-Type"] else None
    )
    assert from_field is None or getaddresses([from_field])[0][1].lower() == mail["from"]["email"].lower()


# ---- a refusal names fields, never values (contract 7.4 `detail=`) ---------------------------

SECRETISH = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=8, max_size=16)
STRIPE_CTX = FailoverContext(source="stripe", target="paypal", payment_methods={"pm_card_visa": "8TX02017P3456"})


@st.composite
def stripe_create(draw: Any) -> tuple[dict[str, Any], list[str]]:
    """PaymentIntent create params with app-chosen extra fields; and every value in it."""
    params: dict[str, Any] = {
        "amount": draw(st.sampled_from([2000, 150050, 5120, 0])),
        "currency": draw(st.sampled_from(["usd", "huf", "kwd", "inr"])),
        "payment_method": draw(st.sampled_from(["pm_card_visa", "pm_" + draw(SECRETISH).lower()])),
        "confirm": draw(st.sampled_from([True, False])),
    }
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["receipt_email", "expand", "return_url", "setup_future_usage", "x;y=z,w"]))
        params[key] = [draw(SECRETISH)] if key == "expand" else draw(SECRETISH)
    values = [v for v in params.values() if isinstance(v, str) and len(v) >= 8]
    values += [x for v in params.values() if isinstance(v, list) for x in v]
    return params, values


@settings(max_examples=200, deadline=None)
@given(stripe_create(), st.booleans())
def test_refusal_names_never_carry_a_value(case: tuple[dict[str, Any], list[str]], connect: bool) -> None:
    params, values = case
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if connect:
        headers["Stripe-Account"] = "acct_" + values[0] if values else "acct_1"
    request = WireRequest("POST", "/v1/payment_intents", headers=headers, body=encode_stripe_form(params))
    try:
        next(s2p.translate(request, STRIPE_CTX))
    except Refused as refused:
        assert refused.names, refused  # every refusal from the app's request names something
        told = detail_value(refused.names)
        for value in values:
            assert value not in told
        assert all(0x20 <= ord(c) < 0x7F for c in told) and ";" not in told and "=" not in told
        assert [unquote(n) for n in told.split(",")] == list(refused.names)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_encoded_names_round_trip_and_keep_the_header_intact(name: str) -> None:
    encoded = encode_name(name)
    assert not set(encoded) & set(";,=") and all(0x20 <= ord(c) < 0x7F for c in encoded)
    assert unquote(encoded, errors="strict") == name
