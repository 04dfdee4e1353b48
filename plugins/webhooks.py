"""Inbound webhooks, the pure half (contract 7.5, 7.8): the values plugins take and return.

The listener, storage and delivery worker (`proxy/webhooks/`) do the I/O; plugins only
compute. The steps, and the `ProviderPlugin` method for each (all pure: bytes, secrets and
a clock reading in, values out):

1. verify   `verify_webhook(body, headers, secrets, now, tolerance) -> Verdict`.
            PayPal cannot be verified offline: its Verdict is a refusal that carries a
            `RemoteCheck` (a request for the provider's verify API, sent through that
            upstream and its auth); the answer goes to `remote_verdict(status, body)`.
            A listener that ignores `remote` therefore refuses every PayPal event.
2. split    `webhook_events(body, headers) -> list[InboundEvent]`: one per event id to
            deduplicate on (a SendGrid POST is a batch). `[]`: not an event body.
3. translate `translate_event(event, lookup, target=...) -> TranslatedEvent | None`, on
            the plugin of the provider the event came from (the fallback), into the shape
            of `target` (the primary's provider name). `lookup` is the routing ledger,
            prefetched (see `LedgerLookup`). None: no translation; the event goes to the
            fallback's own `deliver_to` if it has one.
4. sign     `signed_delivery(body, secrets, now) -> SignedDelivery | None`, once per
            delivery attempt with a fresh `now`. For a header scheme it is
            `sign_webhook(body, secrets, now)` (the headers to set, replacing the
            provider's own) with the body unchanged; Mailgun's signature lives in the body,
            so only `signed_delivery` can re-sign it. None: egressd cannot sign; the
            original headers go as received (7.8).

Secrets never appear in a `Verdict`, an exception or a repr: reasons are short fixed
words, safe to log (`missing_signature`, `bad_signature`, `timestamp_outside_tolerance`...).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# ---- values ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookSecrets:
    """An upstream's `webhooks` block secrets (contract 7.5 field names).

    `secret`: Stripe's endpoint signing secret (`whsec_...`) or Mailgun's HTTP webhook
    signing key. `public_key`: SendGrid's Signed Event Webhook public key (base64 DER).
    `signing_key`: a PEM ECDSA P-256 private key egressd signs SendGrid-shaped deliveries
    with. `webhook_id`: PayPal's webhook subscription id (not a secret, but needed to
    verify). The secrets stay out of `repr`.
    """

    secret: str | None = field(default=None, repr=False)
    public_key: str | None = None
    signing_key: str | None = field(default=None, repr=False)
    webhook_id: str | None = None


@dataclass(frozen=True, slots=True)
class RemoteCheck:
    """A request to the provider whose answer decides a verification (PayPal's
    verify-webhook-signature): path relative to the upstream's target, JSON body."""

    method: str
    path: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a verification. `reason` is a fixed word, safe to log.

    `remote`: not decided yet, send this request and ask `remote_verdict` (ok is False, so
    ignoring it fails closed). `transient`: the check itself could not be made (the
    provider's verify API was unavailable): answer so that the provider retries (503),
    not 400.
    """

    ok: bool
    reason: str
    remote: RemoteCheck | None = None
    transient: bool = False


OK = Verdict(True, "ok")


@dataclass(frozen=True, slots=True)
class InboundEvent:
    """One provider event.

    `id`: the provider's event id, what deduplication keys on (7.8: Stripe `id`, PayPal
    `id`, Mailgun `event-data.id`, SendGrid `sg_event_id`); `type`: the provider's event
    type; `body`: the raw bytes of this one event (a slice of the POST body for a batch);
    `object_ids`: the provider's own ids of the objects it is about (for logs and
    `/status`); `ledger_ids`: the ids under which the routing ledger may hold those
    objects if a failover created them (the ids the app was given: `pi_ppf_...`, a message
    id), for the listener to prefetch before `translate_event`.
    """

    id: str
    type: str
    body: bytes
    object_ids: tuple[str, ...] = ()
    ledger_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class TranslatedEvent:
    """A fallback event in the primary's shape, for the primary's `deliver_to`.

    `event_id` is derived from the fallback event's id only (same id on every
    redelivery, 7.8), so both egressd and the app can deduplicate on it. `headers` are
    the body's own (Content-Type); the signature comes from the primary plugin's
    `signed_delivery` at each attempt, and `X-Egressd-Translated-From` (the fallback
    upstream's name, which plugins do not know) from the worker.
    """

    event_id: str
    type: str
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SignedDelivery:
    """What to send for one delivery attempt: the body (unchanged, except where the
    scheme signs inside it) and the headers to set over the provider's own."""

    body: bytes
    headers: Mapping[str, str]


#: The routing ledger as `translate_event` sees it: an id from `InboundEvent.ledger_ids`
#: -> the JSON-decoded record failover wrote under `ledger_key(<primary upstream>, id)`,
#: or None. `ledger_get` is async and plugins are not, so the listener fetches the
#: event's `ledger_ids` first and passes e.g. `prefetched.get`. It should only return
#: records whose `owner` is the upstream the event came in on.
LedgerLookup = Callable[[str], Mapping[str, Any] | None]


# ---- helpers ---------------------------------------------------------------------------


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name (plain dicts in tests, a
    case-insensitive multidict in the listener)."""
    value = headers.get(name)
    if value is not None:
        return value
    low = name.lower()
    for key, val in headers.items():
        if key.lower() == low:
            return val
    return None


def within(timestamp: float, now: float, tolerance: float) -> bool:
    """A signature timestamp is accepted this far from `now`, either way (a clock ahead
    of ours by more than the tolerance is as suspect as a replay)."""
    return abs(now - timestamp) <= tolerance


def derived_id(namespace: str, source_id: str, length: int = 22) -> str:
    """A stable id for a translated event, from the fallback event's id (7.8): url-safe
    base64 of sha256("namespace:id"), `length` characters (no padding)."""
    digest = hashlib.sha256(f"{namespace}:{source_id}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")[:length]


def content_id(raw: bytes) -> str:
    """The dedupe id of an event that carries none of its own: its bytes' hash."""
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


_WS = " \t\r\n"


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def top_level_spans(text: str) -> list[tuple[str, int, int]] | None:
    """The members of the JSON object `text` as (key, start, end) of each value, so one
    value can be replaced while every other byte stays as it was. None: not an object."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return None
    i = _skip(text, i + 1)
    out: list[tuple[str, int, int]] = []
    if i < len(text) and text[i] == "}":
        return out if _skip(text, i + 1) == len(text) else None
    try:
        while True:
            key, i = decoder.raw_decode(text, i)
            if not isinstance(key, str):
                return None
            i = _skip(text, i)
            if i >= len(text) or text[i] != ":":
                return None
            start = _skip(text, i + 1)
            _value, end = decoder.raw_decode(text, start)
            out.append((key, start, end))
            i = _skip(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < len(text) and text[i] == "}":
                return out if _skip(text, i + 1) == len(text) else None
            return None
    except ValueError:
        return None


def array_spans(text: str) -> list[tuple[int, int]] | None:
    """The (start, end) of each element of the JSON array `text`. None: not an array."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "[":
        return None
    i = _skip(text, i + 1)
    out: list[tuple[int, int]] = []
    if i < len(text) and text[i] == "]":
        return out if _skip(text, i + 1) == len(text) else None
    try:
        while True:
            _value, end = decoder.raw_decode(text, i)
            out.append((i, end))
            i = _skip(text, end)
            if i < len(text) and text[i] == ",":
                i = _skip(text, i + 1)
                continue
            if i < len(text) and text[i] == "]":
                return out if _skip(text, i + 1) == len(text) else None
            return None
    except ValueError:
        return None
