"""PayPal REST (Orders v2, Payments v2): error shapes and retry-safety facts (providers.md 2)."""

from __future__ import annotations

from typing import ClassVar

from plugins.base import ErrorAnswer, ProviderPlugin, json_bytes

_NAME_BY_STATUS = {
    400: "INVALID_REQUEST",
    404: "RESOURCE_NOT_FOUND",
    413: "INVALID_REQUEST",
    422: "UNPROCESSABLE_ENTITY",
    429: "RATE_LIMIT_REACHED",
    502: "SERVICE_UNAVAILABLE",
    503: "SERVICE_UNAVAILABLE",
    504: "SERVICE_UNAVAILABLE",
}


class PayPalPlugin(ProviderPlugin):
    name = "paypal"
    # PayPal deduplicates POSTs that carry PayPal-Request-Id (providers.md 2.6).
    idempotency_header: ClassVar[str | None] = "PayPal-Request-Id"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {
            "name": _NAME_BY_STATUS.get(status, "INTERNAL_SERVER_ERROR"),
            "message": f"egressd: {message}",
            "debug_id": request_id.replace("-", "")[:13] or "egressd",
            "details": [{"issue": code.upper(), "description": message}],
        }
        return ErrorAnswer(status, json_bytes(body))
