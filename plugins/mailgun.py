"""Mailgun v3 messages: error shapes and failover to SendGrid (providers.md 5, 6.3-6.4).
Mailgun has no idempotency key. Settings: `domain` (the sending domain used when mail
fails over to this upstream)."""

from __future__ import annotations

from plugins import mail_mailgun_to_sendgrid, mail_outbox
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, WireAnswer, WireRequest, json_bytes


class MailgunPlugin(ProviderPlugin):
    name = "mailgun"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        return ErrorAnswer(status, json_bytes({"message": f"egressd: {message}", "code": code}))

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
