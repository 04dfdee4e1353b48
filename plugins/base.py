"""The provider plugin interface.

A plugin knows one provider's wire shapes. Everything here is a pure function over
data: no I/O, no globals, no clock. Plugins are found through the entry-point group
`egressd.plugins` (see `plugins.registry`), so a third party can add a provider by
shipping a package; nothing in egressd needs to change.

Issue-2 scope: error shaping and retry-safety facts. Translation hooks for failover
(`translate_request`, `translate_response`) live on the same class.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """A proxy-made answer in the provider's own error shape."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class ProviderPlugin:
    """Base class: the behaviour of a plain JSON API (the `generic` provider)."""

    name: ClassVar[str] = "generic"
    #: The request header this provider deduplicates on, if any (retry safety for POST).
    idempotency_header: ClassVar[str | None] = None

    def __init__(self, settings: Mapping[str, Any] | None = None) -> None:
        self.settings: Mapping[str, Any] = dict(settings or {})

    # -- retry safety --------------------------------------------------------------------
    def honours_idempotency(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """True when this request carries a key the provider deduplicates on."""
        header = self.idempotency_header
        return header is not None and bool(headers.get(header))

    def not_processed(self, status: int, headers: Mapping[str, str]) -> bool:
        """True when this answer proves the request never reached the provider's application.

        429 means "rejected before processing" for every provider we know.
        """
        return status == 429

    # -- proxy-made errors ---------------------------------------------------------------
    def error_answer(self, code: str, status: int, message: str, *, request_id: str) -> ErrorAnswer:
        body = {"error": {"type": "egressd_error", "code": code, "message": message}}
        return ErrorAnswer(status, json_bytes(body))


class GenericPlugin(ProviderPlugin):
    name = "generic"
