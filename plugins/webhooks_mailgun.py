"""Mailgun webhooks: signature (providers.md 5.5), re-signing for delivery, event ids, and
translation of Mailgun events into SendGrid events (contract 7.5).

Signature. A Mailgun webhook is a JSON body `{"signature": {"timestamp", "token",
"signature"}, "event-data": {...}}`; `signature` is the hex HMAC-SHA256, keyed with the
HTTP webhook signing key, of `timestamp + token` (the timestamp exactly as sent). It does
not cover the body. Only JSON webhooks are taken (not the legacy form-encoded ones).

Re-signing (7.8). The app's own check (the SDK's `verify_webhook`, default 15 minutes;
Mailgun's docs suggest 5) rejects an old timestamp, so a delivery retried later must carry
a fresh one, and Mailgun puts it in the body. So each delivery attempt rewrites exactly
the `signature` object's value, as a new `{"timestamp", "token", "signature"}`, and
leaves every other byte of the body as Mailgun sent it: the rest of the body is not
signed, so an app cannot tell (nor need) the difference, and `event-data` stays byte for
byte. The new token is derived (HMAC with the signing key over the new timestamp and the
old token), so the step stays pure and repeatable, and differs on every attempt second,
for an app that remembers tokens against replays. A body without exactly one top-level
`signature` member cannot be re-signed: None (it goes as received). The cost: the body is
not the provider's byte for byte, which 7.5 promises elsewhere; for Mailgun that promise
and a signature that passes after a retry cannot both hold, and the signature is the
one the app's check depends on.

Translation Mailgun -> SendGrid, for mail a SendGrid-shaped app sent through a failover to
Mailgun (plugins/mail_sendgrid_to_mailgun.py). The POST body is a JSON array of one event:

| Mailgun `event`                          | SendGrid `event` |
| ---------------------------------------- | ---------------- |
| delivered                                | delivered        |
| failed, severity permanent               | bounce           |
| failed, permanent, reason suppress-*     | dropped          |
| failed, severity temporary               | deferred         |
| opened                                   | open             |
| clicked                                  | click            |
| unsubscribed                             | unsubscribe      |
| complained                               | spamreport       |

`suppress-bounce` / `-unsubscribe` / `-complaint` mean Mailgun did not try the address
because it is on a suppression list: SendGrid calls that `dropped` (reason `Bounced
Address`, `Unsubscribed Address`, `Spam Reporting Address`), not `bounce`, and an app
counting bounces per address should not see one here. Fields: `email`, `timestamp`
(whole seconds), `event`, `sg_event_id` (a hash of Mailgun's event id, stable over
redeliveries), `sg_message_id` (the `X-Message-Id` the app was given, from the ledger
record), `smtp-id` (the message's Message-ID), `category` (Mailgun tags), the per-event
fields below, and the app's `custom_args` as top-level fields: they went to Mailgun as
`v:` variables and come back as `user-variables`. A variable named like a SendGrid event
field is left out (it would overwrite that field); a non-string value (Mailgun parses
JSON-looking variables) is given back as compact JSON text, numbers as their text.
delivered: `response` (`"250 OK"`); bounce: `reason`, `status` (enhanced code, else
`5.0.0`), `type: "bounce"`; dropped: `reason`; deferred: `response`, `attempt`; open and
click: `useragent`, `ip`; click: `url`. Other Mailgun events (accepted, stored, failed
without a severity...) have no translation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from plugins.mail_outbox import TAG as OUTBOX_TAG
from plugins.webhooks import (
    OK,
    InboundEvent,
    LedgerLookup,
    SignedDelivery,
    TranslatedEvent,
    Verdict,
    content_id,
    derived_id,
    dumps,
    json_object,
    top_level_spans,
    within,
)
from plugins.webhooks_sendgrid import SENDGRID_FIELDS

TOKEN_LENGTH = 50
SUPPRESSED = {
    "suppress-bounce": "Bounced Address",
    "suppress-unsubscribe": "Unsubscribed Address",
    "suppress-complaint": "Spam Reporting Address",
}
SIMPLE = {
    "delivered": "delivered",
    "opened": "open",
    "clicked": "click",
    "unsubscribed": "unsubscribe",
    "complained": "spamreport",
}


def signature(key: str, timestamp: str, token: str) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str | None, now: float, tolerance: float) -> Verdict:
    if not secret:
        return Verdict(False, "no_secret")
    payload = json_object(body)
    if payload is None:
        return Verdict(False, "malformed_body")
    sig = payload.get("signature")
    if not isinstance(sig, Mapping) or any(sig.get(k) in (None, "") for k in ("timestamp", "token", "signature")):
        return Verdict(False, "missing_signature")
    timestamp, token, given = sig["timestamp"], sig["token"], sig["signature"]
    if isinstance(timestamp, int) and not isinstance(timestamp, bool):
        timestamp = str(timestamp)
    if not isinstance(timestamp, str) or not timestamp.isdigit() or not isinstance(token, str):
        return Verdict(False, "malformed_signature")
    if not isinstance(given, str):
        return Verdict(False, "malformed_signature")
    if not hmac.compare_digest(signature(secret, timestamp, token).encode(), given.encode()):
        return Verdict(False, "bad_signature")
    if not within(int(timestamp), now, tolerance):
        return Verdict(False, "timestamp_outside_tolerance")
    return OK


def resign(body: bytes, secret: str | None, now: float) -> SignedDelivery | None:
    """The body with a fresh `signature` object (see the module docstring); None when it
    cannot be re-signed."""
    if not secret:
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    spans = top_level_spans(text)
    found = [(start, end) for key, start, end in spans or () if key == "signature"]
    if len(found) != 1:
        return None
    start, end = found[0]
    old = json.loads(text[start:end])
    old_token = str(old.get("token") or "") if isinstance(old, dict) else ""
    timestamp = str(int(now))
    token = hmac.new(secret.encode(), f"egressd-resign:{timestamp}:{old_token}".encode(), hashlib.sha256).hexdigest()
    token = token[:TOKEN_LENGTH]
    fresh = {"timestamp": timestamp, "token": token, "signature": signature(secret, timestamp, token)}
    return SignedDelivery((text[:start] + json.dumps(fresh, separators=(",", ":")) + text[end:]).encode(), {})


def _message_id(data: Mapping[str, Any]) -> str | None:
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, Mapping) else None
    mid = headers.get("message-id") if isinstance(headers, Mapping) else None
    return str(mid).strip().strip("<>") if mid else None


def events(body: bytes) -> list[InboundEvent]:
    """A Mailgun POST is one event: dedupe on `event-data.id`."""
    payload = json_object(body)
    data = payload.get("event-data") if payload else None
    if not isinstance(data, Mapping):
        return []
    mid = _message_id(data)
    ids = (mid,) if mid else ()
    event_id = data.get("id")
    return [
        InboundEvent(
            id=str(event_id) if event_id else content_id(body),
            type=str(data.get("event") or ""),
            body=body,
            object_ids=ids,
            ledger_ids=ids,
        )
    ]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _sendgrid_kind(data: Mapping[str, Any]) -> str | None:
    kind = str(data.get("event") or "")
    if kind in SIMPLE:
        return SIMPLE[kind]
    if kind == "failed":
        severity = data.get("severity")
        if severity == "permanent":
            return "dropped" if data.get("reason") in SUPPRESSED else "bounce"
        if severity == "temporary":
            return "deferred"
    return None


def to_sendgrid(event: InboundEvent, lookup: LedgerLookup) -> TranslatedEvent | None:
    payload = json_object(event.body)
    data = payload.get("event-data") if payload else None
    if not isinstance(data, Mapping):
        return None
    kind = _sendgrid_kind(data)
    if kind is None:
        return None
    record: Mapping[str, Any] | None = None
    mid = ""
    for ledger_id in event.ledger_ids:
        record = lookup(ledger_id)
        if record is not None:
            mid = ledger_id
            break
    if record is None:
        return None
    raw_status = data.get("delivery-status")
    status: Mapping[str, Any] = raw_status if isinstance(raw_status, Mapping) else {}
    try:
        timestamp = int(float(data.get("timestamp") or 0))
    except (TypeError, ValueError):
        timestamp = 0
    sg_event_id = derived_id("mailgun-event", event.id)
    variables = data.get("user-variables")
    # A send the outbox kept was answered with its outbox id as X-Message-Id, and carries
    # that id to Mailgun as `v:egressd_outbox_id` (plugins/mail_outbox.py): it is the id
    # the app was given.
    outbox_id = variables.get(OUTBOX_TAG) if isinstance(variables, Mapping) else None
    out: dict[str, Any] = {
        "email": str(data.get("recipient") or ""),
        "timestamp": timestamp,
        "event": kind,
        "sg_event_id": sg_event_id,
        "sg_message_id": str(outbox_id or record.get("x_message_id") or mid),
        "smtp-id": f"<{mid}>",
    }
    tags = data.get("tags")
    if isinstance(tags, list) and tags:
        out["category"] = [str(t) for t in tags]
    code = status.get("code")
    message = str(status.get("message") or "")
    description = str(status.get("description") or "")
    client = data.get("client-info")
    client = client if isinstance(client, Mapping) else {}
    if kind == "delivered":
        out["response"] = f"{code} {message}".strip() if code else message
    elif kind == "bounce":
        out["reason"] = description or message
        enhanced = status.get("enhanced-code")
        out["status"] = str(enhanced) if enhanced else "5.0.0"
        out["type"] = "bounce"
    elif kind == "dropped":
        out["reason"] = SUPPRESSED[str(data.get("reason"))]
    elif kind == "deferred":
        out["response"] = f"{code} {message}".strip() if code else message
        out["attempt"] = str(status.get("attempt-no") or 1)
    if kind in ("open", "click"):
        out["useragent"] = str(client.get("user-agent") or "")
        out["ip"] = str(data.get("ip") or "")
    if kind == "click":
        out["url"] = str(data.get("url") or "")
    if isinstance(variables, Mapping):
        for name, value in variables.items():
            if str(name) not in SENDGRID_FIELDS:
                out[str(name)] = _text(value)
    return TranslatedEvent(
        event_id=sg_event_id,
        type=kind,
        body=dumps([out]),
        headers={"Content-Type": "application/json"},
        content_type="application/json",
    )
