"""Stripe (API v1): error shapes and retry-safety facts (providers.md section 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from plugins.base import ErrorAnswer, ProviderPlugin, json_bytes


class StripePlugin(ProviderPlugin):
    name = "stripe"
    # Stripe deduplicates every POST by Idempotency-Key (providers.md 1.8).
    idempotency_header: ClassVar[str | None] = "Idempotency-Key"

    def not_processed(self, status: int, headers: Mapping[str, str]) -> bool:
        # 429 (rate limited, incl. lock_timeout) is never processed.
        return status == 429

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        # The SDK picks the exception class from the status; `type` must be a known one
        # (sdk-clients.md 1, "Errors"). Never a bare string under "error".
        if status == 429:
            kind = "rate_limit_error"
        elif 400 <= status < 500:
            kind = "invalid_request_error"
        else:
            kind = "api_error"
        body = {"error": {"type": kind, "code": f"egressd_{code}", "message": f"egressd: {message}"}}
        headers: dict[str, str] = {}
        if status >= 500:
            # The proxy has already retried under its policy; the SDK should not multiply it.
            headers["Stripe-Should-Retry"] = "false"
        return ErrorAnswer(status, json_bytes(body), headers=headers)
