"""Structured logs: one line per proxied call (the access log) plus operational lines.

Secrets never reach a log line: query values of secret-looking keys are replaced, and
the call's headers are never logged at all.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from proxy.events import CallFinished, Event

ACCESS = logging.getLogger("egressd.access")
_SECRET_KEY = re.compile(r"(key|token|secret|pass|auth|sig|signature|credential|session|code)", re.I)
_CARDLIKE = re.compile(r"\b(?:\d[ -]?){13,19}\b")
_STD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None)).keys()) | {"message", "asctime"}


def redact_query(query: str) -> str:
    """Keep query keys, hide the values of secret-looking ones and anything card-like."""
    if not query:
        return ""
    parts = []
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if sep and (_SECRET_KEY.search(key) or _CARDLIKE.search(value)):
            value = "REDACTED"
        parts.append(key + sep + value)
    return "&".join(parts)


def redact_text(text: str) -> str:
    return _CARDLIKE.sub("[REDACTED-NUMBER]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = " ".join(
            f"{k}={v}"
            for k, v in vars(record).items()
            if k not in _STD_ATTRS and not k.startswith("_") and v is not None
        )
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
        line = base + record.getMessage() + (" " + extra if extra else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(fmt: str = "json", level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("egressd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class AccessLog:
    """Writes the per-call line (contract section 6) from `CallFinished` events."""

    def __call__(self, event: Event) -> None:
        if not isinstance(event, CallFinished) or not ACCESS.isEnabledFor(logging.INFO):
            return
        path, _, query = event.path.partition("?")
        ACCESS.info(
            "call",
            extra={
                "request_id": event.request_id,
                "upstream": event.upstream,
                "route": event.route,
                "method": event.method,
                "path": path + ("?" + redact_query(query) if query else ""),
                "status": event.status,
                "outcome": event.outcome,
                "attempts": event.attempts,
                "duration_ms": round(event.duration * 1000, 3),
                "cache": event.cache,
                "failover": event.failover,
                "error_code": event.error_code,
                "detail": event.detail,
            },
        )
