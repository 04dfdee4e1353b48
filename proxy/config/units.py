"""Durations, sizes and rates as operators write them in policy files.

`250ms`, `2s`, `5m`, `24h`, `1d`; `512B`, `10KiB`, `10MiB`, `1GB`; `100/s`, `30/m`, `1000/h`.
Every parser raises `ValueError` (and nothing else) with a message that says what a good
value looks like.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = [
    "DURATION_PATTERN",
    "RATE_PATTERN",
    "SIZE_PATTERN",
    "Rate",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_rate",
    "parse_size",
]

_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
_RATE_UNITS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}

_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)"
_DURATION_RE = re.compile(rf"{_NUMBER}\s*(ms|s|m|h|d)", re.ASCII)
_SIZE_RE = re.compile(rf"{_NUMBER}\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.ASCII | re.IGNORECASE)
_RATE_RE = re.compile(rf"{_NUMBER}\s*/\s*([a-z]+)", re.ASCII | re.IGNORECASE)

# Patterns for the JSON Schema (editor validation); the parsers above are the authority.
DURATION_PATTERN = r"^(0|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h|d))$"
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?\s*([Bb]|[KkMmGg][Ii]?[Bb])?$"
RATE_PATTERN = r"^[0-9]*\.?[0-9]+\s*/\s*(s|m|h|sec|min|hour|second|minute)$"

_DURATION_HINT = "use a number with a unit: ms, s, m, h, d (e.g. 250ms, 2s, 5m, 24h)"
_SIZE_HINT = "use bytes or a number with a unit: B, KiB, MiB, GiB, KB, MB, GB (e.g. 10MiB)"
_RATE_HINT = "use N/s, N/m or N/h (e.g. 100/s)"

_MAX_TEXT = 64  # longer inputs are shown shortened in messages


def _show(v: object) -> str:
    text = str(v)
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return repr(text) if isinstance(v, str) else text


def parse_duration(v: str | int | float) -> float:
    """Seconds from `250ms`, `2s`, `1.5s`, `5m`, `24h`, `1d`; plain `0` means zero."""
    if isinstance(v, bool):
        raise ValueError(f"bad duration {v}: {_DURATION_HINT}")
    if isinstance(v, int | float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"bad duration {v}: must be a finite number with a unit")
        if v == 0:
            return 0.0
        if v < 0:
            raise ValueError(f"bad duration {v}: must not be negative")
        raise ValueError(f"bad duration {v}: a number needs a unit: ms, s, m, h, d (e.g. {_fmt_num(float(v))}s)")
    if not isinstance(v, str):
        raise ValueError(f"bad duration of type {type(v).__name__}: {_DURATION_HINT}")
    text = v.strip()
    if not text:
        raise ValueError(f"empty duration: {_DURATION_HINT}")
    if text.startswith("-"):
        raise ValueError(f"bad duration {_show(v)}: must not be negative")
    if text in ("0", "0.0"):
        return 0.0
    m = _DURATION_RE.fullmatch(text)
    if m is None:
        if re.fullmatch(_NUMBER, text, re.ASCII):
            raise ValueError(f"bad duration {_show(v)}: a number needs a unit: ms, s, m, h, d (e.g. {text}s)")
        raise ValueError(f"bad duration {_show(v)}: {_DURATION_HINT}")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"bad duration {_show(v)}: too large")
    return seconds


def parse_size(v: str | int) -> int:
    """Bytes from `512B`, `10KiB`, `10MiB`, `1GiB`, `10KB`/`MB`/`GB` (decimal) or plain bytes."""
    if isinstance(v, bool):
        raise ValueError(f"bad size {v}: {_SIZE_HINT}")
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"bad size {v}: must not be negative")
        return v
    obj: object = v  # YAML may hand us anything
    if isinstance(obj, float):
        if math.isfinite(obj) and obj >= 0 and obj.is_integer():
            return int(obj)
        raise ValueError(f"bad size {obj}: {_SIZE_HINT}")
    if not isinstance(v, str):
        raise ValueError(f"bad size of type {type(v).__name__}: {_SIZE_HINT}")
    text = v.strip()
    if not text:
        raise ValueError(f"empty size: {_SIZE_HINT}")
    if text.startswith("-"):
        raise ValueError(f"bad size {_show(v)}: must not be negative")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad size {_show(v)}: {_SIZE_HINT}")
    unit = (m.group(2) or "").lower()
    value = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(value) or value > 2**63:
        raise ValueError(f"bad size {_show(v)}: too large")
    if unit in ("", "b") and not float(m.group(1)).is_integer():
        raise ValueError(f"bad size {_show(v)}: a byte count must be a whole number")
    return round(value)


@dataclass(frozen=True, slots=True)
class Rate:
    """`count` events per `per` seconds (`100/s` is Rate(100, 1.0))."""

    count: float
    per: float

    @property
    def per_second(self) -> float:
        return self.count / self.per

    @property
    def interval(self) -> float:
        """Seconds between two events at this rate (the GCRA emission interval)."""
        return self.per / self.count

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per)
        if unit is None:
            return f"{_fmt_num(self.per_second)}/s"
        return f"{_fmt_num(self.count)}/{unit}"


def parse_rate(v: str) -> Rate:
    """`N/s`, `N/m` or `N/h`; N a positive number, decimals allowed (`0.5/s`)."""
    if not isinstance(v, str):
        raise ValueError(f"bad rate {_show(v)}: {_RATE_HINT}")
    text = v.strip()
    if not text:
        raise ValueError(f"empty rate: {_RATE_HINT}")
    if text.startswith("-"):
        raise ValueError(f"bad rate {_show(v)}: rate must be positive")
    m = _RATE_RE.fullmatch(text)
    if m is None or m.group(2).lower() not in _RATE_UNITS:
        raise ValueError(f"bad rate {_show(v)}: {_RATE_HINT}")
    count = float(m.group(1))
    if not math.isfinite(count):
        raise ValueError(f"bad rate {_show(v)}: too large")
    if count <= 0:
        raise ValueError(f"bad rate {_show(v)}: rate must be positive")
    return Rate(count=count, per=_RATE_UNITS[m.group(2).lower()])


def _fmt_num(x: float) -> str:
    x = float(x)
    if x.is_integer():
        return str(int(x))
    return f"{x:.3f}".rstrip("0").rstrip(".")


def format_duration(seconds: float) -> str:
    """The shortest natural spelling for messages: 0.25 -> `250ms`, 300 -> `5m`, 90 -> `90s`."""
    seconds = float(seconds)
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{_fmt_num(seconds * 1000)}ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{_fmt_num(seconds)}s"


def format_size(n: int) -> str:
    """`10485760` -> `10MiB`; sizes that are not whole KiB stay in bytes."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"
