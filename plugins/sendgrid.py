"""SendGrid v3 Mail Send: error shapes and failover to Mailgun (providers.md 4, 6.1-6.2).
SendGrid has no idempotency key."""

from __future__ import annotations

from collections.abc import Mapping

from plugins import mail_outbox, mail_sendgrid_to_mailgun, webhooks_sendgrid
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, WireAnswer, WireRequest, json_bytes
from plugins.webhooks import InboundEvent, LedgerLookup, TranslatedEvent, Verdict, WebhookSecrets


class SendGridPlugin(ProviderPlugin):
    name = "sendgrid"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {"errors": [{"message": f"egressd: {message}", "field": None, "help": None, "code": code}]}
        return ErrorAnswer(status, json_bytes(body))

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        if target.name == "mailgun":
            return mail_sendgrid_to_mailgun.translate
        return None

    # -- outbox: plugins/mail_outbox.py ------------------------------------------------------
    def outbox_accepts(self, method: str, path: str) -> bool:
        return method == "POST" and path.rstrip("/") == "/v3/mail/send"

    def outbox_accepted(self, outbox_id: str, request: WireRequest) -> WireAnswer:
        return mail_outbox.sendgrid_accepted(outbox_id)

    def outbox_tag(self, request: WireRequest, outbox_id: str) -> WireRequest:
        return mail_outbox.sendgrid_tag(request, outbox_id)

    def outbox_message_id(self, answer: WireAnswer) -> str:
        return mail_outbox.sendgrid_message_id(answer)

    def outbox_probe(self, request: WireRequest, outbox_id: str) -> WireRequest | None:
        return mail_outbox.sendgrid_probe(request, outbox_id)

    def outbox_probe_verdict(self, answer: WireAnswer) -> tuple[str, str]:
        return mail_outbox.sendgrid_probe_verdict(answer)

    # -- inbound webhooks (plugins/webhooks_sendgrid.py) ---------------------------------
    def verify_webhook(
        self, body: bytes, headers: Mapping[str, str], secrets: WebhookSecrets, now: float, tolerance: float
    ) -> Verdict:
        return webhooks_sendgrid.verify(body, headers, secrets.public_key, now, tolerance)

    def webhook_events(self, body: bytes, headers: Mapping[str, str]) -> list[InboundEvent]:
        return webhooks_sendgrid.events(body)

    def sign_webhook(self, body: bytes, secrets: WebhookSecrets, now: float) -> dict[str, str] | None:
        """Signed with egressd's `signing_key` (the app verifies with its public key);
        None without one."""
        return webhooks_sendgrid.sign(body, secrets.signing_key, now)

    def translate_event(self, event: InboundEvent, lookup: LedgerLookup, *, target: str) -> TranslatedEvent | None:
        if target == "mailgun":
            return webhooks_sendgrid.to_mailgun(event, lookup)
        return None
