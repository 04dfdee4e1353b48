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
from plugins.shapes import unix
from plugins.webhooks import (
    InboundEvent,
    RemoteCheck,
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
