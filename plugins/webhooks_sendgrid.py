"""SendGrid Signed Event Webhook (providers.md 4.8), event ids, and translation of SendGrid
events into Mailgun events (the reverse of contract 7.5's Mailgun -> SendGrid).

Signature. Headers `X-Twilio-Email-Event-Webhook-Signature` (base64 of a DER ECDSA
signature) and `X-Twilio-Email-Event-Webhook-Timestamp`; ECDSA P-256 with SHA-256 over
the bytes `timestamp + raw body`, checked with the account's public key (base64 DER
SubjectPublicKeyInfo, as SendGrid shows it; a PEM is taken too). SendGrid documents no
tolerance: egressd applies the upstream's `tolerance` to the timestamp header.

Signing. egressd cannot sign as SendGrid. With a `signing_key` (PEM P-256 private key)
it signs every delivery to that app, original and translated events alike, with a fresh
timestamp: the app then verifies with egressd's public key instead of SendGrid's, so one
key checks everything it receives. Signatures are deterministic (RFC 6979) where OpenSSL
has it, so the step stays pure. Without a `signing_key`: None, original events go with SendGrid's headers
as received, and translated ones unsigned.

Events. A SendGrid POST is a JSON array; each element is its own event, deduplicated on
its `sg_event_id` (7.8), its `body` the element's bytes as received.

Translation SendGrid -> Mailgun, for mail a Mailgun-shaped app sent through a failover to
SendGrid (plugins/mail_mailgun_to_sendgrid.py; the app was given `<X-Message-Id>`):
each event becomes one Mailgun webhook body `{"signature": {...}, "event-data": {...}}`,
signed at delivery by the Mailgun plugin with the primary's signing key (honest: that
key is a secret egressd holds, the scheme is Mailgun's own). delivered -> delivered;
bounce -> failed/permanent (reason `bounce`, `generic` for a block); dropped ->
failed/permanent (reason `suppress-bounce` / `-unsubscribe` / `-complaint` by SendGrid's
reason, else `generic`); deferred -> failed/temporary; open -> opened; click -> clicked;
unsubscribe, group_unsubscribe -> unsubscribed; spamreport -> complained. Fields:
`id` (a hash of `sg_event_id`), `timestamp`, `event`, `severity`/`reason`, `recipient`,
`recipient-domain`, `message.headers.message-id` (the id the app was given, without
`<>`), `tags` (categories), `delivery-status` (`code`, `message`, `description`,
`attempt-no`, `enhanced-code` where SendGrid said), `ip`, `client-info.user-agent`, `url`,
and `user-variables`: the event's top-level fields that are not SendGrid's own (its
custom args; Mailgun `v:` variables went to SendGrid as custom args). Lost: SendGrid's
other fields (`sg_machine_open`, `bounce_classification`, `tls`...), which Mailgun
events have no place for.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from plugins.webhooks import (
    OK,
    InboundEvent,
    LedgerLookup,
    TranslatedEvent,
    Verdict,
    array_spans,
    content_id,
    derived_id,
    dumps,
    header,
    within,
)

SIG_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TS_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
MAX_LEDGER_CANDIDATES = 8
#: SendGrid event fields a custom arg may not overwrite (and that are not custom args).
SENDGRID_FIELDS = frozenset(
    "email timestamp event sg_event_id sg_message_id smtp-id category response attempt reason status type "
    "bounce_classification useragent ip url url_offset tls cert_err asm_group_id sg_machine_open "
    "marketing_campaign_id marketing_campaign_name pool send_at sg_content_type sg_template_id sg_template_name "
    "singlesend_id singlesend_name newsletter".split()
)


@lru_cache(maxsize=16)
def _public_key(text: str) -> ec.EllipticCurvePublicKey | None:
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = serialization.load_der_public_key(base64.b64decode("".join(text.split()), validate=True))
    except (ValueError, TypeError, binascii.Error):
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


@lru_cache(maxsize=16)
def _private_key(pem: str) -> ec.EllipticCurvePrivateKey | None:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def key_problem(public_key: str | None = None, signing_key: str | None = None) -> str | None:
    """What is wrong with configured keys (for `egressd check`), or None."""
    if public_key is not None and _public_key(public_key) is None:
        return "public_key is not a base64 DER (or PEM) ECDSA P-256 public key"
    if signing_key is not None and _private_key(signing_key) is None:
        return "signing_key is not an unencrypted PEM ECDSA P-256 private key"
    return None


def verify(body: bytes, headers: Mapping[str, str], public_key: str | None, now: float, tolerance: float) -> Verdict:
    if not public_key:
        return Verdict(False, "no_public_key")
    sig = header(headers, SIG_HEADER)
    stamp = header(headers, TS_HEADER)
    if not sig or not stamp:
        return Verdict(False, "missing_signature")
    if not stamp.isdigit():
        return Verdict(False, "malformed_signature")
    try:
        der = base64.b64decode(sig, validate=True)
    except (ValueError, binascii.Error):
        return Verdict(False, "malformed_signature")
    key = _public_key(public_key)
    if key is None:
        return Verdict(False, "bad_public_key")
    try:
        key.verify(der, stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return Verdict(False, "bad_signature")
    if not within(int(stamp), now, tolerance):
        return Verdict(False, "timestamp_outside_tolerance")
    return OK


def sign(body: bytes, signing_key: str | None, now: float) -> dict[str, str] | None:
    if not signing_key:
        return None
    key = _private_key(signing_key)
    if key is None:
        return None
    stamp = str(int(now))
    try:
        der = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    except UnsupportedAlgorithm:  # an OpenSSL without RFC 6979: a random nonce verifies the same
        der = key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {SIG_HEADER: base64.b64encode(der).decode(), TS_HEADER: stamp}


def message_id_candidates(sg_message_id: str) -> tuple[str, ...]:
    """The `X-Message-Id` an `sg_message_id` may start with: `X.filter...`, `X.recvd-...`;
    old ids have dots of their own, so every prefix at a dot, longest first."""
    parts = sg_message_id.split(".")
    out = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
    return tuple(dict.fromkeys(x for x in out if x))[:MAX_LEDGER_CANDIDATES]


def events(body: bytes) -> list[InboundEvent]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return []
    spans = array_spans(text)
    if spans is None:
        return []
    out: list[InboundEvent] = []
    for start, end in spans:
        raw = text[start:end].encode()
        item = json.loads(raw)
        if not isinstance(item, dict):
            continue
        mid = str(item.get("sg_message_id") or "")
        event_id = item.get("sg_event_id")
        out.append(
            InboundEvent(
                id=str(event_id) if event_id else content_id(raw),
                type=str(item.get("event") or ""),
                body=raw,
                object_ids=(mid,) if mid else (),
                ledger_ids=message_id_candidates(mid) if mid else (),
            )
        )
    return out


# ---- translation to Mailgun ------------------------------------------------------------------

SIMPLE = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
    "spamreport": "complained",
}
DROPPED = {
    "Bounced Address": "suppress-bounce",
    "Unsubscribed Address": "suppress-unsubscribe",
    "Spam Reporting Address": "suppress-complaint",
}


def _smtp_code(text: str) -> int | None:
    head = text.strip()[:3]
    return int(head) if head.isdigit() else None


def to_mailgun(event: InboundEvent, lookup: LedgerLookup) -> TranslatedEvent | None:
    try:
        item = json.loads(event.body)
    except ValueError:
        return None
    if not isinstance(item, dict):
        return None
    kind = str(item.get("event") or "")
    if kind not in SIMPLE and kind not in ("bounce", "dropped", "deferred"):
        return None
    record: Mapping[str, Any] | None = None
    message_id = ""
    for ledger_id in event.ledger_ids:
        record = lookup(ledger_id)
        if record is not None:
            message_id = ledger_id
            break
    if record is None:
        return None
    message_id = str(record.get("message_id") or message_id).strip().strip("<>")
    email = str(item.get("email") or "")
    try:
        timestamp = float(item.get("timestamp") or 0)
    except (TypeError, ValueError):
        timestamp = 0.0
    data: dict[str, Any] = {
        "id": derived_id("sendgrid-event", event.id),
        "timestamp": timestamp,
        "log-level": "info",
        "event": SIMPLE.get(kind, "failed"),
        "recipient": email,
        "recipient-domain": email.rpartition("@")[2],
        "message": {"headers": {"message-id": message_id}},
        "tags": [str(c) for c in item.get("category") or []] if isinstance(item.get("category"), list) else [],
    }
    response = str(item.get("response") or "")
    reason = str(item.get("reason") or "")
    status: dict[str, Any] = {}
    if kind in ("bounce", "dropped"):
        data["log-level"] = "error"
        data["severity"] = "permanent"
        if kind == "dropped":
            data["reason"] = DROPPED.get(reason, "generic")
        else:
            data["reason"] = "generic" if item.get("type") == "blocked" else "bounce"
        status = {"code": _smtp_code(reason), "message": reason, "description": reason}
        if item.get("status"):
            status["enhanced-code"] = str(item["status"])
    elif kind == "deferred":
        data["log-level"] = "warn"
        data["severity"] = "temporary"
        data["reason"] = "generic"
        status = {"code": _smtp_code(response), "message": response, "description": ""}
        attempt = str(item.get("attempt") or "")
        if attempt.isdigit():
            status["attempt-no"] = int(attempt)
    elif kind == "delivered":
        status = {"code": _smtp_code(response), "message": response, "description": ""}
    if status:
        data["delivery-status"] = status
    if kind in ("open", "click"):
        data["ip"] = str(item.get("ip") or "")
        data["client-info"] = {"user-agent": str(item.get("useragent") or "")}
    if kind == "click":
        data["url"] = str(item.get("url") or "")
    data["user-variables"] = {k: v for k, v in item.items() if k not in SENDGRID_FIELDS}
    # The signature object is filled at each delivery by the Mailgun plugin (fresh
    # timestamp, token, HMAC); the placeholder is what it replaces.
    body = {"signature": {"timestamp": "", "token": "", "signature": ""}, "event-data": data}
    return TranslatedEvent(
        event_id=str(data["id"]),
        type=str(data["event"]),
        body=dumps(body),
        headers={"Content-Type": "application/json"},
        content_type="application/json",
    )
