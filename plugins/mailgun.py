"""Mailgun v3 messages: error shapes and failover to SendGrid (providers.md 5, 6.3-6.4).
Mailgun has no idempotency key. Settings: `domain` (the sending domain used when mail
fails over to this upstream)."""

from __future__ import annotations

from collections.abc import Mapping

from plugins import mail_mailgun_to_sendgrid, mail_outbox, webhooks_mailgun
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, WireAnswer, WireRequest, json_bytes
from plugins.webhooks import InboundEvent, LedgerLookup, SignedDelivery, TranslatedEvent, Verdict, WebhookSecrets


class MailgunPlugin(ProviderPlugin):
    name = "mailgun"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        return ErrorAnswer(status, json_bytes({"message": f"egressd: {message}", "code": code}))

    def fallback_problems(self) -> tuple[str, ...]:
        # Failed-over mail goes to /v3/{domain}/messages (mail_sendgrid_to_mailgun); without
        # a domain every failover would be refused (`fallback_misconfigured`).
        if self.settings.get("domain"):
            return ()
        return (
            "has no provider.domain: failed-over mail is sent to /v3/DOMAIN/messages, so egressd "
            "needs Mailgun's sending domain; write provider: {name: mailgun, domain: mg.example.com}",
        )

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        if target.name == "sendgrid":
            return mail_mailgun_to_sendgrid.translate
        return None

    # -- outbox: plugins/mail_outbox.py ------------------------------------------------------
    def outbox_accepts(self, method: str, path: str) -> bool:
        return method == "POST" and bool(mail_outbox.mailgun_domain(path))

    def outbox_accepted(self, outbox_id: str, request: WireRequest) -> WireAnswer:
        return mail_outbox.mailgun_accepted(outbox_id, request)

    def outbox_tag(self, request: WireRequest, outbox_id: str) -> WireRequest:
        return mail_outbox.mailgun_tag(request, outbox_id)

    def outbox_message_id(self, answer: WireAnswer) -> str:
        return mail_outbox.mailgun_message_id(answer)

    def outbox_probe(self, request: WireRequest, outbox_id: str) -> WireRequest | None:
        return mail_outbox.mailgun_probe(request, outbox_id)

    def outbox_probe_verdict(self, answer: WireAnswer) -> tuple[str, str]:
        return mail_outbox.mailgun_probe_verdict(answer)

    # -- inbound webhooks (plugins/webhooks_mailgun.py) ----------------------------------
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secrets: WebhookSecrets, now: float, tolerance: float
    ) -> Verdict:
        return webhooks_mailgun.verify(body, secrets.secret, now, tolerance)

    def webhook_events(self, body: bytes, headers: Mapping[str, str]) -> list[InboundEvent]:
        return webhooks_mailgun.events(body)

    # sign_webhook: None, the signature is not a header. signed_delivery rewrites it in the body.

    def signed_delivery(self, body: bytes, secrets: WebhookSecrets, now: float) -> SignedDelivery | None:
        """The body with only its `signature` object replaced (fresh timestamp, token and
        HMAC); None without the key or without exactly one `signature` member."""
        return webhooks_mailgun.resign(body, secrets.secret, now)

    def translate_event(self, event: InboundEvent, lookup: LedgerLookup, *, target: str) -> TranslatedEvent | None:
        if target == "sendgrid":
            return webhooks_mailgun.to_sendgrid(event, lookup)
        return None
