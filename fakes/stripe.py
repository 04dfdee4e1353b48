"""A fake Stripe API (v1 PaymentIntents and Refunds), see providers.md section 1.

Special ``payment_method`` values (as in Stripe test mode):

* ``pm_card_visa``, ``pm_card_mastercard``, any other ``pm_...``/``card_...``: succeeds.
* ``pm_card_chargeDeclined`` / ``pm_card_visa_chargeDeclined``: 402 ``card_declined`` (``generic_decline``).
* ``pm_card_chargeDeclinedInsufficientFunds``: 402 ``card_declined`` (``insufficient_funds``).
* ``pm_card_chargeDeclinedFraudulent``, ``pm_card_chargeDeclinedLostCard``,
  ``pm_card_chargeDeclinedStolenCard``: 402 ``card_declined`` with that decline code.
* ``pm_card_chargeDeclinedExpiredCard`` / ``IncorrectCvc`` / ``ProcessingError``: 402 with
  ``expired_card`` / ``incorrect_cvc`` / ``processing_error``.
* ``pm_card_authenticationRequired`` / ``pm_card_threeDSecure2Required``: status
  ``requires_action`` (or 402 ``authentication_required`` with ``error_on_requires_action``).
* anything else: 400 ``resource_missing``.

Side effects in the ledger: ``payment_intent.created``, ``charge.succeeded``,
``charge.authorized`` (manual capture), ``charge.failed``, ``payment_intent.captured``,
``payment_intent.canceled``, ``refund.created``; each with the request's Idempotency-Key.

Webhooks (opt-in, ``webhooks={"url": ...}``; fakes/webhooks.py): a
``payment_intent.succeeded`` event for every PaymentIntent that succeeds (confirmed with
automatic capture, or captured) and a ``payment_intent.payment_failed`` one for every
confirmation the card declines, each POSTed with ``Stripe-Signature`` (providers.md 1.11:
``t=<unix>,v1=<hex HMAC-SHA256 of "t.body" keyed with the endpoint secret>``, made anew
for every try) signed with ``webhook_secret``; ``stripe.Webhook.construct_event`` accepts
them. An idempotent replay sends nothing (nothing happened again).

Layout: ``make_stripe_app`` registers one module-level function per endpoint; each is
wrapped by ``endpoint`` (auth, form parsing, Idempotency-Key) and finds the account's
objects in ``request.app[STRIPE_STATE]`` and the ledger in ``request.app[LEDGER_KEY]``.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from aiohttp import web

from .faults import Faults
from .server import (
    RESET_HOOKS_KEY,
    Ledger,
    current_record,
    ledger_of,
    new_fake_app,
    new_id,
    note_body,
    note_replayed,
    side_effect_point,
)
from .signing import stripe_signature
from .webhooks import WEBHOOKS_KEY, WebhookSender, WebhookSettings, install_webhooks

__all__ = [
    "DEFAULT_WEBHOOK_SECRET",
    "STRIPE_STATE",
    "StripeError",
    "StripeState",
    "make_stripe_app",
    "parse_stripe_form",
    "stripe_signature",
]

DEFAULT_WEBHOOK_SECRET = "whsec_fake_stripe_webhooks_not_a_secret"
API_VERSION = "2026-06-24.dahlia"

ZERO_DECIMAL = frozenset("bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split())
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())
CURRENCIES = frozenset(
    (
        "usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl bsd "
        "bwp byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp gbp "
        "gel gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf krw "
        "kwd kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn nad "
        "ngn nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr sek "
        "sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx uyu uzs vnd vuv wst "
        "xaf xcd xof xpf yer zar zmw"
    ).split()
)
PI_PARAMS = frozenset(
    (
        "amount currency payment_method confirm customer description metadata capture_method "
        "confirmation_method automatic_payment_methods payment_method_types off_session "
        "error_on_requires_action return_url receipt_email shipping statement_descriptor "
        "statement_descriptor_suffix setup_future_usage expand application_fee_amount on_behalf_of "
        "transfer_data transfer_group payment_method_options payment_method_data mandate_data "
        "mandate radar_options amount_details use_stripe_sdk payment_method_configuration "
        "excluded_payment_method_types hooks payment_details"
    ).split()
)
CONFIRM_ONLY = ("return_url", "off_session", "error_on_requires_action", "mandate", "mandate_data")
REFUND_PARAMS = frozenset(
    (
        "payment_intent charge amount reason metadata currency customer instructions_email origin "
        "refund_application_fee reverse_transfer expand"
    ).split()
)
DECLINES: dict[str, tuple[str, str | None, str]] = {
    "pm_card_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_visa_chargeDeclined": ("card_declined", "generic_decline", "Your card was declined."),
    "pm_card_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_visa_chargeDeclinedInsufficientFunds": (
        "card_declined",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    "pm_card_chargeDeclinedFraudulent": ("card_declined", "fraudulent", "Your card was declined."),
    "pm_card_chargeDeclinedLostCard": ("card_declined", "lost_card", "Your card was declined."),
    "pm_card_chargeDeclinedStolenCard": ("card_declined", "stolen_card", "Your card was declined."),
    "pm_card_chargeDeclinedExpiredCard": ("expired_card", "expired_card", "Your card has expired."),
    "pm_card_chargeDeclinedIncorrectCvc": (
        "incorrect_cvc",
        "incorrect_cvc",
        "Your card's security code is incorrect.",
    ),
    "pm_card_chargeDeclinedProcessingError": (
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}
AUTH_REQUIRED = frozenset(
    {"pm_card_authenticationRequired", "pm_card_threeDSecure2Required", "pm_card_authenticationRequiredOnSetup"}
)
_KEY_RE = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9_]+$")


class StripeError(Exception):
    """Raised by handlers; becomes ``{"error": {...}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        store: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.store = store  # the idempotency layer stores (and replays) this error
        err: dict[str, Any] = {"type": type, "message": message}
        if code is not None:
            err["code"] = code
            err["doc_url"] = f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"
        if param is not None:
            err["param"] = param
        err.update(extra)
        self.body = {"error": err}


def _split_key(key: str) -> list[str]:
    m = re.fullmatch(r"([^\[\]]+)((?:\[[^\[\]]*\])*)", key)
    if not m:
        return [key]
    return [m.group(1), *re.findall(r"\[([^\[\]]*)\]", m.group(2))]


def _listify(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _listify(v) for k, v in node.items()}
        if node and all(k.isdigit() for k in node):
            return [node[k] for k in sorted(node, key=int)]
    return node


def parse_stripe_form(body: str) -> dict[str, Any]:
    """Parse Stripe's form encoding: ``metadata[k]=v``, ``expand[0]=x`` / ``expand[]=x``,
    ``items[0][price]=p`` into nested dicts and lists (values stay strings)."""
    root: dict[str, Any] = {}
    for raw_key, value in parse_qsl(body, keep_blank_values=True):
        parts = _split_key(unquote(raw_key))
        cur: dict[str, Any] = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if part == "":
                part = str(len(cur))
            if last:
                cur[part] = value
            else:
                nxt = cur.get(part)
                if not isinstance(nxt, dict):
                    nxt = {}
                    cur[part] = nxt
                cur = nxt
    result = _listify(root)
    assert isinstance(result, dict)
    return result


def _minimum(currency: str) -> int:
    if currency in ZERO_DECIMAL:
        return 50 if currency == "jpy" else 1
    if currency in THREE_DECIMAL:
        return 500
    return 50


def _int_param(params: dict[str, Any], name: str, *, required: bool) -> int | None:
    raw = params.get(name)
    if raw is None:
        if required:
            raise StripeError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)
        return None
    if not isinstance(raw, str) or not re.fullmatch(r"-?\d+", raw):
        raise StripeError(400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name)
    return int(raw)


def _bool_param(params: dict[str, Any], name: str) -> bool:
    raw = params.get(name)
    if raw is None:
        return False
    if raw in ("true", "false"):
        return bool(raw == "true")
    raise StripeError(400, f"Invalid boolean: {raw}", code="parameter_invalid_boolean", param=name)


def _check_unknown(params: dict[str, Any], allowed: frozenset[str]) -> None:
    for name in params:
        if name not in allowed:
            raise StripeError(400, f"Received unknown parameter: {name}", code="parameter_unknown", param=name)


def _check_metadata(params: dict[str, Any]) -> dict[str, str]:
    md = params.get("metadata")
    if md is None or md == "":
        return {}
    if not isinstance(md, dict):
        raise StripeError(400, "Invalid object", code="parameter_invalid_object", param="metadata")
    if len(md) > 50:
        raise StripeError(400, "Metadata can have at most 50 keys.", param="metadata")
    out: dict[str, str] = {}
    for k, v in md.items():
        if len(k) > 40:
            raise StripeError(
                400,
                f"Metadata keys can have a maximum length of 40 characters (got {k!r}).",
                param=f"metadata[{k}]",
            )
        if not isinstance(v, str):
            raise StripeError(400, "Metadata values must be strings.", param=f"metadata[{k}]")
        if len(v) > 500:
            raise StripeError(
                400, "Metadata values can have a maximum length of 500 characters.", param=f"metadata[{k}]"
            )
        if v != "":
            out[k] = v
    return out


def _expand(params: dict[str, Any]) -> list[str]:
    exp = params.get("expand")
    if isinstance(exp, list):
        return [str(x) for x in exp]
    if isinstance(exp, str):
        return [exp]
    return []


@dataclass
class _Stored:
    method: str
    path: str
    params: dict[str, Any]
    status: int
    body: bytes
    request_id: str


@dataclass
class StripeState:
    """Objects and idempotency records of one fake Stripe account (``app[STRIPE_STATE]``),
    and the API keys it accepts."""

    payment_intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[tuple[str, str], _Stored] = field(default_factory=dict)
    in_flight: set[tuple[str, str]] = field(default_factory=set)
    api_keys: set[str] | None = None  # make_stripe_app's option (None: any sk_/rk_ key); reset() keeps it

    def reset(self) -> None:
        self.payment_intents.clear()
        self.charges.clear()
        self.refunds.clear()
        self.idempotency.clear()
        self.in_flight.clear()


STRIPE_STATE = web.AppKey("stripe_state", StripeState)


def stripe_error_response(request: web.Request, status: int, message: str) -> web.Response:
    """Stripe's error shape for a status (used for faults and router errors)."""
    if status == 404 and message == "Not Found":
        message = f"Unrecognized request URL ({request.method}: {request.path})."
    elif status == 405:
        message = f"Unrecognized request URL ({request.method}: {request.path})."
        status = 404
    if status == 429:
        err = StripeError(status, message, type="rate_limit_error", code="rate_limit")
    elif status == 401:
        err = StripeError(status, message, type="invalid_request_error")
    elif status == 402:
        err = StripeError(status, message, type="card_error", code="card_declined")
    elif status in (400, 403, 404):
        err = StripeError(status, message, type="invalid_request_error")
    else:
        err = StripeError(status, message, type="api_error")
    return _json(status, err.body)


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


Handler = Callable[[web.Request, dict[str, Any], str | None], Awaitable[tuple[int, dict[str, Any]]]]
AppHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_stripe_app(
    faults: Faults | None = None,
    *,
    ledger: Ledger | None = None,
    api_keys: set[str] | None = None,
    webhooks: WebhookSettings | Mapping[str, Any] | None = None,
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
) -> web.Application:
    """The fake Stripe.  ``api_keys``: accept only these keys (default: any ``sk_``/``rk_`` key);
    ``webhooks``: where and how to send events (default: none sent), signed with
    ``webhook_secret`` (the endpoint's ``whsec_...``)."""
    app = new_fake_app("stripe", stripe_error_response, faults=faults, ledger=ledger)
    state = StripeState(api_keys=api_keys)
    app[STRIPE_STATE] = state
    app[RESET_HOOKS_KEY].append(state.reset)

    spec = {"scheme": "stripe", "secret": webhook_secret}
    install_webhooks(app, "stripe", lambda: spec, webhooks, app[RESET_HOOKS_KEY])
    app.on_response_prepare.append(_add_request_id)
    r = app.router
    r.add_post("/v1/payment_intents", create_payment_intent)
    r.add_get("/v1/payment_intents/{id}", retrieve_payment_intent)
    r.add_post("/v1/payment_intents/{id}/confirm", confirm_payment_intent)
    r.add_post("/v1/payment_intents/{id}/capture", capture_payment_intent)
    r.add_post("/v1/payment_intents/{id}/cancel", cancel_payment_intent)
    r.add_post("/v1/refunds", create_refund)
    r.add_get("/v1/refunds/{id}", retrieve_refund)
    r.add_get("/v1/charges/{id}", retrieve_charge)
    # Stripe serves uploads on its own host (files.stripe.com); this fake takes them too.
    r.add_post("/v1/files", create_file)
    return app


# --- the frame every endpoint shares: auth, form parsing, Idempotency-Key --------------------


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "Request-Id" not in response.headers and not request.path.startswith("/__fake__/"):
        response.headers["Request-Id"] = request.get("stripe_request_id") or new_id("req_", 14)
    response.headers.setdefault("Stripe-Version", request.headers.get("Stripe-Version", "2026-06-24.dahlia"))


def _authenticate(request: web.Request) -> str:
    api_keys = request.app[STRIPE_STATE].api_keys
    auth = request.headers.get("Authorization", "")
    key = ""
    if auth.startswith("Bearer "):
        key = auth[7:].strip()
    elif auth.startswith("Basic "):
        try:
            key = base64.b64decode(auth[6:]).decode().split(":", 1)[0]
        except (ValueError, UnicodeDecodeError):
            key = ""
    if not key:
        raise StripeError(
            401,
            "You did not provide an API key. You need to provide your API key in the Authorization "
            "header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        )
    if not _KEY_RE.match(key) or (api_keys is not None and key not in api_keys):
        shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else key
        raise StripeError(
            401,
            f"Invalid API Key provided: {shown}",
            code="api_key_expired" if key.startswith("sk_") and api_keys is not None else None,
        )
    return key


def endpoint(fn: Handler) -> AppHandler:
    """Wrap a Stripe endpoint ``fn(request, params, idempotency_key)`` in what every endpoint
    does first: a request id, API key auth, form parsing, and the Idempotency-Key rules
    (replay, 400 on other parameters, 409 while in flight, store successes and stored errors)."""

    @functools.wraps(fn)
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STRIPE_STATE]
        request["stripe_request_id"] = new_id("req_", 14)
        try:
            api_key = _authenticate(request)
        except StripeError as exc:
            return _json(exc.status, exc.body)
        raw = await request.read()
        note_body(request, raw)
        if request.method == "POST":
            ctype = request.content_type
            if raw and ctype not in ("application/x-www-form-urlencoded", "application/octet-stream", ""):
                err = StripeError(
                    400,
                    "Invalid request: the body must be application/x-www-form-urlencoded.",
                )
                return _json(err.status, err.body)
            params = parse_stripe_form(raw.decode("utf-8", "replace"))
        else:
            params = parse_stripe_form(request.query_string)
        ikey = request.headers.get("Idempotency-Key") if request.method == "POST" else None
        if ikey is not None and len(ikey) > 255:
            err = StripeError(400, "Idempotency keys cannot be longer than 255 characters.", type="idempotency_error")
            return _json(err.status, err.body)
        if ikey is None:
            try:
                status, body = await fn(request, params, None)
            except StripeError as exc:
                return _json(exc.status, exc.body)
            return _json(status, body)

        scope = (api_key, ikey)
        stored = state.idempotency.get(scope)
        if stored is not None:
            if stored.path != request.path or stored.params != params:
                err = StripeError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they "
                    f"were first used with. Try using a key other than '{ikey}' if you meant to "
                    "execute a different request.",
                    type="idempotency_error",
                )
                return _json(err.status, err.body)
            note_replayed(request)
            resp = web.Response(status=stored.status, body=stored.body, content_type="application/json")
            resp.headers["Idempotent-Replayed"] = "true"
            resp.headers["Original-Request"] = stored.request_id
            return resp
        if scope in state.in_flight:
            err = StripeError(
                409,
                "There is currently another in-progress request using this Stripe API key and "
                f"idempotency key '{ikey}'. Please try again later.",
                type="idempotency_error",
                code="idempotency_key_in_use",
            )
            return _json(err.status, err.body)
        state.in_flight.add(scope)
        try:
            try:
                status, body = await fn(request, params, ikey)
                store = True
            except StripeError as exc:
                status, body, store = exc.status, exc.body, exc.store
            data = json.dumps(body).encode()
            if store:
                state.idempotency[scope] = _Stored(
                    request.method, request.path, params, status, data, request["stripe_request_id"]
                )
        finally:
            state.in_flight.discard(scope)
        return web.Response(status=status, body=data, content_type="application/json")

    return handle


# --- objects ---------------------------------------------------------------------------------


def _record(request: web.Request, kind: str, oid: str, key: str | None, **data: Any) -> None:
    rec = current_record(request)
    ledger_of(request).record(kind, oid, key=key, request_id=rec.request_id if rec else None, **data)


def _emit(request: web.Request, event_type: str, pi: dict[str, Any], key: str | None) -> None:
    """Send the webhook event about ``pi`` as it is now (when webhooks are on)."""
    sender: WebhookSender = request.app[WEBHOOKS_KEY]
    if not sender.enabled:
        return
    event_id = new_id("evt_3", 24)
    event: dict[str, Any] = {
        "id": event_id,
        "object": "event",
        "api_version": request.headers.get("Stripe-Version", API_VERSION),
        "created": int(time.time()),
        "data": {"object": _pi_view(request.app[STRIPE_STATE], pi, [])},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": request.get("stripe_request_id"), "idempotency_key": key},
        "type": event_type,
    }
    # Pretty-printed, as Stripe sends them: the endpoint must check the bytes it got.
    sender.send(event_id, event_type, json.dumps(event, indent=2).encode(), ref=pi["id"])


def _charge_object(ch: dict[str, Any]) -> dict[str, Any]:
    return dict(ch)


def _pi_view(state: StripeState, pi: dict[str, Any], expand: list[str]) -> dict[str, Any]:
    out = dict(pi)
    if "latest_charge" in expand and pi.get("latest_charge"):
        out["latest_charge"] = _charge_object(state.charges[pi["latest_charge"]])
    return out


def _new_charge(state: StripeState, pi: dict[str, Any], *, captured: bool, status: str) -> dict[str, Any]:
    ch_id = new_id("ch_3", 23)
    ch = {
        "id": ch_id,
        "object": "charge",
        "amount": pi["amount"],
        "amount_captured": pi["amount"] if captured and status == "succeeded" else 0,
        "amount_refunded": 0,
        "captured": captured and status == "succeeded",
        "created": int(time.time()),
        "currency": pi["currency"],
        "customer": pi.get("customer"),
        "description": pi.get("description"),
        "livemode": False,
        "metadata": dict(pi.get("metadata") or {}),
        "paid": status == "succeeded",
        "payment_intent": pi["id"],
        "payment_method": pi.get("payment_method"),
        "refunded": False,
        "status": status,
    }
    state.charges[ch_id] = ch
    return ch


def _get_pi(state: StripeState, pid: str) -> dict[str, Any]:
    pi = state.payment_intents.get(pid)
    if pi is None:
        raise StripeError(404, f"No such payment_intent: '{pid}'", code="resource_missing", param="intent")
    return pi


async def _confirm(request: web.Request, pi: dict[str, Any], params: dict[str, Any], key: str | None) -> None:
    """Attempt the payment: sets status, may raise a 402 (stored for idempotency)."""
    state = request.app[STRIPE_STATE]
    pm = pi.get("payment_method")
    if not pm:
        raise StripeError(
            400,
            "You cannot confirm this PaymentIntent because it's missing a payment method. To confirm "
            "the PaymentIntent with a payment method, pass one in the `payment_method` parameter.",
            code="payment_intent_unexpected_state",
            store=True,
            payment_intent=_pi_view(state, pi, []),
        )
    await side_effect_point(request)
    if pm in DECLINES:
        code, decline, msg = DECLINES[pm]
        ch = _new_charge(state, pi, captured=False, status="failed")
        pi["latest_charge"] = ch["id"]
        err: dict[str, Any] = {
            "type": "card_error",
            "code": code,
            "message": msg,
            "charge": ch["id"],
            "param": "payment_method" if code == "card_declined" else None,
        }
        if decline:
            err["decline_code"] = decline
        pi["last_payment_error"] = err
        pi["status"] = "requires_payment_method"
        pi["payment_method"] = None
        _record(request, "charge.failed", ch["id"], key, payment_intent=pi["id"], code=code)
        _emit(request, "payment_intent.payment_failed", pi, key)
        raise StripeError(
            402,
            msg,
            type="card_error",
            code=code,
            store=True,
            **{
                k: v
                for k, v in {
                    "decline_code": decline,
                    "charge": ch["id"],
                    "param": err["param"],
                    "payment_intent": _pi_view(state, pi, []),
                }.items()
                if v is not None
            },
        )
    if pm in AUTH_REQUIRED:
        if _bool_param(params, "error_on_requires_action"):
            pi["status"] = "requires_payment_method"
            raise StripeError(
                402,
                "Your card was declined. This transaction requires authentication.",
                type="card_error",
                code="authentication_required",
                decline_code="authentication_required",
                store=True,
                payment_intent=_pi_view(state, pi, []),
            )
        pi["status"] = "requires_action"
        pi["next_action"] = {"type": "use_stripe_sdk", "use_stripe_sdk": {"type": "three_d_secure_redirect"}}
        return
    if not re.match(r"^(pm|card|src)_[A-Za-z0-9_]+$", str(pm)):
        raise StripeError(400, f"No such PaymentMethod: '{pm}'", code="resource_missing", param="payment_method")
    manual = pi["capture_method"] == "manual"
    ch = _new_charge(state, pi, captured=not manual, status="succeeded")
    pi["latest_charge"] = ch["id"]
    pi["last_payment_error"] = None
    if manual:
        pi["status"] = "requires_capture"
        pi["amount_capturable"] = pi["amount"]
        _record(request, "charge.authorized", ch["id"], key, payment_intent=pi["id"], amount=pi["amount"])
    else:
        pi["status"] = "succeeded"
        pi["amount_received"] = pi["amount"]
        _record(
            request,
            "charge.succeeded",
            ch["id"],
            key,
            payment_intent=pi["id"],
            amount=pi["amount"],
            currency=pi["currency"],
        )
        _emit(request, "payment_intent.succeeded", pi, key)


# --- endpoints: one function each, registered by make_stripe_app ------------------------------


@endpoint
async def create_payment_intent(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``POST /v1/payment_intents``."""
    state = request.app[STRIPE_STATE]
    _check_unknown(params, PI_PARAMS)
    amount = _int_param(params, "amount", required=True)
    assert amount is not None
    cur_raw = params.get("currency")
    if cur_raw is None:
        raise StripeError(400, "Missing required param: currency.", code="parameter_missing", param="currency")
    currency = str(cur_raw).lower()
    if currency not in CURRENCIES:
        raise StripeError(
            400,
            f"Invalid currency: {cur_raw}. Stripe currently supports these currencies: "
            + ", ".join(sorted(CURRENCIES)),
            param="currency",
        )
    if amount < 1:
        raise StripeError(
            400,
            "This value must be greater than or equal to 1.",
            code="parameter_invalid_integer",
            param="amount",
        )
    if amount < _minimum(currency):
        raise StripeError(
            400,
            f"Amount must be at least {_minimum(currency)} {currency} minor units",
            code="amount_too_small",
            param="amount",
        )
    if amount > 99_999_999:
        raise StripeError(400, "Amount must be no more than 99999999", code="amount_too_large", param="amount")
    if currency in THREE_DECIMAL and amount % 10:
        raise StripeError(
            400,
            f"Invalid amount for {currency}: the last digit must be 0.",
            code="invalid_charge_amount",
            param="amount",
        )
    if currency == "isk" and amount % 100:
        raise StripeError(
            400,
            "ISK amounts must be divisible by 100.",
            code="invalid_charge_amount_no_decimal_compatible",
            param="amount",
        )
    capture_method = str(params.get("capture_method", "automatic"))
    if capture_method not in ("automatic", "automatic_async", "manual"):
        raise StripeError(
            400,
            "Invalid capture_method: must be one of automatic, automatic_async, or manual",
            param="capture_method",
        )
    confirm_now = _bool_param(params, "confirm")
    if not confirm_now:
        for name in CONFIRM_ONLY:
            if name in params:
                raise StripeError(400, f"You can only pass {name} when confirm=true.", param=name)
    metadata = _check_metadata(params)
    pm = params.get("payment_method")
    pm_types = params.get("payment_method_types")
    pi_id = new_id("pi_3", 23)
    pi: dict[str, Any] = {
        "id": pi_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": None,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": capture_method,
        "client_secret": f"{pi_id}_secret_{new_id('', 25)}",
        "confirmation_method": str(params.get("confirmation_method", "automatic")),
        "created": int(time.time()),
        "currency": currency,
        "customer": params.get("customer"),
        "description": params.get("description"),
        "last_payment_error": None,
        "latest_charge": None,
        "livemode": False,
        "metadata": metadata,
        "next_action": None,
        "on_behalf_of": params.get("on_behalf_of"),
        "payment_method": pm if isinstance(pm, str) and pm else None,
        "payment_method_options": {},
        "payment_method_types": pm_types if isinstance(pm_types, list) else ["card"],
        "processing": None,
        "receipt_email": params.get("receipt_email"),
        "setup_future_usage": params.get("setup_future_usage"),
        "shipping": params.get("shipping"),
        "statement_descriptor": params.get("statement_descriptor"),
        "statement_descriptor_suffix": params.get("statement_descriptor_suffix"),
        "status": "requires_confirmation" if pm else "requires_payment_method",
        "transfer_data": params.get("transfer_data"),
        "transfer_group": params.get("transfer_group"),
    }
    if pm and not confirm_now and not re.match(r"^(pm|card|src)_[A-Za-z0-9_]+$", str(pm)):
        raise StripeError(400, f"No such PaymentMethod: '{pm}'", code="resource_missing", param="payment_method")
    if confirm_now:
        if not pm:
            raise StripeError(
                400,
                "You cannot confirm this PaymentIntent because it's missing a payment method.",
                code="payment_intent_unexpected_state",
                param="payment_method",
            )
        if not re.match(r"^(pm|card|src)_[A-Za-z0-9_]+$", str(pm)):
            raise StripeError(400, f"No such PaymentMethod: '{pm}'", code="resource_missing", param="payment_method")
    else:
        await side_effect_point(request)
    state.payment_intents[pi_id] = pi
    _record(request, "payment_intent.created", pi_id, key, amount=amount, currency=currency, metadata=metadata)
    if confirm_now:
        await _confirm(request, pi, params, key)
    return 200, _pi_view(state, pi, _expand(params))


@endpoint
async def retrieve_payment_intent(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``GET /v1/payment_intents/{id}``."""
    state = request.app[STRIPE_STATE]
    return 200, _pi_view(state, _get_pi(state, request.match_info["id"]), _expand(params))


@endpoint
async def confirm_payment_intent(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``POST /v1/payment_intents/{id}/confirm``."""
    state = request.app[STRIPE_STATE]
    pi = _get_pi(state, request.match_info["id"])
    if pi["status"] not in ("requires_payment_method", "requires_confirmation", "requires_action"):
        raise StripeError(
            400,
            f"This PaymentIntent's status is {pi['status']} and it cannot be confirmed.",
            code="payment_intent_unexpected_state",
            payment_intent=_pi_view(state, pi, []),
        )
    if isinstance(params.get("payment_method"), str):
        pi["payment_method"] = params["payment_method"]
    await _confirm(request, pi, params, key)
    return 200, _pi_view(state, pi, _expand(params))


@endpoint
async def capture_payment_intent(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``POST /v1/payment_intents/{id}/capture``."""
    state = request.app[STRIPE_STATE]
    pi = _get_pi(state, request.match_info["id"])
    if pi["status"] != "requires_capture":
        raise StripeError(
            400,
            f"This PaymentIntent could not be captured because it has a status of {pi['status']}. "
            "Only a PaymentIntent with one of the following statuses may be captured: requires_capture.",
            code="payment_intent_unexpected_state",
            payment_intent=_pi_view(state, pi, []),
        )
    amount = _int_param(params, "amount_to_capture", required=False)
    amount = pi["amount_capturable"] if amount is None else amount
    if amount > pi["amount_capturable"] or amount < 1:
        raise StripeError(
            400,
            "The amount to capture is greater than the capturable amount.",
            code="amount_too_large",
            param="amount_to_capture",
        )
    await side_effect_point(request)
    pi["amount_received"] = amount
    pi["amount_capturable"] = 0
    pi["status"] = "succeeded"
    ch = state.charges[pi["latest_charge"]]
    ch["captured"] = True
    ch["amount_captured"] = amount
    _record(request, "payment_intent.captured", pi["id"], key, amount=amount)
    _emit(request, "payment_intent.succeeded", pi, key)
    return 200, _pi_view(state, pi, _expand(params))


@endpoint
async def cancel_payment_intent(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``POST /v1/payment_intents/{id}/cancel``."""
    state = request.app[STRIPE_STATE]
    pi = _get_pi(state, request.match_info["id"])
    if pi["status"] in ("succeeded", "canceled"):
        raise StripeError(
            400,
            f"You cannot cancel this PaymentIntent because it has a status of {pi['status']}.",
            code="payment_intent_unexpected_state",
            payment_intent=_pi_view(state, pi, []),
        )
    await side_effect_point(request)
    pi["status"] = "canceled"
    pi["canceled_at"] = int(time.time())
    pi["cancellation_reason"] = params.get("cancellation_reason")
    pi["amount_capturable"] = 0
    _record(request, "payment_intent.canceled", pi["id"], key)
    return 200, _pi_view(state, pi, _expand(params))


@endpoint
async def create_refund(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``POST /v1/refunds``."""
    state = request.app[STRIPE_STATE]
    _check_unknown(params, REFUND_PARAMS)
    pid, cid = params.get("payment_intent"), params.get("charge")
    if not pid and not cid:
        raise StripeError(
            400, "One of the following params should be provided for this request: payment_intent or charge."
        )
    if cid:
        ch = state.charges.get(str(cid))
        if ch is None:
            raise StripeError(404, f"No such charge: '{cid}'", code="resource_missing", param="charge")
        pi = state.payment_intents[ch["payment_intent"]]
        if pid and pid != pi["id"]:
            raise StripeError(400, "The charge does not belong to the given payment_intent.", param="charge")
    else:
        pi = state.payment_intents.get(str(pid)) or {}
        if not pi:
            raise StripeError(404, f"No such payment_intent: '{pid}'", code="resource_missing", param="payment_intent")
        ch = state.charges.get(pi.get("latest_charge") or "", {})
    if pi["status"] != "succeeded" or not ch or ch.get("status") != "succeeded":
        raise StripeError(
            400,
            f"This PaymentIntent ({pi['id']}) does not have a successful charge to refund.",
            code="charge_not_refundable" if ch else "payment_intent_unexpected_state",
        )
    remaining = int(ch["amount_captured"]) - int(ch["amount_refunded"])
    if remaining <= 0:
        raise StripeError(400, f"Charge {ch['id']} has already been refunded.", code="charge_already_refunded")
    amount = _int_param(params, "amount", required=False)
    if amount is None:
        amount = remaining
    if amount < 1:
        raise StripeError(400, "Invalid positive integer", code="parameter_invalid_integer", param="amount")
    if amount > remaining:
        raise StripeError(
            400,
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})",
            code="amount_too_large",
            param="amount",
        )
    reason = params.get("reason")
    if reason is not None and reason not in ("duplicate", "fraudulent", "requested_by_customer"):
        raise StripeError(400, f"Invalid reason: {reason}", param="reason")
    metadata = _check_metadata(params)
    await side_effect_point(request)
    re_id = new_id("re_3", 23)
    refund = {
        "id": re_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": new_id("txn_3", 23),
        "charge": ch["id"],
        "created": int(time.time()),
        "currency": pi["currency"],
        "destination_details": None,
        "metadata": metadata,
        "payment_intent": pi["id"],
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": "succeeded",
        "transfer_reversal": None,
    }
    ch["amount_refunded"] = int(ch["amount_refunded"]) + amount
    ch["refunded"] = ch["amount_refunded"] >= ch["amount_captured"]
    state.refunds[re_id] = refund
    _record(request, "refund.created", re_id, key, amount=amount, payment_intent=pi["id"], charge=ch["id"])
    return 200, refund


@endpoint
async def retrieve_refund(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``GET /v1/refunds/{id}``."""
    state = request.app[STRIPE_STATE]
    rid = request.match_info["id"]
    refund = state.refunds.get(rid)
    if refund is None:
        raise StripeError(404, f"No such refund: '{rid}'", code="resource_missing", param="id")
    return 200, refund


@endpoint
async def retrieve_charge(request: web.Request, params: dict[str, Any], key: str | None) -> tuple[int, Any]:
    """``GET /v1/charges/{id}``."""
    state = request.app[STRIPE_STATE]
    cid = request.match_info["id"]
    ch = state.charges.get(cid)
    if ch is None:
        raise StripeError(404, f"No such charge: '{cid}'", code="resource_missing", param="id")
    return 200, _charge_object(ch)


async def create_file(request: web.Request) -> web.StreamResponse:
    """``POST /v1/files`` (files.stripe.com): a multipart upload of ``file`` and ``purpose``."""
    request["stripe_request_id"] = new_id("req_", 14)
    try:
        _authenticate(request)
    except StripeError as exc:
        return _json(exc.status, exc.body)
    if request.content_type != "multipart/form-data":
        err = StripeError(400, "File uploads must be multipart/form-data.", param="file")
        return _json(err.status, err.body)
    form = await request.post()
    upload = form.get("file")
    purpose = str(form.get("purpose") or "")
    if not isinstance(upload, web.FileField) or not purpose:
        err = StripeError(400, "Missing required param: file and purpose.", param="file")
        return _json(err.status, err.body)
    data = upload.file.read()
    fid = new_id("file_", 24)
    _record(request, "file.created", fid, request.headers.get("Idempotency-Key"), size=len(data), purpose=purpose)
    return _json(
        200,
        {
            "id": fid,
            "object": "file",
            "created": int(time.time()),
            "filename": upload.filename,
            "purpose": purpose,
            "size": len(data),
            "type": (upload.filename or "").rpartition(".")[2] or None,
            "url": None,
        },
    )
