"""PayPal REST (Orders v2, Payments v2): error shapes, retry-safety facts, object ids and
failover to Stripe (providers.md sections 2 and 6.6-6.7)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from plugins import pay_paypal_to_stripe, webhooks_paypal
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, WireRequest, json_bytes
from plugins.webhooks import InboundEvent, LedgerLookup, TranslatedEvent, Verdict, WebhookSecrets

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
    # A partner acting for a merchant gets that merchant's answers.
    vary_headers: ClassVar[tuple[str, ...]] = ("PayPal-Partner-Attribution-Id",)
    # The SDK's own token call (HTTP Basic with the app's client id and secret) passes
    # through untouched even when the upstream has `auth: oauth_client_credentials`.
    app_auth_paths: ClassVar[tuple[str, ...]] = ("/v1/oauth2/token",)

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {
            "name": _NAME_BY_STATUS.get(status, "INTERNAL_SERVER_ERROR"),
            "message": f"egressd: {message}",
            "debug_id": request_id.replace("-", "")[:13] or "egressd",
            "details": [{"issue": code.upper(), "description": message}],
        }
        return ErrorAnswer(status, json_bytes(body))

    def references(self, request: WireRequest) -> tuple[str, ...]:
        return pay_paypal_to_stripe.references(request)

    def owns_id(self, object_id: str) -> bool:
        return object_id.isalnum() and object_id.isupper() and not object_id.startswith(pay_paypal_to_stripe.PREFIX)

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        if target.name == "stripe":
            return pay_paypal_to_stripe.translate
        return None

    # -- inbound webhooks (plugins/webhooks_paypal.py) -----------------------------------
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secrets: WebhookSecrets, now: float, tolerance: float
    ) -> Verdict:
        """Local checks, then a `Verdict.remote`: PayPal's verify-webhook-signature call."""
        return webhooks_paypal.verify(body, headers, secrets.webhook_id, now, tolerance)

    def remote_verdict(self, status: int, body: bytes) -> Verdict:
        return webhooks_paypal.verification_verdict(status, body)

    def webhook_events(self, body: bytes, headers: Mapping[str, str]) -> list[InboundEvent]:
        return webhooks_paypal.events(body)

    # sign_webhook: None (PayPal's certificate scheme; the app verifies with PayPal).

    def translate_event(self, event: InboundEvent, lookup: LedgerLookup, *, target: str) -> TranslatedEvent | None:
        if target == "stripe":
            return webhooks_paypal.to_stripe(event, lookup)
        return None
