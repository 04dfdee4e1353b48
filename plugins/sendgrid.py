"""SendGrid v3 Mail Send: error shapes and failover to Mailgun (providers.md 4, 6.1-6.2).
SendGrid has no idempotency key."""

from __future__ import annotations

from plugins import mail_sendgrid_to_mailgun
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, json_bytes


class SendGridPlugin(ProviderPlugin):
    name = "sendgrid"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {"errors": [{"message": f"egressd: {message}", "field": None, "help": None, "code": code}]}
        return ErrorAnswer(status, json_bytes(body))

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        if target.name == "mailgun":
            return mail_sendgrid_to_mailgun.translate
        return None
