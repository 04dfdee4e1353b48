"""Stripe (API v1): error shapes, retry-safety facts, object ids and failover to PayPal
(providers.md sections 1 and 6.5-6.6)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from plugins import pay_stripe_to_paypal, webhooks_stripe
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, WireAnswer, WireRequest, json_bytes
from plugins.webhooks import InboundEvent, Verdict, WebhookSecrets

_OWN_ID = re.compile(r"^(pi|ch|re|pm|cus|py)_[A-Za-z0-9]+$")


class StripePlugin(ProviderPlugin):
    name = "stripe"
    # Stripe deduplicates every POST by Idempotency-Key (providers.md 1.8).
    idempotency_header: ClassVar[str | None] = "Idempotency-Key"
    # A connected account and a pinned API version each get their own answers.
    vary_headers: ClassVar[tuple[str, ...]] = ("Stripe-Account", "Stripe-Version")

    def not_processed(self, status: int, headers: Mapping[str, str]) -> bool:
        # 429 (rate limited, incl. lock_timeout) is never processed.
        return status == 429

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        # The SDK picks the exception class from the status; `type` must be a known one
        # (sdk-clients.md 1, "Errors"). Never a bare string under "error".
        if code == "idempotency_mismatch":
            # Stripe's own answer to a key reused with other parameters: 400 with
            # `type: idempotency_error`, which the SDK raises as `stripe.IdempotencyError`
            # (providers.md 1.8); egressd's generic 422 would surface as a plain APIError.
            body = {"error": {"type": "idempotency_error", "message": f"egressd: {message}"}}
            return ErrorAnswer(400, json_bytes(body))
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

    # -- objects -------------------------------------------------------------------------
    def references(self, request: WireRequest) -> tuple[str, ...]:
        return pay_stripe_to_paypal.references(request)

    def owns_id(self, object_id: str) -> bool:
        return bool(_OWN_ID.match(object_id)) and "_ppf_" not in object_id

    # -- failover ------------------------------------------------------------------------
    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        if target.name == "paypal":
            return pay_stripe_to_paypal.translate
        return None

    def ambiguity_probe(self, request: WireRequest) -> WireRequest | None:
        # Stripe replays the stored result of a key it has seen, and executes the request
        # if it has not: resending with the same Idempotency-Key gives an authoritative
        # answer either way (providers.md 1.8).
        if request.method == "POST" and any(k.lower() == "idempotency-key" and v for k, v in request.headers.items()):
            return request
        return None

    def probe_verdict(self, answer: WireAnswer) -> str:
        if answer.status < 500 and answer.status not in (409, 429):
            return "processed"
        return "unknown"

    # -- inbound webhooks (plugins/webhooks_stripe.py) -----------------------------------
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secrets: WebhookSecrets, now: float, tolerance: float
    ) -> Verdict:
        return webhooks_stripe.verify(body, headers, secrets.secret, now, tolerance)

    def webhook_events(self, body: bytes, headers: Mapping[str, str]) -> list[InboundEvent]:
        return webhooks_stripe.events(body)

    def sign_webhook(self, body: bytes, secrets: WebhookSecrets, now: float) -> dict[str, str] | None:
        return webhooks_stripe.sign(body, secrets, now)

    # translate_event: none (Stripe events are not turned into PayPal's; webhooks_paypal.py says why).
