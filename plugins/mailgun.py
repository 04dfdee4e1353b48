"""Mailgun v3 messages: error shapes (providers.md 5). Mailgun has no idempotency key."""

from __future__ import annotations

from plugins.base import ErrorAnswer, ProviderPlugin, json_bytes


class MailgunPlugin(ProviderPlugin):
    name = "mailgun"

    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        return ErrorAnswer(status, json_bytes({"message": f"egressd: {message}", "code": code}))
