"""Request-target checks and `/<upstream>/<rest>` routing.

The raw (still percent-encoded) path is forwarded unchanged, so everything that could
make the upstream see a different path than we routed is refused here instead:
dot-segments in any encoding, backslashes, NUL and control characters, and empty
segments in the middle (`//`, usually a base URL configured with a trailing slash).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from proxy.errors import ProxyError

_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DOTS = frozenset({".", ".."})
_MAX_DECODES = 3
MAX_TARGET = 8192
# The common case, checked in one regex: segments of plain characters, none starting with
# a dot, no percent-escapes, no empty segment but a trailing slash. Anything else takes
# the careful per-segment path below.
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_~!$&'()*+,;=:@-][A-Za-z0-9._~!$&'()*+,;=:@-]*)*/?")


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str
    path: str  # starts with "/", still percent-encoded
    query: str


def _refuse(message: str) -> ProxyError:
    return ProxyError("bad_request", message)


def _looks_like_dots(text: str) -> bool:
    """A dot-segment, also as some upstream servers read it: `..;param` (Tomcat, Spring) and
    compatibility forms such as fullwidth dots that NFKC turns into `..`."""
    if text in _DOTS or text.split(";", 1)[0] in _DOTS:
        return True
    if not text.isascii():
        folded = unicodedata.normalize("NFKC", text)
        return folded in _DOTS or folded.split(";", 1)[0] in _DOTS
    return False


def _segment_is_hostile(segment: str) -> str | None:
    decoded = segment
    # Decode repeatedly: a double-encoded %252e%252e must not slip through a component that
    # decodes again. Past _MAX_DECODES rounds the segment is refused, not guessed about.
    for round_ in range(_MAX_DECODES + 1):
        # An encoded slash is harmless unless it hides a dot-segment, so check every part.
        if any(_looks_like_dots(part) for part in decoded.split("/")):
            return "dot-segment in path" if round_ == 0 else "encoded dot-segment in path"
        if "\\" in decoded:
            return "backslash in path"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
            return "control character in path"
        if "%" not in decoded:
            return None
        if round_ == _MAX_DECODES:
            return "path percent-encoded too many times"
        if not _valid_escapes(decoded):
            return "invalid percent-encoding in path"
        try:
            decoded = unquote(decoded, errors="strict")
        except UnicodeDecodeError:
            # Not UTF-8 once decoded (e.g. the overlong %c0%ae for "."): refuse rather than
            # guess how the upstream decodes it.
            return "percent-encoded bytes that are not UTF-8 in path"
    return None


def _valid_escapes(text: str) -> bool:
    return re.fullmatch(r"(?:[^%]|%[0-9A-Fa-f]{2})*", text) is not None


def check_path(path: str) -> None:
    """Raise `bad_request` for a path that could escape its prefix or be read differently."""
    if not path.startswith("/"):
        raise _refuse("request target must be a path (absolute-form and authority-form are refused)")
    if len(path) > MAX_TARGET:
        raise _refuse("request target too long")
    if _PLAIN_PATH.fullmatch(path):
        return
    segments = path.split("/")[1:]
    for index, segment in enumerate(segments):
        if segment == "":
            if index == len(segments) - 1:
                continue  # a trailing slash is fine
            raise _refuse("empty path segment ('//'); is the base URL configured with a trailing slash?")
        problem = _segment_is_hostile(segment)
        if problem is not None:
            raise _refuse(problem)


def split_target(raw: str, fixed_upstream: str | None = None) -> Target:
    """Split a raw request target into upstream name, path and query, refusing bad ones."""
    path, _, query = raw.partition("?")
    check_path(path)
    if "#" in raw:
        raise _refuse("fragment in request target")
    if fixed_upstream is not None:
        return Target(fixed_upstream, path, query)
    name, sep, rest = path[1:].partition("/")
    if not _UPSTREAM_NAME.fullmatch(name):
        raise ProxyError("unknown_upstream", f"no upstream named {name[:64]!r}")
    return Target(name, "/" + rest if sep else "/", query)


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _port(port: int | None, scheme: str) -> int | None:
    return port if port is not None else _DEFAULT_PORTS.get(scheme.lower())


def rewrite_location(location: str, target: str, upstream: str | None) -> str:
    """Where an upstream redirect sends the app (contract 7.4, 7.7).

    A `Location` that points at the upstream's own target (an absolute URL on the target's
    scheme, host and port, or an absolute path), under the target's base path, becomes the
    absolute path through egressd: `/<upstream>/<rest>`, or `/<rest>` on a policy's own
    `listen` port (`upstream` None). Anything else (another host, a path outside the base
    path, a relative reference) passes unchanged: egressd never follows redirects.
    """
    parts = urlsplit(location)
    base = urlsplit(target)
    if parts.scheme or parts.netloc:
        same = (
            parts.scheme.lower() == base.scheme.lower()
            and (parts.hostname or "").lower() == (base.hostname or "").lower()
            and (parts.port or _DEFAULT_PORTS.get(parts.scheme.lower()))
            == (base.port or _DEFAULT_PORTS.get(base.scheme.lower()))
        )
        if not same:
            return location
    elif not parts.path.startswith("/") or location.startswith("//"):
        return location  # relative references resolve against egressd's own URL already
    prefix = base.path.rstrip("/")
    path = parts.path or "/"
    if prefix:
        if path != prefix and not path.startswith(prefix + "/"):
            return location
        path = path[len(prefix) :] or "/"
    out = (f"/{upstream}" if upstream is not None else "") + path
    if parts.query:
        out += "?" + parts.query
    if parts.fragment:
        out += "#" + parts.fragment
    return out
