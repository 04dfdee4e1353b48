"""PayPal webhooks: verification through PayPal's API (providers.md 2.10), event ids, and
translation of PayPal capture events into Stripe events (contract 7.5).

Verification. PayPal signs with its own certificate (`PAYPAL-AUTH-ALGO`,
`PAYPAL-CERT-URL`, `PAYPAL-TRANSMISSION-ID`/`-SIG`/`-TIME`); egressd asks PayPal:
`POST /v1/notifications/verify-webhook-signature` with those five values, the
subscription's `webhook_id` and the event (`verification_request`), answered
`{"verification_status": "SUCCESS" | "FAILURE"}` (`verification_verdict`). The event is
spliced into that request as the raw bytes received, not re-serialized: PayPal checks the
signature over what it sent, and a re-encoding (key order, number or unicode escapes)
would fail a genuine event. Local checks first (headers present, `PAYPAL-CERT-URL` an
https URL on a paypal.com host, transmission time within tolerance) so that junk never
costs an API call.

Signing: none. egressd cannot make PayPal's signature, so a PayPal event is delivered with
the headers PayPal sent; the app verifies it with PayPal as above (7.8).

Translation PayPal -> Stripe, for payments a Stripe-shaped app made through a failover to
PayPal (plugins/pay_stripe_to_paypal.py created them, and the routing ledger holds
`pi_ppf_<order id>` and `ch_ppf_<capture id>` -> the PaymentIntent record, and
`re_ppf_<refund id>` -> the refund record):

| PayPal `event_type`          | Stripe `type`                    | `data.object`        |
| ---------------------------- | -------------------------------- | -------------------- |
| PAYMENT.CAPTURE.COMPLETED    | payment_intent.succeeded         | PaymentIntent        |
| PAYMENT.CAPTURE.DENIED       | payment_intent.payment_failed    | PaymentIntent        |
| PAYMENT.CAPTURE.REFUNDED     | charge.refunded                  | Charge               |

The PaymentIntent and Charge are rendered by the same code as the failover's answers
(`pay_stripe_to_paypal.payment_intent` / `charge_object`), from the ledger record and the
event's capture, so the app sees the ids it was given. The event id is `evt_ppf_` + a
hash of the PayPal event id (stable over redeliveries); `created` is the PayPal event's
`create_time`. Any other PayPal event, or one about an object the ledger does not know,
has no translation (None).

The reverse (Stripe events -> PayPal events, for a PayPal-shaped app whose payments
failed over to Stripe) is not done: the app can only check a PayPal event with PayPal's
verify API or certificate, and PayPal never signed what egressd would make, so the event
would be either rejected or, worse, trusted unverified.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from plugins import pay_stripe_to_paypal as s2p
from plugins.money import minor_from_paypal, paypal_value
from plugins.shapes import token, unix
from plugins.webhooks import (
    InboundEvent,
    LedgerLookup,
    RemoteCheck,
    TranslatedEvent,
    Verdict,
    content_id,
    dumps,
    header,
    json_object,
    within,
)

VERIFY_PATH = "/v1/notifications/verify-webhook-signature"
#: request field -> PayPal notification header (providers.md 2.10)
HEADERS = {
    "auth_algo": "PAYPAL-AUTH-ALGO",
    "cert_url": "PAYPAL-CERT-URL",
    "transmission_id": "PAYPAL-TRANSMISSION-ID",
    "transmission_sig": "PAYPAL-TRANSMISSION-SIG",
    "transmission_time": "PAYPAL-TRANSMISSION-TIME",
}
#: The API version the translated Stripe objects are rendered in (the version the
#: PaymentIntent rendering in pay_stripe_to_paypal follows, providers.md [STR-PY]).
STRIPE_API_VERSION = "2026-06-24.dahlia"
EVENT_PREFIX = "evt_ppf_"
STRIPE_TYPES = {
    "PAYMENT.CAPTURE.COMPLETED": "payment_intent.succeeded",
    "PAYMENT.CAPTURE.DENIED": "payment_intent.payment_failed",
    "PAYMENT.CAPTURE.REFUNDED": "charge.refunded",
}
_ORDER_LINK = re.compile(r"/v2/checkout/orders/([A-Za-z0-9]+)$")
_CAPTURE_LINK = re.compile(r"/v2/payments/captures/([A-Za-z0-9]+)$")


# ---- verification --------------------------------------------------------------------------


def _cert_url_ok(url: str) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme == "https" and (host == "paypal.com" or host.endswith(".paypal.com"))


def verification_request(body: bytes, headers: Mapping[str, str], webhook_id: str) -> bytes | None:
    """The JSON body of PayPal's verify-webhook-signature call, the event spliced in as
    received; None when a notification header is missing or the body is not an object."""
    fields: dict[str, str] = {}
    for name, head in HEADERS.items():
        value = header(headers, head)
        if not value:
            return None
        fields[name] = value
    fields["webhook_id"] = webhook_id
    if json_object(body) is None:
        return None
    return dumps(fields)[:-1] + b',"webhook_event":' + body.strip() + b"}"


def verification_verdict(status: int, body: bytes) -> Verdict:
    """PayPal's answer to the verify call: SUCCESS passes, FAILURE is a bad signature,
    anything else means the check could not be made (the provider should retry)."""
    if status == 200:
        answer = json_object(body) or {}
        verdict = answer.get("verification_status")
        if verdict == "SUCCESS":
            return Verdict(True, "ok")
        if verdict == "FAILURE":
            return Verdict(False, "bad_signature")
        return Verdict(False, "remote_check_unreadable", transient=True)
    if 400 <= status < 500 and status not in (401, 403, 408, 429):
        # PayPal says the request itself is wrong (unknown webhook_id, bad cert url...).
        return Verdict(False, "remote_check_refused")
    return Verdict(False, "remote_check_unavailable", transient=True)


def verify(body: bytes, headers: Mapping[str, str], webhook_id: str | None, now: float, tolerance: float) -> Verdict:
    """Local checks; if they pass, a refusal carrying the remote check to make."""
    if not webhook_id:
        return Verdict(False, "no_webhook_id")
    if any(not header(headers, h) for h in HEADERS.values()):
        return Verdict(False, "missing_signature")
    if not _cert_url_ok(header(headers, HEADERS["cert_url"]) or ""):
        return Verdict(False, "untrusted_cert_url")
    sent = unix(header(headers, HEADERS["transmission_time"]), default=-1)
    if sent < 0:
        return Verdict(False, "malformed_signature")
    if not within(sent, now, tolerance):
        return Verdict(False, "timestamp_outside_tolerance")
    request = verification_request(body, headers, webhook_id)
    if request is None:
        return Verdict(False, "malformed_body")
    check = RemoteCheck("POST", VERIFY_PATH, request, {"Content-Type": "application/json"})
    return Verdict(False, "remote_check_required", remote=check)


# ---- events ----------------------------------------------------------------------------------


def _link_id(resource: Mapping[str, Any], pattern: re.Pattern[str]) -> str | None:
    for link in resource.get("links") or []:
        if isinstance(link, Mapping) and link.get("rel") == "up":
            m = pattern.search(str(link.get("href") or "").split("?", 1)[0])
            if m:
                return m.group(1)
    return None


def _related(resource: Mapping[str, Any], name: str) -> str | None:
    sup = resource.get("supplementary_data")
    rel = sup.get("related_ids") if isinstance(sup, Mapping) else None
    value = rel.get(name) if isinstance(rel, Mapping) else None
    return str(value) if value else None


def _ids(event_type: str, resource: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(PayPal object ids, routing-ledger ids) of a capture or refund event."""
    rid = str(resource.get("id") or "")
    if not rid:
        return (), ()
    if event_type.startswith("PAYMENT.CAPTURE.") and event_type != "PAYMENT.CAPTURE.REFUNDED":
        order = _related(resource, "order_id") or _link_id(resource, _ORDER_LINK)
        ledger = [s2p.CH_PREFIX + rid] + ([s2p.PI_PREFIX + order] if order else [])
        return tuple(x for x in (rid, order) if x), tuple(ledger)
    if event_type == "PAYMENT.CAPTURE.REFUNDED":
        capture = _link_id(resource, _CAPTURE_LINK)
        ledger = [s2p.RE_PREFIX + rid] + ([s2p.CH_PREFIX + capture] if capture else [])
        return tuple(x for x in (rid, capture) if x), tuple(ledger)
    return (rid,), ()


def events(body: bytes) -> list[InboundEvent]:
    """A PayPal POST is one event: dedupe on its `id` (`WH-...`)."""
    event = json_object(body)
    if event is None:
        return []
    event_type = str(event.get("event_type") or "")
    resource = event.get("resource")
    object_ids, ledger_ids = _ids(event_type, resource) if isinstance(resource, Mapping) else ((), ())
    event_id = event.get("id")
    return [
        InboundEvent(
            id=str(event_id) if event_id else content_id(body),
            type=event_type,
            body=body,
            object_ids=object_ids,
            ledger_ids=ledger_ids,
        )
    ]


# ---- translation to Stripe ---------------------------------------------------------------------


def stripe_event_id(paypal_event_id: str) -> str:
    return EVENT_PREFIX + token("paypal-event:" + paypal_event_id, 24, upper=False)


def _payment_record(lookup: LedgerLookup, ids: tuple[str, ...]) -> Mapping[str, Any] | None:
    """The PaymentIntent record among the ledger ids (a `re_ppf_` id maps to a refund
    record, which is not enough to render a Charge)."""
    for ledger_id in ids:
        if ledger_id.startswith(s2p.RE_PREFIX):
            continue
        record = lookup(ledger_id)
        if record is not None and record.get("kind") == "payment_intent" and record.get("order_id"):
            return record
    return None


def _order(record: Mapping[str, Any], capture: Mapping[str, Any]) -> dict[str, Any]:
    """The order as far as the event tells it: the record's order with this capture."""
    return {
        "id": record["order_id"],
        "status": "COMPLETED",
        "purchase_units": [{"payments": {"captures": [dict(capture)]}}],
    }


def to_stripe(event: InboundEvent, lookup: LedgerLookup) -> TranslatedEvent | None:
    stripe_type = STRIPE_TYPES.get(event.type)
    if stripe_type is None or not event.ledger_ids:
        return None
    body = json_object(event.body)
    resource = body.get("resource") if body else None
    if body is None or not isinstance(resource, Mapping) or not resource.get("id"):
        return None
    record = _payment_record(lookup, event.ledger_ids)
    if record is None:
        return None
    currency = str(record.get("currency") or "usd").lower()
    if stripe_type == "charge.refunded":
        capture_id = event.object_ids[1] if len(event.object_ids) > 1 else record.get("capture_id")
        amount = int(record.get("amount") or 0)
        breakdown = resource.get("seller_payable_breakdown")
        total = breakdown.get("total_refunded_amount") if isinstance(breakdown, Mapping) else None
        refunded = total if isinstance(total, Mapping) else resource.get("amount") or {}
        value = str(refunded.get("value") or "0")
        refunded_minor = minor_from_paypal(value, currency)
        capture = {
            "id": capture_id,
            "status": "REFUNDED" if refunded_minor >= amount else "PARTIALLY_REFUNDED",
            "amount": {"currency_code": currency.upper(), "value": paypal_value(amount, currency)},
            "create_time": resource.get("create_time"),
        }
        order = _order(record, capture)
        order["purchase_units"][0]["payments"]["refunds"] = [
            {"status": "COMPLETED", "amount": {"currency_code": currency.upper(), "value": value}}
        ]
        pi = s2p.payment_intent(order, record)
        obj = s2p.charge_object(order, record, pi)
    else:
        order = _order(record, resource)
        obj = s2p.payment_intent(order, record)
        if stripe_type == "payment_intent.succeeded" and obj["status"] != "succeeded":
            return None  # a COMPLETED event whose capture says otherwise: not translated
        if stripe_type == "payment_intent.payment_failed" and obj["status"] != "requires_payment_method":
            return None
    event_id = stripe_event_id(event.id)
    stripe_event: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": unix(body.get("create_time"), float(record.get("created") or 0)),
        "data": {"object": obj},
        "livemode": bool(record.get("livemode")),
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": stripe_type,
    }
    return TranslatedEvent(
        event_id=event_id,
        type=stripe_type,
        body=dumps(stripe_event),
        headers={"Content-Type": "application/json; charset=utf-8"},
        content_type="application/json; charset=utf-8",
    )
