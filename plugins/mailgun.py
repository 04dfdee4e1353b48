"""Mailgun v3 messages: error shapes and failover to SendGrid (providers.md 5, 6.3-6.4).
Mailgun has no idempotency key. Settings: `domain` (the sending domain used when mail
fails over to this upstream)."""

from __future__ import annotations

from plugins import mail_mailgun_to_sendgrid
from plugins.base import ErrorAnswer, ProviderPlugin, Translator, json_bytes


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
