"""A fake PayPal REST API (OAuth2 client credentials, Orders v2, Payments v2), see
providers.md section 2.

* ``POST /v1/oauth2/token`` (Basic ``client_id:secret``, ``grant_type=client_credentials``).
* ``POST /v2/checkout/orders``; ``GET /v2/checkout/orders/{id}``;
  ``POST /v2/checkout/orders/{id}/capture`` and ``/authorize``.
* ``POST /v2/payments/authorizations/{id}/capture`` and ``/void``; ``GET`` authorizations,
  captures and refunds; ``POST /v2/payments/captures/{id}/refund``.

Orders created without a ``payment_source`` start ``CREATED``; with ``auto_approve=True``
(default) the buyer is assumed to have approved, so capture/authorize succeed; with
``auto_approve=False`` they answer 422 ``ORDER_NOT_APPROVED`` unless the capture body
carries a ``payment_source``.  A ``payment_source`` (card or vault id) on create makes a
"single-step" order: completed at once for ``intent=CAPTURE`` (``PayPal-Request-Id`` is then
mandatory).  A card number ending in ``0002`` or a vault id starting with ``DECLINE``
gives 422 ``INSTRUMENT_DECLINED``.

``PayPal-Request-Id`` (providers.md 2.6): a repeat returns the latest state of the first
request's result with status 200 and is not executed again (the body is not compared,
as PayPal documents no such check); a repeat while the first is in flight gets 409.

Side effects: ``token.issued``, ``order.created``, ``order.captured``, ``order.authorized``,
``authorization.captured``, ``authorization.voided``, ``refund.created``; each with the
request's ``PayPal-Request-Id`` as key.

Webhooks (opt-in, ``webhooks={"url": ...}``; fakes/webhooks.py): a
``PAYMENT.CAPTURE.COMPLETED`` event for every capture (an order captured, single-step or
not, and an authorization captured), the capture as its ``resource`` with
``supplementary_data.related_ids.order_id``. Each try carries PayPal's transmission
headers (providers.md 2.10): ``PAYPAL-TRANSMISSION-ID``/``-TIME``/``-SIG``,
``PAYPAL-AUTH-ALGO: SHA256withRSA`` and ``PAYPAL-CERT-URL``, the signature SHA256withRSA
over ``transmission_id|transmission_time|webhook_id|crc32(body)`` with the fake's own RSA
key (``app[PAYPAL_WEBHOOKS]``). ``POST /v1/notifications/verify-webhook-signature``
(behind the OAuth token, like every endpoint) answers ``{"verification_status":
"SUCCESS"}`` for an event this fake signed for ``webhook_id``, unchanged, and
``FAILURE`` otherwise; 400 ``VALIDATION_ERROR`` when a field is missing.

Layout: ``make_paypal_app`` registers one module-level function per endpoint; all but the
token endpoint are wrapped by ``endpoint`` (auth, JSON body, PayPal-Request-Id) and find
the account's objects and options in ``request.app[PAYPAL_STATE]``.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import secrets
import string
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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
from .signing import PAYPAL_CERT_URL, SignSpec, iso_now, paypal_message, pem, sign
from .webhooks import WEBHOOKS_KEY, WebhookSender, WebhookSettings, install_webhooks

__all__ = [
    "DEFAULT_WEBHOOK_ID",
    "PAYPAL_STATE",
    "PAYPAL_WEBHOOKS",
    "PayPalError",
    "PayPalState",
    "PayPalWebhooks",
    "make_paypal_app",
]

DEFAULT_WEBHOOK_ID = "WH-FAKE-0W4F7T2D31947513K"

PAYPAL_DECIMALS: dict[str, int] = {
    **{
        c: 2
        for c in ("AUD BRL CAD CNY CZK DKK EUR HKD ILS MYR MXN NZD NOK PHP PLN GBP RUB SGD SEK CHF THB USD INR").split()
    },
    "HUF": 0,
    "JPY": 0,
    "TWD": 0,
}
MAX_VALUE = Decimal("999999999999999.99")
_VALUE_RE = re.compile(r"^((-?[0-9]+)|(-?([0-9]+)?[.][0-9]+))$")
_UPPER = string.ascii_uppercase + string.digits
NAMES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILURE",
    403: "NOT_AUTHORIZED",
    404: "RESOURCE_NOT_FOUND",
    405: "METHOD_NOT_SUPPORTED",
    409: "RESOURCE_CONFLICT",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "UNPROCESSABLE_ENTITY",
    429: "RATE_LIMIT_REACHED",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_UNAVAILABLE",
}
MESSAGES = {
    400: "Request is not well-formed, syntactically incorrect, or violates schema.",
    401: "Authentication failed due to invalid authentication credentials or a missing Authorization header.",
    403: "Authorization failed due to insufficient permissions.",
    404: "The specified resource does not exist.",
    409: "The server has detected a conflict while processing this request.",
    422: "The requested action could not be performed, semantically incorrect, or failed business validation.",
    429: "Too many requests. Blocked due to rate limiting.",
    500: "An internal server error occurred.",
    503: "Service Unavailable.",
}


def _debug_id() -> str:
    return secrets.token_hex(7)[:13]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PayPalError(Exception):
    """Raised by handlers; becomes PayPal's ``{name, message, debug_id, details, links}``."""

    def __init__(
        self,
        status: int,
        issue: str | None = None,
        description: str | None = None,
        *,
        field: str | None = None,
        value: str | None = None,
        location: str = "body",
        name: str | None = None,
        message: str | None = None,
    ) -> None:
        super().__init__(issue or name or str(status))
        self.status = status
        details: list[dict[str, Any]] = []
        links: list[dict[str, str]] = []
        if issue is not None:
            d: dict[str, Any] = {"issue": issue, "description": description or issue.replace("_", " ").lower()}
            if field is not None:
                d["field"] = field
                d["location"] = location
            if value is not None:
                d["value"] = value
            details.append(d)
            links.append(
                {
                    "href": f"https://developer.paypal.com/docs/api/orders/v2/#error-{issue}",
                    "rel": "information_link",
                    "method": "GET",
                }
            )
        self.body: dict[str, Any] = {
            "name": name or NAMES.get(status, "INTERNAL_SERVER_ERROR"),
            "message": message or MESSAGES.get(status, "An error occurred."),
            "debug_id": _debug_id(),
            "details": details,
            "links": links,
        }


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def paypal_error_response(request: web.Request, status: int, message: str) -> web.Response:
    """PayPal's error shape for a status (faults, unknown routes)."""
    err = PayPalError(status, message=MESSAGES.get(status, message))
    if status == 404 and message == "Not Found":
        err = PayPalError(404, "INVALID_RESOURCE_ID", "Specified resource ID does not exist.")
    return _json(status, err.body)


@dataclass
class _Stored:
    replay: Callable[[], dict[str, Any]]


@dataclass
class PayPalState:
    """Tokens, orders, payments and PayPal-Request-Id records of one fake PayPal account
    (``app[PAYPAL_STATE]``), and make_paypal_app's options (``reset()`` keeps those)."""

    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)
    orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    authorizations: dict[str, dict[str, Any]] = field(default_factory=dict)
    captures: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    owner: dict[str, str] = field(default_factory=dict)  # payment id -> order id
    request_ids: dict[tuple[str, str, str], _Stored] = field(default_factory=dict)
    in_flight: set[tuple[str, str, str]] = field(default_factory=set)
    clients: dict[str, str] | None = None
    token_ttl: int = 32400
    extra_tokens: set[str] | None = None
    auto_approve: bool = True

    def reset(self) -> None:
        for d in (self.tokens, self.orders, self.authorizations, self.captures, self.refunds, self.owner):
            d.clear()
        self.request_ids.clear()
        self.in_flight.clear()


PAYPAL_STATE = web.AppKey("paypal_state", PayPalState)


class PayPalWebhooks:
    """PayPal's side of its webhooks: it signs the events it sends (SHA256withRSA over
    ``transmission_id|transmission_time|webhook_id|crc32(body)``, as PayPal documents) with
    a key of its own, remembers what it sent, and answers verify-webhook-signature.

    ``signed(event)`` gives the body and headers of one POST of an event (tests use it to
    make PayPal-signed events of their own); the sender calls ``headers(body)`` per try."""

    CERT_URL = PAYPAL_CERT_URL

    def __init__(self, webhook_id: str = DEFAULT_WEBHOOK_ID, *, eager: bool = False) -> None:
        self.webhook_id = webhook_id
        self.sent: dict[str, bytes] = {}  # event id -> the bytes sent
        self.verifications = 0
        self._key: rsa.RSAPrivateKey | None = None
        if eager:  # a fake asked to send webhooks makes its key now, not during the traffic
            _ = self.key

    @property
    def key(self) -> rsa.RSAPrivateKey:
        if self._key is None:  # made on first use: most fakes never sign anything
            self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return self._key

    def reset(self) -> None:
        self.sent.clear()
        self.verifications = 0

    def spec(self) -> SignSpec:
        return {"scheme": "paypal", "webhook_id": self.webhook_id, "key": pem(self.key)}

    def headers(self, body: bytes) -> dict[str, str]:
        """PayPal's headers for one POST of ``body`` (a new transmission each time)."""
        self.sent[str(json.loads(body).get("id"))] = body
        return sign(self.spec(), body)[1]

    def signed(self, event: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(event, indent=1).encode()
        return body, self.headers(body)

    def check(self, request: Mapping[str, Any]) -> bool:
        """The verify API's judgement on a verify-webhook-signature request body."""
        self.verifications += 1
        event = request.get("webhook_event")
        if not isinstance(event, dict) or request.get("webhook_id") != self.webhook_id:
            return False
        raw = self.sent.get(str(event.get("id")))
        if raw is None or json.loads(raw) != event:
            return False
        message = paypal_message(
            str(request["transmission_id"]), str(request["transmission_time"]), self.webhook_id, raw
        )
        try:
            self.key.public_key().verify(
                base64.b64decode(str(request["transmission_sig"])), message, padding.PKCS1v15(), hashes.SHA256()
            )
        except Exception:
            return False
        return True


PAYPAL_WEBHOOKS = web.AppKey("paypal_webhooks", PayPalWebhooks)
VERIFY_FIELDS = ("auth_algo", "cert_url", "transmission_id", "transmission_sig", "transmission_time", "webhook_id")

Result = tuple[int, dict[str, Any], Callable[[], dict[str, Any]] | None]
Handler = Callable[[web.Request, Any, str | None, str], Awaitable[Result]]
AppHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BASE = "https://api-m.sandbox.paypal.com"


def _money(obj: Any, path: str, *, required: bool = True) -> tuple[str, Decimal] | None:
    if obj is None and not required:
        return None
    if not isinstance(obj, dict):
        raise PayPalError(400, "MISSING_REQUIRED_PARAMETER", "A required field is missing.", field=path)
    code = obj.get("currency_code")
    value = obj.get("value")
    if not isinstance(code, str) or not code:
        raise PayPalError(
            400, "MISSING_REQUIRED_PARAMETER", "A required field is missing.", field=f"{path}/currency_code"
        )
    if not isinstance(value, str) or not value:
        raise PayPalError(400, "MISSING_REQUIRED_PARAMETER", "A required field is missing.", field=f"{path}/value")
    if len(code) != 3:
        raise PayPalError(
            400,
            "INVALID_STRING_LENGTH",
            "The value of a field is too long or too short.",
            field=f"{path}/currency_code",
            value=code,
        )
    if not _VALUE_RE.match(value) or len(value) > 32:
        raise PayPalError(
            400,
            "INVALID_PARAMETER_SYNTAX",
            "The value of a field does not conform to the expected format.",
            field=f"{path}/value",
            value=value,
        )
    if code not in PAYPAL_DECIMALS:
        raise PayPalError(
            422,
            "CURRENCY_NOT_SUPPORTED",
            "Currency code is not currently supported.",
            field=f"{path}/currency_code",
            value=code,
        )
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:  # pragma: no cover - regex guards
        raise PayPalError(400, "INVALID_PARAMETER_SYNTAX", field=f"{path}/value", value=value) from exc
    exponent = amount.as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    if PAYPAL_DECIMALS[code] == 0 and places > 0:
        raise PayPalError(
            422, "DECIMALS_NOT_SUPPORTED", "Currency does not support decimals.", field=f"{path}/value", value=value
        )
    if places > 2:
        raise PayPalError(
            422,
            "DECIMAL_PRECISION",
            "If the currency supports decimals, only two decimal place precision is supported.",
            field=f"{path}/value",
            value=value,
        )
    if amount <= 0:
        raise PayPalError(
            422, "CANNOT_BE_ZERO_OR_NEGATIVE", "Must be greater than zero.", field=f"{path}/value", value=value
        )
    if amount > MAX_VALUE:
        raise PayPalError(
            422,
            "MAX_VALUE_EXCEEDED",
            "Should be less than or equal to 999999999999999.99.",
            field=f"{path}/value",
            value=value,
        )
    return code, amount


def _fmt(amount: Decimal, code: str) -> str:
    return format(amount.quantize(Decimal(1).scaleb(-PAYPAL_DECIMALS.get(code, 2))), "f")


def make_paypal_app(
    faults: Faults | None = None,
    *,
    ledger: Ledger | None = None,
    clients: dict[str, str] | None = None,
    token_ttl: int = 32400,
    extra_tokens: set[str] | None = None,
    auto_approve: bool = True,
    webhooks: WebhookSettings | Mapping[str, Any] | None = None,
    webhook_id: str = DEFAULT_WEBHOOK_ID,
) -> web.Application:
    """The fake PayPal.  ``clients``: ``{client_id: secret}`` accepted at the token endpoint
    (default: any non-empty pair); ``extra_tokens``: bearer tokens accepted without a token
    call; ``token_ttl``: ``expires_in`` of issued tokens; ``webhooks``: where and how to send
    capture events (default: none sent), for the subscription ``webhook_id``."""
    app = new_fake_app("paypal", paypal_error_response, faults=faults, ledger=ledger)
    state = PayPalState(clients=clients, token_ttl=token_ttl, extra_tokens=extra_tokens, auto_approve=auto_approve)
    app[PAYPAL_STATE] = state
    app[RESET_HOOKS_KEY].append(state.reset)
    hooks = PayPalWebhooks(webhook_id, eager=webhooks is not None)
    app[PAYPAL_WEBHOOKS] = hooks
    app[RESET_HOOKS_KEY].append(hooks.reset)
    install_webhooks(app, "paypal", hooks.spec, webhooks, app[RESET_HOOKS_KEY])
    app.on_response_prepare.append(_add_debug_id)
    r = app.router
    r.add_post("/v1/oauth2/token", oauth_token)
    r.add_post("/v2/checkout/orders", create_order)
    r.add_get("/v2/checkout/orders/{id}", show_order)
    r.add_post("/v2/checkout/orders/{id}/capture", capture_order)
    r.add_post("/v2/checkout/orders/{id}/authorize", authorize_order)
    r.add_post("/v2/payments/authorizations/{id}/capture", capture_authorization)
    r.add_post("/v2/payments/authorizations/{id}/void", void_authorization)
    r.add_get("/v2/payments/authorizations/{id}", show_authorization)
    r.add_get("/v2/payments/captures/{id}", show_capture)
    r.add_post("/v2/payments/captures/{id}/refund", refund_capture)
    r.add_get("/v2/payments/refunds/{id}", show_refund)
    r.add_post("/v1/notifications/verify-webhook-signature", verify_webhook_signature)
    return app


# --- the frame every endpoint shares: auth, JSON body, PayPal-Request-Id ----------------------


async def _add_debug_id(request: web.Request, response: web.StreamResponse) -> None:
    if not request.path.startswith("/__fake__/"):
        response.headers.setdefault("Paypal-Debug-Id", _debug_id())


def _record(request: web.Request, kind: str, oid: str, key: str | None, **data: Any) -> None:
    rec = current_record(request)
    ledger_of(request).record(kind, oid, key=key, request_id=rec.request_id if rec else None, **data)


async def oauth_token(request: web.Request) -> web.StreamResponse:
    """``POST /v1/oauth2/token`` (client credentials; not under ``endpoint``: Basic auth, a form body)."""
    state = request.app[PAYPAL_STATE]
    raw = await request.read()
    note_body(request, raw)
    auth = request.headers.get("Authorization", "")
    cid = secret = ""
    if auth.startswith("Basic "):
        try:
            cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            cid = secret = ""
    ok = bool(cid and secret) and (state.clients is None or state.clients.get(cid) == secret)
    if not ok:
        return _json(401, {"error": "invalid_client", "error_description": "Client Authentication failed"})
    form = parse_qs(raw.decode("utf-8", "replace"))
    grant = (form.get("grant_type") or [""])[0]
    if grant != "client_credentials":
        return _json(400, {"error": "unsupported_grant_type", "error_description": f"Grant Type is {grant or 'NULL'}"})
    tok = "A21AA" + new_id("", 92, string.ascii_letters + string.digits + "-_")
    state.tokens[tok] = (cid, time.monotonic() + state.token_ttl)
    _record(request, "token.issued", tok[:12], None, client_id=cid)
    return _json(
        200,
        {
            "scope": "https://uri.paypal.com/services/payments/payment https://uri.paypal.com/services/payments/refund",
            "access_token": tok,
            "token_type": "Bearer",
            "app_id": "APP-80W284485P519543T",
            "expires_in": state.token_ttl,
            "nonce": f"{_now()}{new_id('', 20)}",
        },
    )


def _authenticate(request: web.Request) -> str:
    state = request.app[PAYPAL_STATE]
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        tok = auth[7:].strip()
        if state.extra_tokens is not None and tok in state.extra_tokens:
            return "static"
        entry = state.tokens.get(tok)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
    raise PayPalError(401, name="AUTHENTICATION_FAILURE")


def endpoint(fn: Handler) -> AppHandler:
    """Wrap a PayPal endpoint ``fn(request, body, paypal_request_id, prefer)`` in what every
    endpoint does first: bearer token auth, the JSON body, and the PayPal-Request-Id rules
    (a repeat gets the current state of the first result with 200, 409 while in flight)."""

    @functools.wraps(fn)
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[PAYPAL_STATE]
        try:
            client = _authenticate(request)
            raw = await request.read()
            note_body(request, raw)
            body: Any = None
            if raw.strip():
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    raise PayPalError(400, "MALFORMED_REQUEST_JSON", "The request JSON is not well formed.") from exc
            rid = request.headers.get("PayPal-Request-Id") if request.method == "POST" else None
            if rid is not None and not 1 <= len(rid) <= 108:
                raise PayPalError(
                    400,
                    "INVALID_STRING_LENGTH",
                    "The value of a field is too long or too short.",
                    field="PayPal-Request-Id",
                    location="header",
                )
            prefer = request.headers.get("Prefer", "return=minimal")
            if rid is None:
                status, out, _ = await fn(request, body, rid, prefer)
                return _json(status, out)
            scope = (client, request.path, rid)
            stored = state.request_ids.get(scope)
            if stored is not None:
                note_replayed(request)
                return _json(200, stored.replay())
            if scope in state.in_flight:
                raise PayPalError(
                    409,
                    "PREVIOUS_REQUEST_IN_PROGRESS",
                    "A previous request on this resource is currently in progress. Please wait and retry.",
                )
            state.in_flight.add(scope)
            try:
                status, out, replay = await fn(request, body, rid, prefer)
                if replay is not None:
                    state.request_ids[scope] = _Stored(replay)
            finally:
                state.in_flight.discard(scope)
            return _json(status, out)
        except PayPalError as exc:
            return _json(exc.status, exc.body)

    return handle


# --- objects -----------------------------------------------------------------------------------


def _order_links(order: dict[str, Any]) -> list[dict[str, str]]:
    oid = order["id"]
    action = "capture" if order["intent"] == "CAPTURE" else "authorize"
    links = [{"href": f"{BASE}/v2/checkout/orders/{oid}", "rel": "self", "method": "GET"}]
    if order["status"] in ("CREATED", "APPROVED", "PAYER_ACTION_REQUIRED"):
        links += [
            {"href": f"https://www.sandbox.paypal.com/checkoutnow?token={oid}", "rel": "approve", "method": "GET"},
            {"href": f"{BASE}/v2/checkout/orders/{oid}", "rel": "update", "method": "PATCH"},
            {"href": f"{BASE}/v2/checkout/orders/{oid}/{action}", "rel": action, "method": "POST"},
        ]
    return links


def _order_view(state: PayPalState, oid: str, prefer: str = "return=representation") -> dict[str, Any]:
    order = state.orders[oid]
    full = {k: v for k, v in order.items() if not k.startswith("_")}
    full["links"] = _order_links(order)
    units = []
    for pu in order["purchase_units"]:
        u = {k: v for k, v in pu.items() if k != "payments"}
        pays = {
            k: [
                {
                    **(
                        state.captures
                        if k == "captures"
                        else state.authorizations
                        if k == "authorizations"
                        else state.refunds
                    )[pid]
                }
                for pid in ids
            ]
            for k, ids in pu.get("payments", {}).items()
            if ids
        }
        if pays:
            u["payments"] = pays
        units.append(u)
    full["purchase_units"] = units
    if "representation" not in prefer:
        minimal = {"id": full["id"], "status": full["status"], "links": full["links"]}
        if order["status"] == "COMPLETED":
            minimal["purchase_units"] = [
                {"reference_id": u.get("reference_id"), "payments": u.get("payments", {})} for u in units
            ]
        return minimal
    return full


def _get_order(state: PayPalState, oid: str) -> dict[str, Any]:
    order = state.orders.get(oid)
    if order is None:
        raise PayPalError(
            404,
            "INVALID_RESOURCE_ID",
            "Specified resource ID does not exist. Please check the resource ID and try again.",
            name="RESOURCE_NOT_FOUND",
        )
    return order


def _declined(source: Any) -> bool:
    if not isinstance(source, dict):
        return False
    for kind in ("card", "paypal", "token"):
        sub = source.get(kind)
        if isinstance(sub, dict):
            if str(sub.get("number", "")).endswith("0002"):
                return True
            vid = sub.get("vault_id") or sub.get("id")
            if isinstance(vid, str) and vid.upper().startswith("DECLINE"):
                return True
    return False


def _source_view(source: Any) -> dict[str, Any]:
    if not isinstance(source, dict):
        return {}
    out: dict[str, Any] = {}
    for kind, sub in source.items():
        if not isinstance(sub, dict):
            continue
        if kind == "card":
            num = str(sub.get("number", ""))
            out["card"] = {
                "last_digits": num[-4:] if num else "1111",
                "brand": "VISA",
                "type": "CREDIT",
                **({"name": sub["name"]} if "name" in sub else {}),
            }
        else:
            out[kind] = {k: v for k, v in sub.items() if k in ("vault_id", "email_address", "name", "id", "type")}
    return out


def _new_payment(state: PayPalState, kind: str, order: dict[str, Any], pu: dict[str, Any], status: str) -> str:
    pid = new_id("", 17, _UPPER)
    amount = pu["amount"]
    now = _now()
    obj: dict[str, Any] = {
        "id": pid,
        "status": status,
        "amount": {"currency_code": amount["currency_code"], "value": amount["value"]},
        "create_time": now,
        "update_time": now,
    }
    for k in ("custom_id", "invoice_id"):
        if k in pu:
            obj[k] = pu[k]
    if kind == "captures":
        obj["final_capture"] = True
        obj["seller_protection"] = {"status": "ELIGIBLE", "dispute_categories": ["ITEM_NOT_RECEIVED"]}
        obj["links"] = [
            {"href": f"{BASE}/v2/payments/captures/{pid}", "rel": "self", "method": "GET"},
            {"href": f"{BASE}/v2/payments/captures/{pid}/refund", "rel": "refund", "method": "POST"},
            {"href": f"{BASE}/v2/checkout/orders/{order['id']}", "rel": "up", "method": "GET"},
        ]
        state.captures[pid] = obj
    else:
        obj["expiration_time"] = now
        obj["links"] = [
            {"href": f"{BASE}/v2/payments/authorizations/{pid}", "rel": "self", "method": "GET"},
            {"href": f"{BASE}/v2/payments/authorizations/{pid}/capture", "rel": "capture", "method": "POST"},
            {"href": f"{BASE}/v2/payments/authorizations/{pid}/void", "rel": "void", "method": "POST"},
        ]
        state.authorizations[pid] = obj
    state.owner[pid] = order["id"]
    pu.setdefault("payments", {}).setdefault(kind, []).append(pid)
    return pid


async def _complete(request: web.Request, order: dict[str, Any], key: str | None) -> None:
    """Capture or authorize every purchase unit of ``order``."""
    state = request.app[PAYPAL_STATE]
    await side_effect_point(request)
    kind = "captures" if order["intent"] == "CAPTURE" else "authorizations"
    for pu in order["purchase_units"]:
        pid = _new_payment(state, kind, order, pu, "COMPLETED" if kind == "captures" else "CREATED")
        _record(
            request,
            "order.captured" if kind == "captures" else "order.authorized",
            pid,
            key,
            order_id=order["id"],
            amount=pu["amount"]["value"],
            currency=pu["amount"]["currency_code"],
        )
        if kind == "captures":
            _emit_capture(request, pid, order["id"])
    order["status"] = "COMPLETED"
    order["update_time"] = _now()


def _emit_capture(request: web.Request, capture_id: str, order_id: str, *, authorization_id: str | None = None) -> None:
    """``PAYMENT.CAPTURE.COMPLETED`` about a capture just made (when webhooks are on)."""
    sender: WebhookSender = request.app[WEBHOOKS_KEY]
    if not sender.enabled:
        return
    capture = request.app[PAYPAL_STATE].captures[capture_id]
    resource = {k: v for k, v in capture.items() if not k.startswith("_")}
    related = {"order_id": order_id, **({"authorization_id": authorization_id} if authorization_id else {})}
    resource["supplementary_data"] = {"related_ids": related}
    amount = capture["amount"]
    event_id = "WH-" + new_id("", 17, _UPPER) + "-" + new_id("", 17, _UPPER)
    event: dict[str, Any] = {
        "id": event_id,
        "event_version": "1.0",
        "create_time": iso_now(millis=True),
        "resource_type": "capture",
        "resource_version": "2.0",
        "event_type": "PAYMENT.CAPTURE.COMPLETED",
        "summary": f"Payment completed for {amount['value']} {amount['currency_code']}",
        "resource": resource,
        "links": [
            {"href": f"{BASE}/v1/notifications/webhooks-events/{event_id}", "rel": "self", "method": "GET"},
            {"href": f"{BASE}/v1/notifications/webhooks-events/{event_id}/resend", "rel": "resend", "method": "POST"},
        ],
    }
    body = json.dumps(event, indent=1).encode()
    request.app[PAYPAL_WEBHOOKS].sent[event_id] = body  # what the verify API will recognise
    sender.send(event_id, "PAYMENT.CAPTURE.COMPLETED", body, ref=capture_id)


def _approval_check(state: PayPalState, order: dict[str, Any], body: Any, action: str) -> None:
    wanted = "CAPTURE" if action == "capture" else "AUTHORIZE"
    if order["intent"] != wanted:
        raise PayPalError(
            422,
            "ACTION_DOES_NOT_MATCH_INTENT",
            f"Order was created with an intent to '{order['intent']}'. Please use "
            f"v2/checkout/orders/order_id/{'capture' if order['intent'] == 'CAPTURE' else 'authorize'} "
            "to complete the transaction.",
        )
    if order["status"] == "COMPLETED":
        raise PayPalError(
            422,
            "ORDER_ALREADY_CAPTURED" if action == "capture" else "ORDER_ALREADY_AUTHORIZED",
            "Order already captured. If 'intent=CAPTURE' only one capture per order is allowed."
            if action == "capture"
            else "Order already authorized.",
        )
    has_source = isinstance(body, dict) and body.get("payment_source") is not None
    if not (state.auto_approve or order["status"] == "APPROVED" or has_source):
        raise PayPalError(
            422,
            "ORDER_NOT_APPROVED",
            "Payer has not yet approved the Order for payment. Please redirect the payer to the "
            "'rel':'approve' url returned as part of the HATEOAS links within the Create Order call.",
        )
    if has_source and _declined(body["payment_source"]):
        raise PayPalError(422, "INSTRUMENT_DECLINED", "The instrument presented was declined.")


def _get_payment(store: dict[str, dict[str, Any]], pid: str) -> dict[str, Any]:
    obj = store.get(pid)
    if obj is None:
        raise PayPalError(
            404,
            "INVALID_RESOURCE_ID",
            "Specified resource ID does not exist. Please check the resource ID and try again.",
            name="RESOURCE_NOT_FOUND",
        )
    return obj


# --- endpoints: one function each, registered by make_paypal_app --------------------------------


@endpoint
async def create_order(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/checkout/orders``."""
    state = request.app[PAYPAL_STATE]
    if not isinstance(body, dict):
        raise PayPalError(400, "MALFORMED_REQUEST_JSON", "The request JSON is not well formed.")
    intent = body.get("intent")
    if intent is None:
        raise PayPalError(400, "MISSING_REQUIRED_PARAMETER", "A required field is missing.", field="/intent")
    if intent not in ("CAPTURE", "AUTHORIZE"):
        raise PayPalError(
            400, "INVALID_PARAMETER_VALUE", "The value of a field is invalid.", field="/intent", value=str(intent)
        )
    units = body.get("purchase_units")
    if not isinstance(units, list) or not units:
        raise PayPalError(400, "MISSING_REQUIRED_PARAMETER", "A required field is missing.", field="/purchase_units")
    if len(units) > 10:
        raise PayPalError(400, "INVALID_ARRAY_MAX_ITEMS", field="/purchase_units")
    out_units: list[dict[str, Any]] = []
    refs: set[str] = set()
    for i, pu in enumerate(units):
        if not isinstance(pu, dict):
            raise PayPalError(400, "INVALID_PARAMETER_SYNTAX", field=f"/purchase_units/{i}")
        ref = str(pu.get("reference_id", "default"))
        path = f"/purchase_units/@reference_id=='{ref}'/amount"
        if ref in refs:
            raise PayPalError(422, "DUPLICATE_REFERENCE_ID", field=f"/purchase_units/{i}/reference_id")
        refs.add(ref)
        money = _money(pu.get("amount"), path)
        assert money is not None
        for name, limit in (("description", 127), ("custom_id", 127), ("invoice_id", 127), ("soft_descriptor", 22)):
            if name in pu and len(str(pu[name])) > limit:
                raise PayPalError(400, "INVALID_STRING_LENGTH", field=f"/purchase_units/{i}/{name}")
        unit = {k: v for k, v in pu.items() if k != "payments"}
        unit["reference_id"] = ref
        unit["amount"] = dict(pu["amount"])
        unit["payee"] = {"email_address": "merchant@example.com", "merchant_id": "FAKEMERCHANT01"}
        out_units.append(unit)
    source = body.get("payment_source")
    if source is not None and rid is None:
        raise PayPalError(
            400,
            "PAYPAL_REQUEST_ID_REQUIRED",
            "A PayPal-Request-Id is required if you are trying to process payment for an Order.",
            field="PayPal-Request-Id",
            location="header",
        )
    if _declined(source):
        raise PayPalError(
            422,
            "INSTRUMENT_DECLINED",
            "The instrument presented was either declined by the processor or bank, "
            "or it can't be used for this payment.",
        )
    if source is None:
        await side_effect_point(request)
    oid = new_id("", 17, _UPPER)
    now = _now()
    order: dict[str, Any] = {
        "id": oid,
        "intent": intent,
        "status": "CREATED",
        "purchase_units": out_units,
        "create_time": now,
        "update_time": now,
    }
    if source is not None:
        order["payment_source"] = _source_view(source)
    state.orders[oid] = order
    _record(request, "order.created", oid, rid, intent=intent, amount=out_units[0]["amount"])
    if source is not None:
        await _complete(request, order, rid)
    return 201, _order_view(state, oid, prefer), lambda: _order_view(state, oid, prefer)


@endpoint
async def show_order(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``GET /v2/checkout/orders/{id}``."""
    state = request.app[PAYPAL_STATE]
    oid = request.match_info["id"]
    _get_order(state, oid)
    return 200, _order_view(state, oid), None


@endpoint
async def capture_order(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/checkout/orders/{id}/capture``."""
    state = request.app[PAYPAL_STATE]
    oid = request.match_info["id"]
    order = _get_order(state, oid)
    _approval_check(state, order, body, "capture")
    if isinstance(body, dict) and body.get("payment_source"):
        order["payment_source"] = _source_view(body["payment_source"])
    await _complete(request, order, rid)
    return 201, _order_view(state, oid), lambda: _order_view(state, oid)


@endpoint
async def authorize_order(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/checkout/orders/{id}/authorize``."""
    state = request.app[PAYPAL_STATE]
    oid = request.match_info["id"]
    order = _get_order(state, oid)
    _approval_check(state, order, body, "authorize")
    if isinstance(body, dict) and body.get("payment_source"):
        order["payment_source"] = _source_view(body["payment_source"])
    await _complete(request, order, rid)
    return 201, _order_view(state, oid), lambda: _order_view(state, oid)


@endpoint
async def capture_authorization(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/payments/authorizations/{id}/capture``."""
    state = request.app[PAYPAL_STATE]
    auth = _get_payment(state.authorizations, request.match_info["id"])
    if auth["status"] != "CREATED":
        raise PayPalError(
            422, "AUTHORIZATION_ALREADY_CAPTURED" if auth["status"] == "CAPTURED" else "AUTHORIZATION_VOIDED"
        )
    code = auth["amount"]["currency_code"]
    money = _money(body.get("amount") if isinstance(body, dict) else None, "/amount", required=False)
    if money is not None:
        if money[0] != code:
            raise PayPalError(422, "CURRENCY_MISMATCH", field="/amount/currency_code")
        if money[1] > Decimal(auth["amount"]["value"]):
            raise PayPalError(422, "MAX_CAPTURE_AMOUNT_EXCEEDED", field="/amount/value")
    await side_effect_point(request)
    order = state.orders[state.owner[auth["id"]]]
    pu = order["purchase_units"][0]
    value = _fmt(money[1], code) if money else auth["amount"]["value"]
    cid = _new_payment(state, "captures", order, {**pu, "amount": {"currency_code": code, "value": value}}, "COMPLETED")
    pu.setdefault("payments", {}).setdefault("captures", [])
    if cid not in pu["payments"]["captures"]:
        pu["payments"]["captures"].append(cid)
    auth["status"] = "CAPTURED"
    auth["update_time"] = _now()
    _record(request, "authorization.captured", cid, rid, authorization_id=auth["id"], amount=value, currency=code)
    _emit_capture(request, cid, order["id"], authorization_id=auth["id"])
    return 201, dict(state.captures[cid]), lambda: dict(state.captures[cid])


@endpoint
async def void_authorization(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/payments/authorizations/{id}/void``."""
    state = request.app[PAYPAL_STATE]
    auth = _get_payment(state.authorizations, request.match_info["id"])
    if auth["status"] != "CREATED":
        raise PayPalError(422, "PREVIOUSLY_VOIDED" if auth["status"] == "VOIDED" else "PREVIOUSLY_CAPTURED")
    await side_effect_point(request)
    auth["status"] = "VOIDED"
    auth["update_time"] = _now()
    _record(request, "authorization.voided", auth["id"], rid)
    return 200, dict(auth), lambda: dict(auth)


@endpoint
async def refund_capture(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v2/payments/captures/{id}/refund``."""
    state = request.app[PAYPAL_STATE]
    cap = _get_payment(state.captures, request.match_info["id"])
    code = cap["amount"]["currency_code"]
    captured = Decimal(cap["amount"]["value"])
    refunded = sum(
        (Decimal(r["amount"]["value"]) for r in state.refunds.values() if r.get("_capture") == cap["id"]),
        Decimal(0),
    )
    remaining = captured - refunded
    if cap["status"] not in ("COMPLETED", "PARTIALLY_REFUNDED") or remaining <= 0:
        raise PayPalError(
            422,
            "CAPTURE_FULLY_REFUNDED" if cap["status"] == "REFUNDED" else "REFUND_NOT_ALLOWED",
            "The capture has already been fully refunded."
            if cap["status"] == "REFUNDED"
            else "Refund cannot be issued for this capture.",
        )
    if body is not None and not isinstance(body, dict):
        raise PayPalError(400, "MALFORMED_REQUEST_JSON")
    body = body or {}
    amount_in = body.get("amount")
    if amount_in is not None and isinstance(amount_in, dict) and amount_in.get("currency_code") not in (None, code):
        raise PayPalError(
            422,
            "REFUND_CAPTURE_CURRENCY_MISMATCH",
            "Refund must be in the same currency as the capture.",
            field="/amount/currency_code",
        )
    money = _money(amount_in, "/amount", required=False)
    amount = money[1] if money else remaining
    if amount > remaining:
        raise PayPalError(
            422,
            "REFUND_AMOUNT_EXCEEDED",
            "The refund amount must be less than or equal to the capture amount that has not yet been refunded.",
            field="/amount/value",
        )
    note = body.get("note_to_payer")
    if note is not None and len(str(note)) > 255:
        raise PayPalError(400, "INVALID_STRING_LENGTH", field="/note_to_payer")
    await side_effect_point(request)
    ref_id = new_id("", 17, _UPPER)
    now = _now()
    refund: dict[str, Any] = {
        "id": ref_id,
        "status": "COMPLETED",
        "amount": {"currency_code": code, "value": _fmt(amount, code)},
        "seller_payable_breakdown": {
            "gross_amount": {"currency_code": code, "value": _fmt(amount, code)},
            "net_amount": {"currency_code": code, "value": _fmt(amount, code)},
            "total_refunded_amount": {"currency_code": code, "value": _fmt(refunded + amount, code)},
        },
        "create_time": now,
        "update_time": now,
        "links": [
            {"href": f"{BASE}/v2/payments/refunds/{ref_id}", "rel": "self", "method": "GET"},
            {"href": f"{BASE}/v2/payments/captures/{cap['id']}", "rel": "up", "method": "GET"},
        ],
        "_capture": cap["id"],
    }
    for k in ("invoice_id", "custom_id", "note_to_payer"):
        if k in body:
            refund[k] = body[k]
    state.refunds[ref_id] = refund
    cap["status"] = "REFUNDED" if refunded + amount >= captured else "PARTIALLY_REFUNDED"
    cap["update_time"] = now
    order = state.orders.get(state.owner.get(cap["id"], ""))
    if order is not None:
        order["purchase_units"][0].setdefault("payments", {}).setdefault("refunds", []).append(ref_id)
    state.owner[ref_id] = state.owner.get(cap["id"], "")
    _record(request, "refund.created", ref_id, rid, capture_id=cap["id"], amount=_fmt(amount, code), currency=code)

    def view() -> dict[str, Any]:
        return {k: v for k, v in state.refunds[ref_id].items() if not k.startswith("_")}

    return 201, view(), view


@endpoint
async def show_authorization(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``GET /v2/payments/authorizations/{id}``."""
    obj = _get_payment(request.app[PAYPAL_STATE].authorizations, request.match_info["id"])
    return 200, {k: v for k, v in obj.items() if not k.startswith("_")}, None


@endpoint
async def show_capture(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``GET /v2/payments/captures/{id}``."""
    obj = _get_payment(request.app[PAYPAL_STATE].captures, request.match_info["id"])
    return 200, {k: v for k, v in obj.items() if not k.startswith("_")}, None


@endpoint
async def show_refund(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``GET /v2/payments/refunds/{id}``."""
    obj = _get_payment(request.app[PAYPAL_STATE].refunds, request.match_info["id"])
    return 200, {k: v for k, v in obj.items() if not k.startswith("_")}, None


@endpoint
async def verify_webhook_signature(request: web.Request, body: Any, rid: str | None, prefer: str) -> Result:
    """``POST /v1/notifications/verify-webhook-signature``: did this fake sign that event?"""
    if not isinstance(body, dict):
        raise PayPalError(400, "MALFORMED_REQUEST_JSON", "The request JSON is not well formed.")
    for name in (*VERIFY_FIELDS, "webhook_event"):
        if not body.get(name):
            raise PayPalError(
                400,
                "MISSING_REQUIRED_PARAMETER",
                "A required field is missing.",
                field=f"/{name}",
                name="VALIDATION_ERROR",
            )
    ok = request.app[PAYPAL_WEBHOOKS].check(body)
    return 200, {"verification_status": "SUCCESS" if ok else "FAILURE"}, None
