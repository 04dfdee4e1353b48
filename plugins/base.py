"""The provider plugin interface.

A plugin knows one provider's wire shapes. Everything here is a pure function over
data: no I/O, no globals, no clock. Plugins are found through the entry-point group
`egressd.plugins` (see `plugins.registry`), so a third party can add a provider by
shipping a package; nothing in egressd needs to change.

What a plugin answers:

* retry safety: `honours_idempotency`, `not_processed`;
* proxy-made errors in the provider's own shape: `error_answer`;
* object ownership: `references` (ids in a request that may live on another provider
  after a failover) and `owns_id` (ids that look like this provider's own);
* failover: `failover_to(target)` returns a `Translator` that rewrites one call of this
  provider's shape into calls of the target's shape and the answers back;
* ambiguity: `ambiguity_probe` / `probe_verdict` (may a timed-out call be asked about).

A `Translator` is a generator function, so multi-step flows (PayPal order create, then
capture) stay pure: it *yields* `WireRequest`s for the fallback, is *sent* the
`WireAnswer` of each, and *returns* the final `Translated` answer for the app. It raises
`Refused` (before its first yield) when the call cannot be expressed honestly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from plugins.webhooks import InboundEvent, LedgerLookup, SignedDelivery, TranslatedEvent, Verdict, WebhookSecrets


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """A proxy-made answer in the provider's own error shape."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# ---- failover data ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireRequest:
    """One request in some provider's shape (path relative to that provider's target)."""

    method: str
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True, slots=True)
class WireAnswer:
    """One answer in some provider's shape. `error` is set for a proxy-made failure
    (an egressd error code such as `circuit_open`) instead of a real upstream answer."""

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    def header(self, name: str) -> str | None:
        low = name.lower()
        for key, value in self.headers.items():
            if key.lower() == low:
                return value
        return None

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Translated:
    """The app-shaped answer of a failed-over call, plus routing-ledger records to keep
    (synthetic id -> record) so follow-up calls on those ids reach the fallback."""

    answer: WireAnswer
    ledger: tuple[tuple[str, Mapping[str, Any]], ...] = ()


class Refused(Exception):
    """The call cannot be expressed honestly on the fallback: do not fail over.

    `reason` is a stable word (`lossy`, `unmappable_field`...); `detail` is human text
    for egressd's own log (it may quote ids); `names` are what blocked the call in the
    app's own terms -- request fields (`expand`, `asm`, `purchase_units[0].shipping`),
    headers (`Stripe-Account`) or an operation (`POST /v1/customers`) -- and never a
    value. The names are what the app is told (`X-Egressd-Failover: ...; detail=`, and
    the provider-shaped error message).
    """

    def __init__(self, reason: str, detail: str = "", *, names: Iterable[str] = ()) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.names: tuple[str, ...] = tuple(dict.fromkeys(str(n) for n in names if n))

    def renamed(self, mapping: Mapping[str, str]) -> Refused:
        """The same refusal with its names translated (e.g. a shared helper's `amount`
        into the caller's `purchase_units[0].amount.value`)."""
        return Refused(self.reason, self.detail, names=[mapping.get(n, n) for n in self.names])


#: At most this many characters of names go into `detail=` and the app's error message;
#: the rest is counted (`+N`). Names can come from the app's own request (unknown fields).
DETAIL_MAX_CHARS = 400
NAME_MAX_CHARS = 100  # one name is cut to this many characters before encoding
_DETAIL_UNSAFE = frozenset(";,=%")


def encode_name(name: str) -> str:
    """One name for `detail=`: `;`, `,`, `=` (the header's own separators) and `%` are
    percent-encoded, as is anything outside printable ASCII (so no name can break the
    header line)."""
    out: list[str] = []
    for ch in name:
        if ch in _DETAIL_UNSAFE or not (0x20 <= ord(ch) < 0x7F):
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
        else:
            out.append(ch)
    return "".join(out)


def shown_names(names: Iterable[str], limit: int = DETAIL_MAX_CHARS) -> list[str]:
    """The names as encoded for the app, capped at about `limit` characters: what does
    not fit is summed up as a last entry `+N` (N names left out)."""
    all_names = [encode_name(n[:NAME_MAX_CHARS]) for n in dict.fromkeys(names) if n]
    shown: list[str] = []
    size = 0
    for i, name in enumerate(all_names):
        if shown and size + len(name) + 1 > limit:
            shown.append(f"+{len(all_names) - i}")
            break
        shown.append(name)
        size += len(name) + 1
    return shown


def detail_value(names: Iterable[str]) -> str:
    """The `detail=` value: comma-separated encoded names (contract 7.7); "" for none."""
    return ",".join(shown_names(names))


@dataclass(frozen=True, slots=True)
class FailoverContext:
    """Everything a translator may use besides the request: plain data, no handles."""

    source: str  # the primary upstream's name
    target: str  # the fallback upstream's name
    payment_methods: Mapping[str, str] = field(default_factory=dict)  # crosswalk
    templates: Mapping[str, str] = field(default_factory=dict)  # crosswalk
    allow_lossy: bool = False
    idempotency_key: str | None = None
    request_id: str = ""
    now: float = 0.0  # wall-clock seconds
    records: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # ledger, by id
    source_settings: Mapping[str, Any] = field(default_factory=dict)
    target_settings: Mapping[str, Any] = field(default_factory=dict)
    live: bool = False  # the fallback is a live (not sandbox) account

    def derived_key(self, step: str, *, length: int = 64) -> str:
        """A deterministic per-step idempotency key for the fallback, from the call's key.

        `sha256(key)[:64] + "-" + step` (fits PayPal's 108 and Stripe's 255 characters).
        Without a key, the request id stands in (unique per call, so no cross-call dedupe).
        """
        base = self.idempotency_key or ("req:" + self.request_id)
        return hashlib.sha256(base.encode()).hexdigest()[:length] + "-" + step


TranslatorRun = Generator[WireRequest, WireAnswer, Translated]


class Translator(Protocol):
    """Rewrites one call from the source provider's shape to the target's and back."""

    def __call__(self, request: WireRequest, ctx: FailoverContext) -> TranslatorRun: ...


# ---- the plugin ------------------------------------------------------------------------


class ProviderPlugin:
    """Base class: the behaviour of a plain JSON API (the `generic` provider)."""

    name: ClassVar[str] = "generic"
    #: The request header this provider deduplicates on, if any (retry safety for POST).
    idempotency_header: ClassVar[str | None] = None
    #: Request headers of this provider's own that select a different answer (an account,
    #: an API version): part of every cache key, beside the standard `Accept*` headers.
    vary_headers: ClassVar[tuple[str, ...]] = ()
    #: Paths (relative to the upstream's target, exact, no query) of the provider's own
    #: token endpoint, where the app authenticates with its own credentials (PayPal's
    #: `/v1/oauth2/token`): egressd injects no auth there (no static header, no OAuth
    #: token) and forwards the app's `Authorization` untouched (docs/providers.md).
    app_auth_paths: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: Mapping[str, Any] = dict(settings or {})

    # -- retry safety --------------------------------------------------------------------
    def honours_idempotency(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """True when this request carries a key the provider deduplicates on."""
        header = self.idempotency_header
        return header is not None and bool(headers.get(header))

    def not_processed(self, status: int, headers: Mapping[str, str]) -> bool:
        """True when this answer proves the request never reached the provider's application.

        429 means "rejected before processing" for every provider we know.
        """
        return status == 429

    # -- proxy-made errors ---------------------------------------------------------------
    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {"error": {"type": "egressd_error", "code": code, "message": message}}
        return ErrorAnswer(status, json_bytes(body))

    # -- outbox (contract 7.6, docs/outbox.md) -------------------------------------------
    def outbox_accepts(self, method: str, path: str) -> bool:
        """Whether a call is a send the outbox may keep (generic: any unsafe method)."""
        return method not in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE")

    def outbox_accepted(self, outbox_id: str, request: WireRequest) -> WireAnswer:
        """The provider's own "accepted" answer for a send egressd kept (generic: 202 with
        the outbox id)."""
        return WireAnswer(202, {"Content-Type": "application/json"}, json_bytes({"outbox_id": outbox_id}))

    def outbox_tag(self, request: WireRequest, outbox_id: str) -> WireRequest:
        """The kept send as it is delivered: carrying `outbox_id` where the provider keeps
        it and reports it back (in its events, and to `outbox_probe`). Default: unchanged."""
        return request

    def outbox_message_id(self, answer: WireAnswer) -> str:
        """The provider's id of a send it accepted, from its answer ("" when none)."""
        return ""

    def outbox_probe(self, request: WireRequest, outbox_id: str) -> WireRequest | None:
        """A read-only request that asks the provider whether it accepted the send tagged
        `outbox_id` (`request` is the send as the app made it). None: it cannot be asked,
        so a send that may have reached it is never sent again by egressd."""
        return None

    def outbox_probe_verdict(self, answer: WireAnswer) -> tuple[str, str]:
        """(`found`, provider id) | (`absent`, "") | (`unknown`, "") for the probe's answer."""
        return "unknown", ""

    # -- object ownership ----------------------------------------------------------------
    def references(self, request: WireRequest) -> tuple[str, ...]:
        """Ids of objects this request acts on that may have been created on a fallback
        (synthetic ids); the failover stage looks them up in the routing ledger."""
        return ()

    def owns_id(self, object_id: str) -> bool:
        """True when `object_id` has this provider's own id shape (not a synthetic one)."""
        return False

    # -- failover ------------------------------------------------------------------------
    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        """A translator from this provider's shape to `target`'s, or None (no failover)."""
        return None

    def fallback_problems(self) -> tuple[str, ...]:
        """What this provider's settings lack to be sent failed-over calls at all, each
        said as "has no X: why; what to write" (the loader prefixes "fallback upstream
        'NAME' "). `egressd check`, `run` and every reload refuse a failover rule whose
        fallback has any, so a plan that could never be used is not served."""
        return ()

    def ambiguity_probe(self, request: WireRequest) -> WireRequest | None:
        """A request to the primary that can tell whether an ambiguous call took effect.

        None: the provider cannot be asked, so a call that may have been processed is
        never failed over.
        """
        return None

    def probe_verdict(self, answer: WireAnswer) -> str:
        """`processed` (the answer is authoritative: give it to the app),
        `not_processed` (safe to fail over) or `unknown`."""
        return "unknown"

    # -- inbound webhooks (contract 7.5, 7.8; the steps are in plugins/webhooks.py) -------
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secrets: WebhookSecrets, now: float, tolerance: float
    ) -> Verdict:
        """Is this POST the provider's own, signed within `tolerance` seconds of `now`?"""
        return Verdict(False, "no_webhook_support")

    def remote_verdict(self, status: int, body: bytes) -> Verdict:
        """The verdict from the answer to a `Verdict.remote` check."""
        return Verdict(False, "no_remote_check")

    def webhook_events(self, body: bytes, headers: Mapping[str, str]) -> list[InboundEvent]:
        """The events of a verified POST, one per id to deduplicate on; [] if none."""
        return []

    def sign_webhook(self, body: bytes, secrets: WebhookSecrets, now: float) -> dict[str, str] | None:
        """Signature headers for delivering `body` to the app now (fresh timestamp), set
        over the provider's own; None where egressd cannot sign in headers."""
        return None

    def signed_delivery(self, body: bytes, secrets: WebhookSecrets, now: float) -> SignedDelivery | None:
        """Body and headers of one delivery attempt: `sign_webhook` with the body as is,
        unless the scheme signs inside the body (Mailgun). None: send as received."""
        headers = self.sign_webhook(body, secrets, now)
        return None if headers is None else SignedDelivery(body, headers)

    def translate_event(self, event: InboundEvent, lookup: LedgerLookup, *, target: str) -> TranslatedEvent | None:
        """This provider's `event` about an object a failover created here, in the shape of
        the `target` provider (the primary's plugin name); None when there is no honest
        translation or the ledger does not know the object."""
        return None


class GenericPlugin(ProviderPlugin):
    name = "generic"
