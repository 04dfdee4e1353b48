"""Structured logs: one line per proxied call (the access log) plus operational lines.

Secrets never reach a log line: query values of secret-looking keys are replaced, and
the call's headers are never logged at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import unquote_plus

from proxy.events import CallFinished, Event

ACCESS = logging.getLogger("egressd.access")
# Query names whose values are never logged (contract 7.4): one of these as the whole name,
# or as its last part after `_`, `-` or `.` (`x_api_key`, `stripe-key`), case-insensitive.
SECRET_NAMES = frozenset(
    ("password", "passwd", "pwd", "secret", "token", "access_token", "api_key", "apikey", "key", "jwt",
     "signature", "sig", "auth", "code")
)  # fmt: skip
# Also any name that merely contains one of these (broader than the contract, on purpose:
# `client_secret_v2`, `sessionid`, `X-Auth-Token`...).
_SECRET_KEY = re.compile(r"(key|token|secret|pass|pwd|jwt|auth|sig|signature|credential|session|code)", re.I)
_NAME_PARTS = re.compile(r"[_.\-]")
# A card-like number: 13 to 19 digits, single spaces, dots or dashes between them allowed,
# also URL-encoded (+, %20). Redacted only when Luhn-valid (ids and timestamps are not).
_CARDLIKE = re.compile(r"(?<![\w.])\d(?:(?:[ +.-]|%20)?\d){12,18}(?![\w])")
_STD_ATTRS = frozenset(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None)).keys()) | {"message", "asctime"}


def secret_name(name: str) -> bool:
    """Whether a query parameter's value must not be logged (contract 7.4, 7.7)."""
    lowered = unquote_plus(name).lower()
    if lowered in SECRET_NAMES or _NAME_PARTS.split(lowered)[-1] in SECRET_NAMES:
        return True
    return _SECRET_KEY.search(lowered) is not None


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D|%20", "", match.group(0).replace("%20", " "))
    if not luhn_valid(digits):
        return match.group(0)
    return "REDACTED-" + digits[-4:]  # at most the last four digits are kept


def redact_query(query: str) -> str:
    """Keep query keys, hide the values of secret-looking ones and card numbers anywhere."""
    if not query:
        return ""
    parts = []
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if sep and secret_name(key):
            value = "REDACTED"
        else:
            value = redact_text(value)
        parts.append(redact_text(key) + sep + value)
    return "&".join(parts)


_HAS_DIGIT_RUN = re.compile(r"\d{4}").search


def redact_text(text: str) -> str:
    """Card-like numbers (Luhn-valid) in free text keep at most their last four digits."""
    if not _HAS_DIGIT_RUN(text):  # every card-like run has four digits in a row somewhere
        return text
    return _CARDLIKE.sub(_mask_card, text)


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
    logging.getLogger("egressd.lifecycle").setLevel(logging.INFO)


class AccessLog:
    """Writes the per-call line (contract section 6) from `CallFinished` events.

    The line is built straight from the event (no LogRecord, no formatter pass) and
    written through a small buffer flushed every `flush_interval` seconds or at 64 KiB:
    one write syscall per batch instead of one per call. It still obeys the level and
    format of the `egressd.access` logger's configuration.
    """

    interests = (CallFinished,)

    def __init__(self, stream: Any = None, fmt: str | None = None, flush_interval: float = 0.1) -> None:
        self._stream = stream
        self._fmt = fmt
        self._buffer: list[str] = []
        self._size = 0
        self._flush_interval = flush_interval
        self._flush_handle: asyncio.TimerHandle | None = None

    def _target(self) -> tuple[Any, str] | None:
        """Where lines go, from the logging configuration (`configure_logging`)."""
        if self._stream is not None:
            return self._stream, self._fmt or "json"
        if not ACCESS.isEnabledFor(logging.INFO):
            return None
        for handler in logging.getLogger("egressd").handlers:
            if isinstance(handler, logging.StreamHandler):
                fmt = "text" if isinstance(handler.formatter, TextFormatter) else "json"
                return handler.stream, fmt
        return None

    def __call__(self, event: Event) -> None:
        if not isinstance(event, CallFinished):
            return
        target = self._target()
        if target is None:
            return
        path, _, query = event.path.partition("?")
        if _HAS_DIGIT_RUN(path):  # a card number in a path segment (/v1/cards/4242...)
            path = redact_text(path)
        if query:
            path += "?" + redact_query(query)
        stamp = _now_iso()
        if target[1] == "json":
            # Hand-built: names, ids and codes are plain tokens by construction (routing and
            # request-id validation); anything that may hold arbitrary text goes through json.dumps.
            line = (
                f'{{"time":"{stamp}","level":"info","logger":"egressd.access","msg":"call",'
                f'"request_id":"{event.request_id}","upstream":"{event.upstream}","route":"{event.route}",'
                f'"method":{_js(event.method)},"path":{_js(path)},"status":{event.status},'
                f'"outcome":"{event.outcome}","attempts":{event.attempts},'
                f'"duration_ms":{round(event.duration * 1000, 3)},"cache":{_js(event.cache)},'
                f'"failover":{_js(event.failover)},"error_code":{_js(event.error_code)},"detail":{_js(event.detail)}'
                + (',"app_gone":true}' if event.app_gone else "}")
            )
        else:
            pairs = (
                ("request_id", event.request_id), ("upstream", event.upstream), ("route", event.route),
                ("method", event.method), ("path", path), ("status", event.status), ("outcome", event.outcome),
                ("attempts", event.attempts), ("duration_ms", round(event.duration * 1000, 3)),
                ("cache", event.cache), ("failover", event.failover), ("error_code", event.error_code),
                ("detail", event.detail), ("app_gone", "true" if event.app_gone else None),
            )
            line = f"{stamp[11:19]} INFO    egressd.access: call " + " ".join(
                f"{k}={v}" for k, v in pairs if v is not None
            )
        self._buffer.append(line)
        self._size += len(line) + 1
        if self._size >= 65536:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._buffer:
            return
        target = self._target()
        data = "\n".join(self._buffer) + "\n"
        self._buffer.clear()
        self._size = 0
        if target is None:
            return
        try:
            target[0].write(data)
            target[0].flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not break calls


def _js(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return encode_basestring_ascii(value)  # the C escaper json.dumps uses, without its overhead
    return json.dumps(value)


_second: list[Any] = [0, ""]  # the last whole second formatted, reused within that second


def _now_iso() -> str:
    now = time.time()
    whole = int(now)
    if whole != _second[0]:
        _second[0], _second[1] = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"
