"""Stripe webhook signatures (`Stripe-Signature`, providers.md 1.11) and event ids.

Scheme: `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each v1 the hex
HMAC-SHA256, keyed with the endpoint's whole signing secret (`whsec_...` as text), of
`"<t>.<raw body>"`. Any v1 matching passes: while a secret is being rolled Stripe signs
with both the old and the new one. Other schemes (`v0` test signatures) are ignored, as
the SDK does.

Stripe events are never translated into another provider's shape (the reverse of
PayPal -> Stripe): the only fallback a Stripe primary has is PayPal, and the only way an
app checks a PayPal event is PayPal's own verify API or certificate, which no event
egressd makes can pass. See plugins/webhooks_paypal.py.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from plugins.webhooks import OK, InboundEvent, Verdict, WebhookSecrets, content_id, header, json_object, within

HEADER = "Stripe-Signature"
SCHEME = "v1"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The v1 signature of `body` at `timestamp`."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def parse_header(value: str) -> tuple[int, list[str]] | None:
    """(t, [v1 signatures]) from a `Stripe-Signature` value; None when it has no valid t."""
    timestamp: int | None = None
    sigs: list[str] = []
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            if not val.isdigit() or timestamp is not None:
                return None
            timestamp = int(val)
        elif key == SCHEME and val:
            sigs.append(val)
    return None if timestamp is None else (timestamp, sigs)


def verify(body: bytes, headers: Mapping[str, str], secret: str | None, now: float, tolerance: float) -> Verdict:
    if not secret:
        return Verdict(False, "no_secret")
    value = header(headers, HEADER)
    if not value:
        return Verdict(False, "missing_signature")
    parsed = parse_header(value)
    if parsed is None:
        return Verdict(False, "malformed_signature")
    timestamp, sigs = parsed
    if not sigs:
        return Verdict(False, "missing_signature")
    expected = signature(secret, timestamp, body)
    # Every candidate is compared (no early exit on a match: the time taken says nothing).
    matched = False
    for sig in sigs:
        matched |= hmac.compare_digest(expected.encode(), sig.encode())
    if not matched:
        return Verdict(False, "bad_signature")
    if not within(timestamp, now, tolerance):
        return Verdict(False, "timestamp_outside_tolerance")
    return OK


def sign(body: bytes, secrets: WebhookSecrets, now: float) -> dict[str, str] | None:
    """A fresh `Stripe-Signature` for this attempt; None without the secret."""
    if not secrets.secret:
        return None
    timestamp = int(now)
    return {HEADER: f"t={timestamp},{SCHEME}={signature(secrets.secret, timestamp, body)}"}


def events(body: bytes) -> list[InboundEvent]:
    """A Stripe POST is one event: dedupe on its `id`."""
    event = json_object(body)
    if event is None or event.get("object") not in ("event", None):
        return []
    data = event.get("data")
    obj = data.get("object") if isinstance(data, Mapping) else None
    object_ids = (str(obj["id"]),) if isinstance(obj, Mapping) and obj.get("id") else ()
    event_id = event.get("id")
    return [
        InboundEvent(
            id=str(event_id) if event_id else content_id(body),
            type=str(event.get("type") or ""),
            body=body,
            object_ids=object_ids,
        )
    ]
