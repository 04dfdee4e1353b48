"""Small builders for provider-shaped answers, shared by the translators."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from plugins.base import FailoverContext, Refused, WireAnswer, json_bytes

JSON = {"Content-Type": "application/json"}


def json_answer(status: int, body: Any, headers: Mapping[str, str] | None = None) -> WireAnswer:
    return WireAnswer(status, {**JSON, **(headers or {})}, json_bytes(body))


def token(seed: str, length: int = 17, *, upper: bool = True) -> str:
    """A deterministic id fragment from `seed` (base-32 upper case: PayPal's id alphabet)."""
    digest = hashlib.sha256(seed.encode()).digest()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567" if upper else "abcdefghijklmnopqrstuvwxyz234567"
    out = []
    n = int.from_bytes(digest, "big")
    for _ in range(length):
        n, r = divmod(n, 32)
        out.append(alphabet[r])
    return "".join(out)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unix(text: Any, default: float = 0.0) -> int:
    if not isinstance(text, str):
        return int(default)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return int(default)


# ---- Stripe ------------------------------------------------------------------------------


def stripe_error(
    status: int,
    kind: str,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    request_id: str = "",
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> WireAnswer:
    err: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        err["code"] = code
    if param is not None:
        err["param"] = param
    err.update({k: v for k, v in extra.items() if v is not None})
    hdrs = dict(headers or {})
    if request_id:
        hdrs["Request-Id"] = request_id
    return json_answer(status, {"error": err}, hdrs)


def stripe_request_id(seed: str) -> str:
    return "req_ppf_" + token(seed, 14, upper=False)


# ---- PayPal ------------------------------------------------------------------------------

PAYPAL_NAMES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILURE",
    403: "NOT_AUTHORIZED",
    404: "RESOURCE_NOT_FOUND",
    409: "RESOURCE_CONFLICT",
    413: "INVALID_REQUEST",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "UNPROCESSABLE_ENTITY",
    429: "RATE_LIMIT_REACHED",
    500: "INTERNAL_SERVER_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


def paypal_error(
    status: int,
    message: str,
    *,
    issue: str | None = None,
    description: str | None = None,
    field: str | None = None,
    debug_id: str = "",
    name: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> WireAnswer:
    body: dict[str, Any] = {
        "name": name or PAYPAL_NAMES.get(status, "INTERNAL_SERVER_ERROR"),
        "message": message,
        "debug_id": debug_id or "egressd",
    }
    if issue is not None:
        detail: dict[str, Any] = {"issue": issue, "description": description or message}
        if field is not None:
            detail["field"] = field
            detail["location"] = "body"
        body["details"] = [detail]
    return json_answer(status, body, headers)


def ledger_record(ctx: FailoverContext, object_id: str, field: str = "id") -> Mapping[str, Any]:
    """The routing-ledger record of an object created on the fallback (raises Refused
    `not_failed_over` when the object lives on the primary). `field` is where the app
    put the id (`intent`, `payment_intent`, `capture_id`...): the name the app is told,
    never the id itself."""
    record = ctx.records.get(object_id)
    if record is None:
        raise Refused("not_failed_over", f"{object_id} lives on {ctx.source}, not on {ctx.target}", names=(field,))
    return record


# A path segment kept as is in an operation's name: a word (`payment_intents`,
# `mail`), maybe with a version digit (`v1`, `oauth2`). Anything else (ids, domains,
# tokens) becomes `{id}`, so a refusal never names a value from the path.
_PATH_WORD = re.compile(r"^[a-z]+(?:[_-][a-z]+)*[0-9]?$")


def operation(method: str, path: str, *, placeholders: Mapping[int, str] | None = None) -> str:
    """`POST /v1/customers/cus_123/sources` -> `POST /v1/customers/{id}/sources`: an
    operation with no equivalent, named without its ids (`placeholders` names given
    segment positions, e.g. Mailgun's `{domain}`)."""
    segments = path.split("?", 1)[0].split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        if placeholders and i in placeholders:
            out.append("{" + placeholders[i] + "}")
        elif not seg or (_PATH_WORD.match(seg) and len(seg) <= 40):
            out.append(seg)
        else:
            out.append("{id}")
    return f"{method.upper()} {'/'.join(out)}"
