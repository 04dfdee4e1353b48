"""Stripe-shaped calls answered by PayPal (providers.md 6.5, 6.6).

Supported: PaymentIntent create with `confirm=true` (order create, then capture or
authorize when PayPal did not complete it in one step), and on payments created this way
(synthetic ids `pi_ppf_<order>`, `ch_ppf_<capture|authorization>`, `re_ppf_<refund>`):
retrieve, capture, cancel, refund create and refund retrieve.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from plugins.base import FailoverContext, Refused, Translated, TranslatorRun, WireAnswer, WireRequest, json_bytes
from plugins.forms import parse_stripe_form
from plugins.money import minor_from_paypal, stripe_to_paypal
from plugins.shapes import json_answer, ledger_record, operation, stripe_error, stripe_request_id, token, unix

PI_PREFIX = "pi_ppf_"
CH_PREFIX = "ch_ppf_"
RE_PREFIX = "re_ppf_"

# Present => the call cannot fail over at all (no PayPal equivalent, money would move differently).
HARD_UNMAPPABLE = ("application_fee_amount", "on_behalf_of", "transfer_data", "transfer_group", "receipt_email")
# Handled by the mapping below.
MAPPED = frozenset(
    "amount currency payment_method confirm customer description metadata capture_method confirmation_method "
    "off_session error_on_requires_action shipping statement_descriptor statement_descriptor_suffix "
    "payment_method_types".split()
)
REFUND_UNMAPPABLE = ("refund_application_fee", "reverse_transfer", "instructions_email", "origin")
REFUND_MAPPED = frozenset("payment_intent charge amount reason metadata currency".split())
DECLINE_ISSUES = frozenset(
    {
        "INSTRUMENT_DECLINED",
        "TRANSACTION_REFUSED",
        "PAYER_CANNOT_PAY",
        "PAYMENT_SOURCE_DECLINED_BY_PROCESSOR",
        "PAYMENT_SOURCE_CANNOT_BE_USED",
        "MAX_NUMBER_OF_PAYMENT_ATTEMPTS_EXCEEDED",
        "PAYMENT_DENIED",
    }
)
_PI_PATH = re.compile(r"^/v1/payment_intents/([A-Za-z0-9_]+)(?:/(capture|cancel|confirm))?$")
_RE_PATH = re.compile(r"^/v1/refunds/([A-Za-z0-9_]+)$")


def references(request: WireRequest) -> tuple[str, ...]:
    """Synthetic ids a Stripe-shaped request acts on."""
    path = request.path.rstrip("/")
    ids: list[str] = []
    m = _PI_PATH.match(path) or _RE_PATH.match(path)
    if m:
        ids.append(m.group(1))
    if request.method == "POST" and path == "/v1/refunds":
        params = parse_stripe_form(request.body.decode("utf-8", "replace"))
        for name in ("payment_intent", "charge"):
            value = params.get(name)
            if isinstance(value, str):
                ids.append(value)
    return tuple(i for i in ids if i.startswith((PI_PREFIX, CH_PREFIX, RE_PREFIX)))


def translate(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    path = request.path.rstrip("/")
    method = request.method.upper()
    if method == "POST" and path == "/v1/payment_intents":
        return (yield from _create(request, ctx))
    if method == "POST" and path == "/v1/refunds":
        return (yield from _refund(request, ctx))
    m = _PI_PATH.match(path)
    if m:
        record = ledger_record(ctx, m.group(1), "intent")
        action = m.group(2)
        if method == "GET" and action is None:
            expand = expansions(parse_stripe_form(request.query) if request.query else {}, ctx)
            return (yield from _retrieve(record, ctx, expand))
        if method == "POST" and action == "capture":
            return (yield from _capture(request, record, ctx))
        if method == "POST" and action == "cancel":
            return (yield from _cancel(record, ctx, expansions(_params(request), ctx)))
    m = _RE_PATH.match(path)
    if m and method == "GET":
        return (yield from _retrieve_refund(ledger_record(ctx, m.group(1), "refund"), ctx))
    raise Refused(
        "unsupported_operation", f"{method} {path} has no PayPal equivalent", names=(operation(method, path),)
    )


def _params(request: WireRequest) -> dict[str, Any]:
    return parse_stripe_form(request.body.decode("utf-8", "replace")) if request.body else {}


def _paypal_headers(ctx: FailoverContext, step: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "Prefer": "return=representation",
        "PayPal-Request-Id": ctx.derived_key(step),
    }


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")


# ---- expand[] ------------------------------------------------------------------------------
#
# `expand[]` only shapes the answer: the PaymentIntent carries an object where it would
# carry an id. The app's code then reads `pi.latest_charge.status`, so dropping it would
# hand the SDK a string where the code reads an object. What the translation can build
# from PayPal's answer is honoured; anything else stays a lossy refusal (`detail=expand`).

EXPANDABLE = ("latest_charge", "payment_method")
CARD_BRANDS = {
    "VISA": "visa",
    "MASTERCARD": "mastercard",
    "MASTER_CARD": "mastercard",
    "AMEX": "amex",
    "DISCOVER": "discover",
    "JCB": "jcb",
    "DINERS": "diners",
    "CHINA_UNION_PAY": "unionpay",
    "UNIONPAY": "unionpay",
}
CARD_FUNDING = {"CREDIT": "credit", "DEBIT": "debit", "PREPAID": "prepaid"}


def _expand_list(params: Mapping[str, Any]) -> list[str]:
    raw = params.get("expand")
    if raw is None:
        return []
    items = raw if isinstance(raw, list) else list(raw.values()) if isinstance(raw, Mapping) else [raw]
    return [str(x) for x in items]


def unbuilt_expansions(params: Mapping[str, Any]) -> list[str]:
    """The `expand[]` paths the translation cannot build (e.g. `customer`,
    `latest_charge.balance_transaction`)."""
    return [x for x in _expand_list(params) if x not in EXPANDABLE]


def expansions(params: Mapping[str, Any], ctx: FailoverContext) -> frozenset[str]:
    """The `expand[]` paths to honour (raises Refused `lossy` naming `expand` when one
    cannot be built, unless the policy allows lossy failover)."""
    unbuilt = unbuilt_expansions(params)
    if unbuilt and not ctx.allow_lossy:
        raise Refused(
            "lossy", f"expand ({', '.join(unbuilt)}: cannot be built from PayPal's answer)", names=("expand",)
        )
    return frozenset(x for x in _expand_list(params) if x in EXPANDABLE)


def expand_pi(
    pi: dict[str, Any], order: Mapping[str, Any], record: Mapping[str, Any], expand: frozenset[str]
) -> dict[str, Any]:
    """The PaymentIntent with the requested ids replaced by objects built from the order."""
    out = dict(pi)
    if "latest_charge" in expand and isinstance(pi.get("latest_charge"), str):
        out["latest_charge"] = charge_object(order, record, pi)
    if "payment_method" in expand and isinstance(pi.get("payment_method"), str):
        out["payment_method"] = payment_method_object(order, record, pi)
    return out


def _source(order: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    source = order.get("payment_source")
    if isinstance(source, Mapping):
        for kind in ("card", "paypal"):
            sub = source.get(kind)
            if isinstance(sub, Mapping):
                return kind, sub
    return "card", {}


def _card_details(card: Mapping[str, Any]) -> dict[str, Any]:
    """Stripe `card` fields from PayPal's `payment_source.card` (null where PayPal did not say)."""
    exp_year = exp_month = None
    expiry = card.get("expiry")
    if isinstance(expiry, str) and re.match(r"^\d{4}-\d{2}$", expiry):
        exp_year, exp_month = int(expiry[:4]), int(expiry[5:])
    last4 = card.get("last_digits")
    return {
        "brand": CARD_BRANDS.get(str(card.get("brand") or "").upper(), "unknown"),
        "country": None,
        "exp_month": exp_month,
        "exp_year": exp_year,
        "funding": CARD_FUNDING.get(str(card.get("type") or "").upper(), "unknown"),
        "last4": str(last4)[-4:] if last4 else None,
    }


def payment_method_object(order: Mapping[str, Any], record: Mapping[str, Any], pi: Mapping[str, Any]) -> dict[str, Any]:
    """A PaymentMethod for the crosswalked `pm_...`, from what PayPal said about the source."""
    kind, sub = _source(order)
    out: dict[str, Any] = {
        "id": pi.get("payment_method"),
        "object": "payment_method",
        "billing_details": {"address": None, "email": None, "name": sub.get("name"), "phone": None},
        "created": record.get("created"),
        "customer": record.get("customer"),
        "livemode": bool(record.get("livemode")),
        "metadata": {},
        "type": kind,
    }
    if kind == "paypal":
        out["paypal"] = {"payer_email": sub.get("email_address"), "payer_id": sub.get("account_id")}
    else:
        out["card"] = _card_details(sub)
    return out


def charge_object(order: Mapping[str, Any], record: Mapping[str, Any], pi: Mapping[str, Any]) -> dict[str, Any]:
    """The Charge behind `latest_charge`: PayPal's last capture (or authorization)."""
    units = order.get("purchase_units") or [{}]
    payments = units[0].get("payments") or {}
    caps = payments.get("captures") or []
    auths = payments.get("authorizations") or []
    currency = str(pi.get("currency") or "usd")
    payment: Mapping[str, Any] = caps[-1] if caps else auths[-1] if auths else {}
    state = str(payment.get("status") or "")
    amount = minor_from_paypal(str((payment.get("amount") or {}).get("value", "0")), currency)
    if caps:
        status = "pending" if state == "PENDING" else "succeeded" if state in _CAPTURED else "failed"
        captured = status == "succeeded"
    else:
        status = "pending" if state == "PENDING" else "failed" if state in ("DENIED", "EXPIRED") else "succeeded"
        captured = state in ("CAPTURED", "PARTIALLY_CAPTURED")
    refunded = sum(
        minor_from_paypal(str((r.get("amount") or {}).get("value", "0")), currency)
        for r in payments.get("refunds") or []
        if isinstance(r, Mapping) and r.get("status") == "COMPLETED"
    )
    if state == "REFUNDED" and not refunded:
        refunded = amount
    kind, sub = _source(order)
    details: dict[str, Any] = {"type": kind}
    details[kind] = (
        _card_details(sub)
        if kind == "card"
        else {"payer_email": sub.get("email_address"), "payer_id": sub.get("account_id")}
    )
    failed = status == "failed"
    return {
        "id": pi.get("latest_charge"),
        "object": "charge",
        "amount": pi.get("amount"),
        "amount_captured": amount if captured else 0,
        "amount_refunded": refunded,
        "balance_transaction": None,
        "captured": captured,
        "created": unix(payment.get("create_time"), float(pi.get("created") or 0)),
        "currency": currency,
        "customer": pi.get("customer"),
        "description": pi.get("description"),
        "failure_code": "card_declined" if failed else None,
        "failure_message": "Your card was declined." if failed else None,
        "livemode": bool(pi.get("livemode")),
        "metadata": dict(pi.get("metadata") or {}),
        "paid": status == "succeeded",
        "payment_intent": pi.get("id"),
        "payment_method": record.get("payment_method"),
        "payment_method_details": details,
        "refunded": state == "REFUNDED",
        "shipping": pi.get("shipping"),
        "status": status,
    }


_CAPTURED = ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED")


# ---- create --------------------------------------------------------------------------------


def build_order_request(
    params: Mapping[str, Any], ctx: FailoverContext, request_headers: Mapping[str, str]
) -> dict[str, Any]:
    """Stripe PaymentIntent create params -> PayPal order body (raises Refused)."""
    for name in HARD_UNMAPPABLE:
        if params.get(name) not in (None, ""):
            raise Refused("unmappable_field", name, names=(name,))
    if any(k.lower() == "stripe-account" for k in request_headers):
        raise Refused("unmappable_field", "Stripe-Account (Connect)", names=("Stripe-Account",))
    if not _truthy(params.get("confirm")):
        raise Refused(
            "unsupported_operation", "only create-and-confirm (confirm=true) can fail over", names=("confirm",)
        )
    pm = params.get("payment_method")
    if not isinstance(pm, str) or not pm:
        raise Refused("no_crosswalk_entry", "no payment_method", names=("payment_method",))
    vault = ctx.payment_methods.get(pm)
    if not vault:
        raise Refused(
            "no_crosswalk_entry",
            f"payment_method {pm} has no PayPal vault id in the crosswalk",
            names=("payment_method",),
        )
    try:
        amount = int(str(params.get("amount")))
    except ValueError:
        raise Refused("amount_not_representable", "amount is not an integer", names=("amount",)) from None
    currency = str(params.get("currency") or "")
    code, value = stripe_to_paypal(amount, currency)

    # `lossy`: the names the app is told; `notes`: the same with why, for the log.
    lossy = sorted(k for k in params if k not in MAPPED and k not in HARD_UNMAPPABLE and k != "expand")
    notes = list(lossy)
    unbuilt = unbuilt_expansions(params)
    if unbuilt:
        lossy.append("expand")
        notes.append(f"expand ({', '.join(unbuilt)}: cannot be built from PayPal's answer)")
    pm_types = params.get("payment_method_types")
    if pm_types not in (None, ["card"]):
        lossy.append("payment_method_types")
        notes.append("payment_method_types (other than card)")
    description = params.get("description")
    if isinstance(description, str) and len(description) > 127:
        lossy.append("description")
        notes.append("description (over 127 characters)")
    descriptor_name = (
        "statement_descriptor_suffix" if params.get("statement_descriptor_suffix") else "statement_descriptor"
    )
    descriptor = params.get(descriptor_name)
    if isinstance(descriptor, str) and len(descriptor) > 22:
        lossy.append(descriptor_name)
        notes.append(f"{descriptor_name} (over 22 characters)")
    if lossy and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(notes), names=lossy)

    manual = params.get("capture_method") == "manual"
    unit: dict[str, Any] = {
        "reference_id": "default",
        "amount": {"currency_code": code, "value": value},
        "custom_id": ctx.derived_key("pi", length=40)[:40],
    }
    if isinstance(description, str) and description:
        unit["description"] = description[:127]
    if isinstance(descriptor, str) and descriptor:
        unit["soft_descriptor"] = descriptor[:22]
    shipping = params.get("shipping")
    if isinstance(shipping, Mapping):
        unit["shipping"] = _shipping_to_paypal(shipping)
    source: dict[str, Any]
    if vault.startswith("paypal:"):
        source = {"paypal": {"vault_id": vault[len("paypal:") :]}}
    else:
        card: dict[str, Any] = {"vault_id": vault.removeprefix("card:")}
        off = params.get("off_session")
        if off not in (None, "false", False):
            card["stored_credential"] = {
                "payment_initiator": "MERCHANT",
                "payment_type": "RECURRING" if off == "recurring" else "UNSCHEDULED",
                "usage": "SUBSEQUENT",
            }
        source = {"card": card}
    return {"intent": "AUTHORIZE" if manual else "CAPTURE", "purchase_units": [unit], "payment_source": source}


def _shipping_to_paypal(shipping: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if shipping.get("name"):
        out["name"] = {"full_name": str(shipping["name"])}
    addr = shipping.get("address")
    if isinstance(addr, Mapping):
        names = {
            "line1": "address_line_1",
            "line2": "address_line_2",
            "city": "admin_area_2",
            "state": "admin_area_1",
            "postal_code": "postal_code",
            "country": "country_code",
        }
        out["address"] = {pp: str(addr[st]) for st, pp in names.items() if addr.get(st)}
    return out


def _shipping_from_paypal(shipping: Any) -> dict[str, Any] | None:
    if not isinstance(shipping, Mapping):
        return None
    addr = shipping.get("address") or {}
    return {
        "name": (shipping.get("name") or {}).get("full_name"),
        "address": {
            "line1": addr.get("address_line_1"),
            "line2": addr.get("address_line_2"),
            "city": addr.get("admin_area_2"),
            "state": addr.get("admin_area_1"),
            "postal_code": addr.get("postal_code"),
            "country": addr.get("country_code"),
        },
    }


def _create(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    params = _params(request)
    order_body = build_order_request(params, ctx, request.headers)
    expand = expansions(params, ctx)
    manual = order_body["intent"] == "AUTHORIZE"
    answer = yield WireRequest(
        "POST", "/v2/checkout/orders", "", _paypal_headers(ctx, "create"), json_bytes(order_body)
    )
    replayed = answer.status == 200
    record = _new_record(params, ctx)
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx, pi=_declined_pi(record, ctx)))
    order = answer.json() or {}
    if order.get("status") in ("CREATED", "APPROVED", "SAVED"):
        step = "authorize" if manual else "capture"
        answer = yield WireRequest(
            "POST", f"/v2/checkout/orders/{order.get('id')}/{step}", "", _paypal_headers(ctx, step), b"{}"
        )
        if answer.error or answer.status >= 300:
            record = {**record, "order_id": order.get("id")}
            return Translated(_error(answer, ctx, pi=_declined_pi(record, ctx, order)))
        order = answer.json() or {}
    return _finish_pi(order, record, ctx, params=params, replayed=replayed, expand=expand)


def _new_record(params: Mapping[str, Any], ctx: FailoverContext) -> dict[str, Any]:
    metadata = params.get("metadata")
    return {
        "kind": "payment_intent",
        "owner": ctx.target,
        "amount": int(str(params.get("amount"))),
        "currency": str(params.get("currency")).lower(),
        "capture_method": params.get("capture_method") or "automatic",
        "confirmation_method": params.get("confirmation_method") or "automatic",
        "description": params.get("description"),
        "metadata": dict(metadata) if isinstance(metadata, Mapping) else {},
        "customer": params.get("customer"),
        "payment_method": params.get("payment_method"),
        "shipping": params.get("shipping") if isinstance(params.get("shipping"), Mapping) else None,
        "statement_descriptor": params.get("statement_descriptor"),
        "statement_descriptor_suffix": params.get("statement_descriptor_suffix"),
        "created": int(ctx.now),
        "livemode": ctx.live,
    }


def _finish_pi(
    order: Mapping[str, Any],
    record: dict[str, Any],
    ctx: FailoverContext,
    *,
    params: Mapping[str, Any],
    replayed: bool = False,
    expand: frozenset[str] = frozenset(),
) -> Translated:
    record = _with_payment_ids(record, order)
    pi = payment_intent(order, record)
    headers = {"Request-Id": stripe_request_id(ctx.request_id + "create")}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    ledger = _ledger_entries(record)
    if pi["status"] == "requires_payment_method":
        error = dict(pi.get("last_payment_error") or {})
        msg = str(error.get("message") or "Your card was declined.")
        return Translated(
            stripe_error(
                402,
                "card_error",
                msg,
                code=error.get("code", "card_declined"),
                decline_code=error.get("decline_code", "generic_decline"),
                payment_intent=pi,
                charge=pi.get("latest_charge"),
                headers=headers,
            ),
            ledger,
        )
    if pi["status"] == "requires_action" and _truthy(params.get("error_on_requires_action")):
        return Translated(
            stripe_error(
                402,
                "card_error",
                "Your card was declined. This transaction requires authentication.",
                code="authentication_required",
                decline_code="authentication_required",
                payment_intent={**pi, "status": "requires_payment_method"},
                headers=headers,
            ),
            ledger,
        )
    return Translated(json_answer(200, expand_pi(pi, order, record, expand), headers), ledger)


def _with_payment_ids(record: Mapping[str, Any], order: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(record)
    out["order_id"] = order.get("id") or record.get("order_id")
    if order.get("create_time"):
        out["created"] = unix(order.get("create_time"), out.get("created", 0))
    units = order.get("purchase_units") or [{}]
    payments = units[0].get("payments") or {}
    caps = payments.get("captures") or []
    auths = payments.get("authorizations") or []
    if caps:
        out["capture_id"] = caps[-1].get("id")
    if auths:
        out["authorization_id"] = auths[-1].get("id")
    return out


def _ledger_entries(record: Mapping[str, Any]) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    if not record.get("order_id"):
        return ()
    entries: list[tuple[str, Mapping[str, Any]]] = [(PI_PREFIX + str(record["order_id"]), record)]
    for key in ("capture_id", "authorization_id"):
        if record.get(key):
            entries.append((CH_PREFIX + str(record[key]), record))
    return tuple(entries)


def payment_intent(order: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    """A PaymentIntent built from a PayPal order and the stored request (6.5 reply table)."""
    units = order.get("purchase_units") or [{}]
    payments = units[0].get("payments") or {}
    caps = payments.get("captures") or []
    auths = payments.get("authorizations") or []
    currency = str(record.get("currency", "usd"))
    status = "requires_confirmation"
    next_action = None
    last_error = None
    received = sum(
        minor_from_paypal(str(c.get("amount", {}).get("value", "0")), currency)
        for c in caps
        if c.get("status") in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED")
    )
    capturable = 0
    latest = None
    order_status = order.get("status")
    if order_status == "PAYER_ACTION_REQUIRED":
        status = "requires_action"
        link = next((x.get("href") for x in order.get("links") or [] if x.get("rel") == "payer-action"), None)
        next_action = {"type": "redirect_to_url", "redirect_to_url": {"url": link, "return_url": None}}
    elif order_status == "VOIDED":
        status = "canceled"
    elif caps:
        cap = caps[-1]
        latest = CH_PREFIX + str(cap.get("id"))
        cs = cap.get("status")
        if cs in ("COMPLETED", "PARTIALLY_REFUNDED", "REFUNDED"):
            status = "succeeded"
        elif cs == "PENDING":
            status = "processing"
        else:
            status = "requires_payment_method"
            last_error = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
                "message": "Your card was declined.",
            }
    elif auths:
        auth = auths[-1]
        latest = CH_PREFIX + str(auth.get("id"))
        auth_status = auth.get("status")
        if auth_status == "CREATED":
            status = "requires_capture"
            capturable = minor_from_paypal(str(auth.get("amount", {}).get("value", "0")), currency)
        elif auth_status == "PENDING":
            status = "processing"
        elif auth_status in ("CAPTURED", "PARTIALLY_CAPTURED"):
            status = "succeeded"
        elif auth_status == "VOIDED":
            status = "canceled"
        else:
            status = "requires_payment_method"
            last_error = {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "generic_decline",
                "message": "Your card was declined.",
            }
    pi_id = PI_PREFIX + str(order.get("id") or record.get("order_id"))
    return {
        "id": pi_id,
        "object": "payment_intent",
        "amount": record.get("amount"),
        "amount_capturable": capturable,
        "amount_received": received,
        "canceled_at": None,
        "cancellation_reason": None,
        "capture_method": record.get("capture_method", "automatic"),
        "client_secret": None,
        "confirmation_method": record.get("confirmation_method", "automatic"),
        "created": record.get("created"),
        "currency": currency,
        "customer": record.get("customer"),
        "description": record.get("description"),
        "last_payment_error": last_error,
        "latest_charge": latest,
        "livemode": bool(record.get("livemode")),
        "metadata": dict(record.get("metadata") or {}),
        "next_action": next_action,
        "payment_method": record.get("payment_method") if status != "requires_payment_method" else None,
        "payment_method_types": ["card"],
        "receipt_email": None,
        "shipping": record.get("shipping"),
        "statement_descriptor": record.get("statement_descriptor"),
        "statement_descriptor_suffix": record.get("statement_descriptor_suffix"),
        "status": status,
    }


def _declined_pi(
    record: Mapping[str, Any], ctx: FailoverContext, order: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    oid = record.get("order_id") or ("D" + token(ctx.derived_key("declined")))
    pi = payment_intent(order or {"id": oid, "status": "CREATED"}, {**record, "order_id": oid})
    pi["status"] = "requires_payment_method"
    pi["payment_method"] = None
    return pi


# ---- follow-ups ------------------------------------------------------------------------------


def _retrieve(record: Mapping[str, Any], ctx: FailoverContext, expand: frozenset[str] = frozenset()) -> TranslatorRun:
    answer = yield WireRequest("GET", f"/v2/checkout/orders/{record['order_id']}", "", {"Accept": "application/json"})
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx, param="intent"))
    order = answer.json() or {}
    record = _with_payment_ids(record, order)
    pi = expand_pi(payment_intent(order, record), order, record, expand)
    return Translated(
        json_answer(200, pi, {"Request-Id": stripe_request_id(ctx.request_id)}),
        _ledger_entries(record),
    )


def _capture(request: WireRequest, record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    auth_id = record.get("authorization_id")
    if not auth_id or record.get("capture_method") != "manual":
        return Translated(
            stripe_error(
                400,
                "invalid_request_error",
                "This PaymentIntent could not be captured because it is not awaiting capture.",
                code="payment_intent_unexpected_state",
            )
        )
    params = _params(request)
    body: dict[str, Any] = {"final_capture": True}
    if params.get("amount_to_capture") not in (None, ""):
        try:
            code, value = stripe_to_paypal(int(str(params["amount_to_capture"])), str(record["currency"]))
        except ValueError:
            raise Refused("amount_not_representable", "not an integer", names=("amount_to_capture",)) from None
        except Refused as refused:
            raise refused.renamed({"amount": "amount_to_capture"}) from None
        body["amount"] = {"currency_code": code, "value": value}
    expand = expansions(params, ctx)
    extra = sorted(k for k in params if k not in ("amount_to_capture", "expand"))
    if extra and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(extra), names=extra)
    answer = yield WireRequest(
        "POST", f"/v2/payments/authorizations/{auth_id}/capture", "", _paypal_headers(ctx, "capture"), json_bytes(body)
    )
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx))
    return (yield from _retrieve(record, ctx, expand))


def _cancel(record: Mapping[str, Any], ctx: FailoverContext, expand: frozenset[str] = frozenset()) -> TranslatorRun:
    auth_id = record.get("authorization_id")
    if not auth_id:
        return Translated(
            stripe_error(
                400,
                "invalid_request_error",
                "You cannot cancel this PaymentIntent because it has a status of succeeded.",
                code="payment_intent_unexpected_state",
            )
        )
    answer = yield WireRequest(
        "POST", f"/v2/payments/authorizations/{auth_id}/void", "", _paypal_headers(ctx, "void"), b""
    )
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx))
    translated = yield from _retrieve(record, ctx, expand)
    return translated


def _refund(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    params = _params(request)
    for name in REFUND_UNMAPPABLE:
        if params.get(name) not in (None, ""):
            raise Refused("unmappable_field", name, names=(name,))
    field = "payment_intent" if params.get("payment_intent") else "charge"
    target = params.get(field)
    if not isinstance(target, str):
        raise Refused("not_failed_over", "refund names no payment_intent or charge", names=("payment_intent", "charge"))
    record = ledger_record(ctx, target, field)
    extra = sorted(k for k in params if k not in REFUND_MAPPED)
    if extra and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(extra), names=extra)
    capture_id = record.get("capture_id")
    if not capture_id:
        return Translated(
            stripe_error(
                400,
                "invalid_request_error",
                f"This PaymentIntent ({PI_PREFIX}{record.get('order_id')}) has no successful charge to refund.",
                code="charge_not_refundable",
            )
        )
    body: dict[str, Any] = {}
    currency = str(record.get("currency"))
    if params.get("amount") not in (None, ""):
        try:
            amount = int(str(params["amount"]))
        except ValueError:
            return Translated(
                stripe_error(
                    400, "invalid_request_error", "Invalid integer", code="parameter_invalid_integer", param="amount"
                )
            )
        code, value = stripe_to_paypal(amount, currency)
        body["amount"] = {"currency_code": code, "value": value}
    reason = params.get("reason")
    if isinstance(reason, str) and reason:
        body["note_to_payer"] = reason.replace("_", " ")
    answer = yield WireRequest(
        "POST", f"/v2/payments/captures/{capture_id}/refund", "", _paypal_headers(ctx, "refund"), json_bytes(body)
    )
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx, refund=True))
    paypal_refund = answer.json() or {}
    metadata = params.get("metadata")
    ref_record = {
        "kind": "refund",
        "owner": ctx.target,
        "refund_id": paypal_refund.get("id"),
        "payment_intent": PI_PREFIX + str(record.get("order_id")),
        "charge": CH_PREFIX + str(capture_id),
        "currency": currency,
        "reason": reason if isinstance(reason, str) else None,
        "metadata": dict(metadata) if isinstance(metadata, Mapping) else {},
    }
    headers = {"Request-Id": stripe_request_id(ctx.request_id + "refund")}
    if answer.status == 200:
        headers["Idempotent-Replayed"] = "true"
    return Translated(
        json_answer(200, stripe_refund(paypal_refund, ref_record), headers),
        ((RE_PREFIX + str(paypal_refund.get("id")), ref_record),),
    )


REFUND_STATUS = {"COMPLETED": "succeeded", "PENDING": "pending", "FAILED": "failed", "CANCELLED": "canceled"}


def stripe_refund(paypal_refund: Mapping[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
    amount = paypal_refund.get("amount") or {}
    currency = str(record.get("currency") or amount.get("currency_code", "usd")).lower()
    return {
        "id": RE_PREFIX + str(paypal_refund.get("id")),
        "object": "refund",
        "amount": minor_from_paypal(str(amount.get("value", "0")), currency),
        "balance_transaction": None,
        "charge": record.get("charge"),
        "created": unix(paypal_refund.get("create_time")),
        "currency": currency,
        "metadata": dict(record.get("metadata") or {}),
        "payment_intent": record.get("payment_intent"),
        "reason": record.get("reason"),
        "receipt_number": None,
        "status": REFUND_STATUS.get(str(paypal_refund.get("status")), "pending"),
    }


def _retrieve_refund(record: Mapping[str, Any], ctx: FailoverContext) -> TranslatorRun:
    if record.get("kind") != "refund":
        raise Refused("unsupported_operation", "not a refund id", names=("GET /v1/refunds/{refund}",))
    answer = yield WireRequest("GET", f"/v2/payments/refunds/{record['refund_id']}", "", {"Accept": "application/json"})
    if answer.error or answer.status >= 300:
        return Translated(_error(answer, ctx, param="id"))
    return Translated(json_answer(200, stripe_refund(answer.json() or {}, record)))


# ---- errors ----------------------------------------------------------------------------------


def _error(
    answer: WireAnswer,
    ctx: FailoverContext,
    *,
    pi: Mapping[str, Any] | None = None,
    param: str | None = None,
    refund: bool = False,
) -> WireAnswer:
    """A PayPal error answer -> the Stripe error the app's SDK expects (6.5/6.6 tables)."""
    return stripe_error_from_paypal(
        answer, pi=pi, param=param, refund=refund, request_id=stripe_request_id(ctx.request_id)
    )


def stripe_error_from_paypal(
    answer: WireAnswer,
    *,
    pi: Mapping[str, Any] | None = None,
    param: str | None = None,
    refund: bool = False,
    request_id: str = "",
) -> WireAnswer:
    body = answer.json()
    body = body if isinstance(body, Mapping) else {}
    raw_details = body.get("details")
    details: list[Any] = raw_details if isinstance(raw_details, list) else []
    issues = [str(d.get("issue")) for d in details if isinstance(d, Mapping)]
    issue = issues[0] if issues else str(body.get("name") or "")
    debug = body.get("debug_id") or answer.header("Paypal-Debug-Id") or ""
    text = str(body.get("message") or "the fallback provider refused the request")
    message = f"{text} (PayPal {issue or answer.status}; debug_id {debug})" if debug else text
    status = answer.status
    retry = {"Stripe-Should-Retry": "true"}
    if answer.error:
        return stripe_error(
            502 if status < 500 else status,
            "api_error",
            f"failover to PayPal failed: {answer.error}",
            request_id=request_id,
            headers={"Stripe-Should-Retry": "false"},
        )
    if status in (401, 403):
        return stripe_error(
            500, "api_error", "upstream provider configuration error (PayPal credentials)", request_id=request_id
        )
    if status == 429:
        return stripe_error(429, "invalid_request_error", message, code="rate_limit", request_id=request_id)
    if status == 409 or issue in ("ORDER_COMPLETION_IN_PROGRESS", "PREVIOUS_REQUEST_IN_PROGRESS"):
        return stripe_error(
            429, "invalid_request_error", message, code="lock_timeout", request_id=request_id, headers=retry
        )
    if status >= 500:
        return stripe_error(500, "api_error", message, request_id=request_id, headers=retry)
    if status == 404:
        return stripe_error(
            404,
            "invalid_request_error",
            message,
            code="resource_missing",
            param=param or "intent",
            request_id=request_id,
        )
    if issue in DECLINE_ISSUES or issue == "CARD_EXPIRED":
        code = "expired_card" if issue == "CARD_EXPIRED" else "card_declined"
        pi_obj = dict(pi) if pi else None
        if pi_obj is not None:
            pi_obj["last_payment_error"] = {
                "type": "card_error",
                "code": code,
                "message": message,
                "decline_code": "generic_decline" if code == "card_declined" else None,
            }
        return stripe_error(
            402,
            "card_error",
            message,
            code=code,
            decline_code="generic_decline" if code == "card_declined" else None,
            payment_intent=pi_obj,
            request_id=request_id,
        )
    if issue == "PAYER_ACTION_REQUIRED":
        return stripe_error(
            402,
            "card_error",
            message,
            code="authentication_required",
            decline_code="authentication_required",
            payment_intent=pi,
            request_id=request_id,
        )
    if refund:
        refund_codes = {
            "CAPTURE_FULLY_REFUNDED": ("charge_already_refunded", None),
            "REFUND_AMOUNT_EXCEEDED": ("amount_too_large", "amount"),
            "TRANSACTION_DISPUTED": ("refund_disputed_payment", None),
            "REFUND_NOT_PERMITTED_DUE_TO_CHARGEBACK": ("refund_disputed_payment", None),
            "PENDING_CAPTURE": ("charge_not_refundable", None),
        }
        if issue in refund_codes:
            code, p = refund_codes[issue]
            return stripe_error(400, "invalid_request_error", message, code=code, param=p, request_id=request_id)
    if issue in ("DECIMAL_PRECISION", "DECIMALS_NOT_SUPPORTED", "MAX_VALUE_EXCEEDED", "CANNOT_BE_ZERO_OR_NEGATIVE"):
        code = "amount_too_large" if issue == "MAX_VALUE_EXCEEDED" else "invalid_charge_amount"
        return stripe_error(400, "invalid_request_error", message, code=code, param="amount", request_id=request_id)
    if issue in ("INVALID_CURRENCY_CODE", "CURRENCY_NOT_SUPPORTED"):
        return stripe_error(400, "invalid_request_error", message, param="currency", request_id=request_id)
    invalid = {"MISSING_REQUIRED_PARAMETER": "parameter_missing", "INVALID_PARAMETER_VALUE": "parameter_invalid_empty"}
    return stripe_error(
        400, "invalid_request_error", message, code=invalid.get(issue), param=param, request_id=request_id
    )
