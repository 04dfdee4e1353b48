"""PayPal-shaped calls answered by Stripe (providers.md 6.7, 6.6 reverse).

Supported: single-step order create with a vaulted payment source (`intent=CAPTURE` ->
PaymentIntent confirm with automatic capture, `AUTHORIZE` -> manual capture), and on
orders created this way (synthetic ids `EGF...`): order retrieve, order capture/authorize
(answered from the state: the payment is already complete), authorization capture and
void, capture refund, refund retrieve.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from plugins.base import FailoverContext, Refused, Translated, TranslatorRun, WireAnswer, WireRequest
from plugins.forms import encode_stripe_form
from plugins.money import paypal_to_stripe, paypal_value
from plugins.shapes import json_answer, ledger_record, operation, paypal_error, rfc3339, token

PREFIX = "EGF"
ID_LEN = 20
_ORDER = re.compile(r"^/v2/checkout/orders/([A-Z0-9]+)(?:/(capture|authorize))?$")
_PAYMENT = re.compile(r"^/v2/payments/(captures|authorizations|refunds)/([A-Z0-9]+)(?:/(refund|capture|void))?$")
UNIT_MAPPED = frozenset("reference_id amount description custom_id invoice_id soft_descriptor shipping".split())
UNIT_UNMAPPABLE = ("payee", "payment_instruction")
ORDER_MAPPED = frozenset("intent purchase_units payment_source".split())
# How PayPal's API reference names the id in each payments path (the refusal's names).
PATH_ID_NAMES = {"captures": "capture_id", "authorizations": "authorization_id", "refunds": "refund_id"}


def _to_stripe(amount: Mapping[str, Any], where: str) -> tuple[int, str]:
    """`paypal_to_stripe` of a PayPal amount object; a refusal names `where.value` /
    `where.currency_code` (the app's own fields) instead of `amount` / `currency`."""
    try:
        return paypal_to_stripe(str(amount.get("value")), str(amount.get("currency_code") or ""))
    except Refused as refused:
        raise refused.renamed({"amount": f"{where}.value", "currency": f"{where}.currency_code"}) from None


def synthetic(kind: str, seed: str) -> str:
    """A PayPal-shaped id (`^[A-Z0-9]+$`, 20 characters) for a Stripe object."""
    return PREFIX + kind + token(seed, ID_LEN - len(PREFIX) - 1)


def references(request: WireRequest) -> tuple[str, ...]:
    path = request.path.rstrip("/")
    m = _ORDER.match(path)
    oid = m.group(1) if m else None
    if oid is None:
        p = _PAYMENT.match(path)
        oid = p.group(2) if p else None
    if oid and oid.startswith(PREFIX) and len(oid) == ID_LEN:
        return (oid,)
    return ()


def translate(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    path = request.path.rstrip("/")
    method = request.method.upper()
    if method == "POST" and path == "/v2/checkout/orders":
        return (yield from _create(request, ctx))
    m = _ORDER.match(path)
    if m:
        record = ledger_record(ctx, m.group(1), "id")
        if method == "GET" and m.group(2) is None:
            return (yield from _retrieve(record, ctx, 200))
        if method == "POST" and m.group(2):
            return (yield from _complete_again(record, m.group(2), ctx))
    p = _PAYMENT.match(path)
    if p:
        kind, action = p.group(1), p.group(3)
        record = ledger_record(ctx, p.group(2), PATH_ID_NAMES[kind])
        if kind == "captures" and action == "refund" and method == "POST":
            return (yield from _refund(request, record, ctx))
        if kind == "authorizations" and action == "capture" and method == "POST":
            return (yield from _capture_authorization(request, record, ctx))
        if kind == "authorizations" and action == "void" and method == "POST":
            return (yield from _void(record, ctx))
        if kind == "refunds" and action is None and method == "GET":
            return (yield from _retrieve_refund(record, ctx))
    raise Refused(
        "unsupported_operation", f"{method} {path} has no Stripe equivalent", names=(operation(method, path),)
    )


def _stripe_headers(ctx: FailoverContext, step: str) -> dict[str, str]:
    return {"Content-Type": "application/x-www-form-urlencoded", "Idempotency-Key": ctx.derived_key(step)}


# ---- create ------------------------------------------------------------------------------------


def build_payment_intent_params(body: Any, ctx: FailoverContext) -> dict[str, Any]:
    """PayPal order create body -> Stripe PaymentIntent create params (raises Refused)."""
    if not isinstance(body, Mapping):
        raise Refused("unsupported_operation", "the order body is not a JSON object", names=("body",))
    units = body.get("purchase_units")
    if not isinstance(units, list) or len(units) != 1 or not isinstance(units[0], Mapping):
        raise Refused(
            "multiple_purchase_units", "a Stripe PaymentIntent has exactly one amount", names=("purchase_units",)
        )
    unit: Mapping[str, Any] = units[0]
    for name in UNIT_UNMAPPABLE:
        if name in unit:
            raise Refused("unmappable_field", f"purchase_units[0].{name}", names=(f"purchase_units[0].{name}",))
    source = body.get("payment_source")
    if not isinstance(source, Mapping) or not source:
        raise Refused(
            "buyer_approval_required",
            "an order without a payment_source needs the payer at PayPal",
            names=("payment_source",),
        )
    kind, sub = next(iter(source.items()))
    vault = sub.get("vault_id") if isinstance(sub, Mapping) else None
    if kind not in ("card", "paypal") or not isinstance(vault, str):
        if kind == "card":
            # Never the card's own fields (number, cvv...): only where they were.
            raise Refused("unmappable_field", "payment_source.card with raw card data", names=("payment_source.card",))
        raise Refused(
            "buyer_approval_required",
            f"payment_source.{kind} needs the payer at PayPal",
            names=(f"payment_source.{kind}",),
        )
    pm = ctx.payment_methods.get(vault)
    if not pm:
        raise Refused(
            "no_crosswalk_entry",
            f"vault id {vault} has no Stripe payment method in the crosswalk",
            names=(f"payment_source.{kind}.vault_id",),
        )
    amount_obj = unit.get("amount") if isinstance(unit.get("amount"), Mapping) else {}
    assert isinstance(amount_obj, Mapping)
    amount, currency = _to_stripe(amount_obj, "purchase_units[0].amount")

    lossy = sorted(f"purchase_units[0].{k}" for k in unit if k not in UNIT_MAPPED and k not in UNIT_UNMAPPABLE)
    lossy += [f"purchase_units[0].amount.{k}" for k in amount_obj if k not in ("currency_code", "value")]
    lossy += sorted(k for k in body if k not in ORDER_MAPPED)
    if lossy and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(lossy), names=lossy)

    params: dict[str, Any] = {
        "amount": amount,
        "currency": currency,
        "confirm": True,
        "capture_method": "manual" if body.get("intent") == "AUTHORIZE" else "automatic",
    }
    if ":" in pm:
        customer, _, pm = pm.partition(":")
        params["customer"] = customer
    params["payment_method"] = pm
    if unit.get("description"):
        params["description"] = str(unit["description"])
    metadata = {
        f"paypal_{k}": str(unit[k])
        for k in ("custom_id", "invoice_id", "reference_id")
        if unit.get(k) not in (None, "", "default")
    }
    if metadata:
        params["metadata"] = metadata
    if unit.get("soft_descriptor"):
        params["statement_descriptor_suffix"] = str(unit["soft_descriptor"])[:22]
    shipping = unit.get("shipping")
    if isinstance(shipping, Mapping):
        addr = shipping.get("address") or {}
        params["shipping"] = {
            "name": (shipping.get("name") or {}).get("full_name") or "",
            "address": {
                k: v
                for k, v in {
                    "line1": addr.get("address_line_1"),
                    "line2": addr.get("address_line_2"),
                    "city": addr.get("admin_area_2"),
                    "state": addr.get("admin_area_1"),
                    "postal_code": addr.get("postal_code"),
                    "country": addr.get("country_code"),
                }.items()
                if v
            },
        }
    if isinstance(sub, Mapping):
        stored = sub.get("stored_credential")
        if isinstance(stored, Mapping) and stored.get("payment_initiator") == "MERCHANT":
            params["off_session"] = True
        exp = sub.get("experience_context")
        if isinstance(exp, Mapping) and exp.get("return_url"):
            params["return_url"] = str(exp["return_url"])
    params["expand"] = ["latest_charge"]
    return params


def _create(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    body = request.json() if request.body else None
    params = build_payment_intent_params(body, ctx)
    assert isinstance(body, Mapping)
    unit = dict(body["purchase_units"][0])
    answer = yield WireRequest(
        "POST", "/v1/payment_intents", "", _stripe_headers(ctx, "create"), encode_stripe_form(params)
    )
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    pi = answer.json() or {}
    record = {
        "kind": "order",
        "owner": ctx.target,
        "pi": pi.get("id"),
        "intent": body.get("intent", "CAPTURE"),
        "unit": unit,
        "payment_source": _source_view(body.get("payment_source")),
    }
    replayed = (answer.header("Idempotent-Replayed") or "").lower() == "true"
    return _order_reply(pi, record, 200 if replayed else 201)


def _source_view(source: Any) -> dict[str, Any]:
    if not isinstance(source, Mapping):
        return {}
    return {k: {"vault_id": v.get("vault_id")} for k, v in source.items() if isinstance(v, Mapping)}


def _charge(pi: Mapping[str, Any]) -> Mapping[str, Any]:
    ch = pi.get("latest_charge")
    return ch if isinstance(ch, Mapping) else {"id": ch}


def order_from_pi(pi: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A PayPal order built from a Stripe PaymentIntent (6.7 reply table)."""
    pi_id = str(pi.get("id"))
    oid = synthetic("O", pi_id)
    currency = str(pi.get("currency", "usd"))
    code = currency.upper()
    unit = dict(record.get("unit") or {})
    unit.setdefault("reference_id", "default")
    unit["amount"] = {"currency_code": code, "value": paypal_value(int(pi.get("amount") or 0), code)}
    created = rfc3339(float(pi.get("created") or 0))
    status = str(pi.get("status"))
    charge = _charge(pi)
    links = [{"href": f"/v2/checkout/orders/{oid}", "rel": "self", "method": "GET"}]
    payments: dict[str, Any] = {}
    order_status = "APPROVED"
    manual = pi.get("capture_method") == "manual"

    def capture(cap_status: str, amount: int) -> dict[str, Any]:
        refunded = int(charge.get("amount_refunded") or 0)
        if cap_status == "COMPLETED" and refunded:
            cap_status = "REFUNDED" if refunded >= amount else "PARTIALLY_REFUNDED"
        cid = synthetic("C", pi_id)
        out = {
            "id": cid,
            "status": cap_status,
            "amount": {"currency_code": code, "value": paypal_value(amount, code)},
            "final_capture": True,
            "create_time": created,
            "update_time": created,
            "links": [
                {"href": f"/v2/payments/captures/{cid}", "rel": "self", "method": "GET"},
                {"href": f"/v2/payments/captures/{cid}/refund", "rel": "refund", "method": "POST"},
            ],
        }
        for k in ("custom_id", "invoice_id"):
            if unit.get(k):
                out[k] = unit[k]
        return out

    def authorization(auth_status: str) -> dict[str, Any]:
        aid = synthetic("A", pi_id)
        return {
            "id": aid,
            "status": auth_status,
            "amount": {"currency_code": code, "value": paypal_value(int(pi.get("amount") or 0), code)},
            "create_time": created,
            "update_time": created,
            "links": [
                {"href": f"/v2/payments/authorizations/{aid}", "rel": "self", "method": "GET"},
                {"href": f"/v2/payments/authorizations/{aid}/capture", "rel": "capture", "method": "POST"},
                {"href": f"/v2/payments/authorizations/{aid}/void", "rel": "void", "method": "POST"},
            ],
        }

    if status == "succeeded":
        order_status = "COMPLETED"
        received = int(pi.get("amount_received") or pi.get("amount") or 0)
        payments["captures"] = [capture("COMPLETED", received)]
        if manual:
            payments["authorizations"] = [authorization("CAPTURED")]
    elif status == "processing":
        order_status = "COMPLETED"
        if manual:
            payments["authorizations"] = [authorization("PENDING")]
        else:
            payments["captures"] = [capture("PENDING", int(pi.get("amount") or 0))]
    elif status == "requires_capture":
        order_status = "COMPLETED"
        payments["authorizations"] = [authorization("CREATED")]
    elif status == "requires_action":
        order_status = "PAYER_ACTION_REQUIRED"
        nxt = pi.get("next_action") or {}
        url = (nxt.get("redirect_to_url") or {}).get("url") if isinstance(nxt, Mapping) else None
        if url:
            links.append({"href": url, "rel": "payer-action", "method": "GET"})
    elif status == "canceled":
        order_status = "VOIDED"
        if manual:
            payments["authorizations"] = [authorization("VOIDED")]
    if payments:
        unit["payments"] = payments
    order = {
        "id": oid,
        "intent": record.get("intent", "CAPTURE"),
        "status": order_status,
        "purchase_units": [unit],
        "create_time": created,
        "update_time": created,
        "links": links,
    }
    if record.get("payment_source"):
        order["payment_source"] = record["payment_source"]
    return order


def _order_reply(pi: Mapping[str, Any], record: Mapping[str, Any], status: int) -> Translated:
    if pi.get("status") == "requires_payment_method":
        return Translated(
            paypal_error(
                422,
                "The requested action could not be performed, semantically incorrect, or failed business validation.",
                issue="INSTRUMENT_DECLINED",
                description="The instrument presented was declined.",
            )
        )
    order = order_from_pi(pi, record)
    pi_id = str(pi.get("id"))
    ledger: list[tuple[str, Mapping[str, Any]]] = [(order["id"], record)]
    for letter in ("C", "A"):
        ledger.append((synthetic(letter, pi_id), record))
    return Translated(json_answer(status, order), tuple(ledger))


# ---- follow-ups --------------------------------------------------------------------------------


def _get_pi(record: Mapping[str, Any]) -> WireRequest:
    return WireRequest("GET", f"/v1/payment_intents/{record['pi']}", "expand[0]=latest_charge", {})


def _retrieve(record: Mapping[str, Any], ctx: FailoverContext, status: int) -> TranslatorRun:
    if record.get("kind") != "order":
        raise Refused("unsupported_operation", "not an order id", names=("GET /v2/checkout/orders/{id}",))
    answer = yield _get_pi(record)
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    return Translated(json_answer(status, order_from_pi(answer.json() or {}, record)))


def _complete_again(record: Mapping[str, Any], action: str, ctx: FailoverContext) -> TranslatorRun:
    answer = yield _get_pi(record)
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    pi = answer.json() or {}
    if pi.get("status") in ("succeeded", "requires_capture", "processing"):
        issue = "ORDER_ALREADY_CAPTURED" if action == "capture" else "ORDER_ALREADY_AUTHORIZED"
        return Translated(
            paypal_error(
                422, "The requested action could not be performed.", issue=issue, description="Order already completed."
            )
        )
    return Translated(json_answer(200, order_from_pi(pi, record)))


def _capture_authorization(request: WireRequest, record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    body = request.json() if request.body else {}
    params: dict[str, Any] = {"expand": ["latest_charge"]}
    if isinstance(body, Mapping) and isinstance(body.get("amount"), Mapping):
        amount, _cur = _to_stripe(body["amount"], "amount")
        params["amount_to_capture"] = amount
    answer = yield WireRequest(
        "POST",
        f"/v1/payment_intents/{record['pi']}/capture",
        "",
        _stripe_headers(ctx, "capture"),
        encode_stripe_form(params),
    )
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    order = order_from_pi(answer.json() or {}, record)
    caps = order["purchase_units"][0].get("payments", {}).get("captures") or [{}]
    return Translated(json_answer(201, caps[0]))


def _void(record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    answer = yield WireRequest(
        "POST", f"/v1/payment_intents/{record['pi']}/cancel", "", _stripe_headers(ctx, "void"), b""
    )
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    order = order_from_pi(answer.json() or {}, record)
    auths = order["purchase_units"][0].get("payments", {}).get("authorizations") or [{}]
    return Translated(json_answer(200, auths[0]))


REFUND_STATUS = {
    "succeeded": "COMPLETED",
    "pending": "PENDING",
    "requires_action": "PENDING",
    "failed": "FAILED",
    "canceled": "CANCELLED",
}


def paypal_refund(refund: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    code = str(refund.get("currency", "usd")).upper()
    rid = synthetic("R", str(refund.get("id")))
    created = rfc3339(float(refund.get("created") or 0))
    out: dict[str, Any] = {
        "id": rid,
        "status": REFUND_STATUS.get(str(refund.get("status")), "PENDING"),
        "amount": {"currency_code": code, "value": paypal_value(int(refund.get("amount") or 0), code)},
        "create_time": created,
        "update_time": created,
        "links": [{"href": f"/v2/payments/refunds/{rid}", "rel": "self", "method": "GET"}],
    }
    for k in ("note_to_payer", "custom_id", "invoice_id"):
        if record.get(k):
            out[k] = record[k]
    return out


def _refund(request: WireRequest, record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    body = request.json() if request.body else {}
    body = body if isinstance(body, Mapping) else {}
    lossy = sorted(k for k in body if k not in ("amount", "note_to_payer", "custom_id", "invoice_id"))
    if lossy and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(lossy), names=lossy)
    params: dict[str, Any] = {"payment_intent": record["pi"]}
    if isinstance(body.get("amount"), Mapping):
        amount, _cur = _to_stripe(body["amount"], "amount")
        params["amount"] = amount
    metadata = {f"paypal_{k}": str(body[k]) for k in ("note_to_payer", "custom_id", "invoice_id") if body.get(k)}
    if metadata:
        params["metadata"] = metadata
    answer = yield WireRequest("POST", "/v1/refunds", "", _stripe_headers(ctx, "refund"), encode_stripe_form(params))
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer, refund=True))
    refund = answer.json() or {}
    ref_record = {
        "kind": "refund",
        "owner": ctx.target,
        "re": refund.get("id"),
        **{k: str(body[k]) for k in ("note_to_payer", "custom_id", "invoice_id") if body.get(k)},
    }
    reply = paypal_refund(refund, ref_record)
    replayed = (answer.header("Idempotent-Replayed") or "").lower() == "true"
    return Translated(json_answer(200 if replayed else 201, reply), ((reply["id"], ref_record),))


def _retrieve_refund(record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    if record.get("kind") != "refund":
        raise Refused("unsupported_operation", "not a refund id", names=("GET /v2/payments/refunds/{refund_id}",))
    answer = yield WireRequest("GET", f"/v1/refunds/{record['re']}", "", {})
    if answer.error or answer.status >= 300:
        return Translated(paypal_error_from_stripe(answer))
    return Translated(json_answer(200, paypal_refund(answer.json() or {}, record)))


# ---- errors ------------------------------------------------------------------------------------


def paypal_error_from_stripe(answer: WireAnswer, *, refund: bool = False) -> WireAnswer:
    """A Stripe error answer -> the PayPal error the app's SDK expects (6.7 table)."""
    body = answer.json()
    err = body.get("error") if isinstance(body, Mapping) else None
    err = err if isinstance(err, Mapping) else {}
    debug = answer.header("Request-Id") or "egressd"
    message = str(err.get("message") or "The fallback provider refused the request.")
    code = str(err.get("code") or "")
    kind = str(err.get("type") or "")
    status = answer.status
    if answer.error:
        return paypal_error(
            502 if status < 500 else status,
            f"failover to Stripe failed: {answer.error}",
            name="SERVICE_UNAVAILABLE",
            debug_id=debug,
        )
    if status in (401, 403):
        return paypal_error(500, "upstream provider configuration error (Stripe credentials)", debug_id=debug)
    if status == 402:
        issue = {"expired_card": "CARD_EXPIRED", "authentication_required": "PAYER_ACTION_REQUIRED"}.get(
            code, "INSTRUMENT_DECLINED"
        )
        return paypal_error(
            422,
            "The requested action could not be performed, semantically incorrect, or failed business validation.",
            issue=issue,
            description=message,
            debug_id=debug,
        )
    if status == 409 or code in ("lock_timeout", "idempotency_key_in_use"):
        return paypal_error(
            409,
            "A previous request on this resource is in progress.",
            issue="PREVIOUS_REQUEST_IN_PROGRESS",
            description=message,
            debug_id=debug,
        )
    if status == 429:
        return paypal_error(
            429,
            "Too many requests. Blocked due to rate limiting.",
            issue="RATE_LIMIT_REACHED",
            description=message,
            debug_id=debug,
        )
    if status >= 500:
        return paypal_error(500, "An internal server error occurred.", debug_id=debug)
    if status == 404:
        return paypal_error(
            404,
            "The specified resource does not exist.",
            issue="INVALID_RESOURCE_ID",
            description=message,
            debug_id=debug,
        )
    if refund and code == "charge_already_refunded":
        return paypal_error(422, message, issue="CAPTURE_FULLY_REFUNDED", debug_id=debug)
    if refund and code == "amount_too_large":
        return paypal_error(422, message, issue="REFUND_AMOUNT_EXCEEDED", field="/amount/value", debug_id=debug)
    param = str(err.get("param") or "")
    if kind == "idempotency_error":
        return paypal_error(422, message, issue="DUPLICATE_REQUEST_ID", debug_id=debug)
    if param == "amount":
        return paypal_error(
            422, message, issue="DECIMAL_PRECISION", field="/purchase_units/0/amount/value", debug_id=debug
        )
    if param == "currency":
        return paypal_error(
            422, message, issue="INVALID_CURRENCY_CODE", field="/purchase_units/0/amount/currency_code", debug_id=debug
        )
    issue = "MISSING_REQUIRED_PARAMETER" if code == "parameter_missing" else "INVALID_PARAMETER_VALUE"
    return paypal_error(
        400,
        "Request is not well-formed, syntactically incorrect, or violates schema.",
        issue=issue,
        description=message,
        field=f"/{param}" if param else None,
        debug_id=debug,
    )
