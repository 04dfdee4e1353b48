"""SendGrid v3 Mail Send: error shapes (providers.md 4). SendGrid has no idempotency key."""

from __future__ import annotations

from plugins.base import ErrorAnswer, ProviderPlugin, json_bytes


class SendGridPlugin(ProviderPlugin):
    name = "sendgrid"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {"errors": [{"message": f"egressd: {message}", "field": None, "help": None, "code": code}]}
        return ErrorAnswer(status, json_bytes(body))
