"""Helpers the cache and idempotency stages share: keeping a complete answer
(`buffer_answer`, `snapshot`), giving it back (`from_snapshot`) and reading
`Cache-Control` / delta-seconds values safely."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable

from multidict import CIMultiDict

from proxy.headers import HOP_BY_HOP
from proxy.model import Response
from proxy.state.base import StoredResponse

#: RFC 9111 1.2.2: a delta-seconds value too big to represent counts as 2**31 seconds.
MAX_DELTA_SECONDS = 2147483648.0
_DIGITS = re.compile(r"[0-9]+")

# Not kept in stored answers: per-connection, or recomputed on the way out.
NOT_STORED = HOP_BY_HOP | frozenset({"content-length", "age", "set-cookie"})


def cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """`Cache-Control` directives, lower-cased: {"max-age": "60", "private": None}."""
    out: dict[str, str | None] = {}
    for value in values:
        for part in value.split(","):
            name, eq, arg = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = arg.strip().strip('"') if eq else None
    return out


def delta_seconds(value: str | None) -> float | None:
    """A delta-seconds value (`max-age`, `Age`): None unless it is plain ASCII digits;
    capped at `MAX_DELTA_SECONDS` however many digits it has (never raises)."""
    if value is None:
        return None
    text = value.strip()
    if not _DIGITS.fullmatch(text):
        return None
    digits = text.lstrip("0")
    if len(digits) > 10:
        return MAX_DELTA_SECONDS
    return min(float(int(digits or "0")), MAX_DELTA_SECONDS)


async def buffer_answer(response: Response, limit: int) -> bytes | None:
    """Buffer the whole answer if it is at most `limit` bytes and return it.

    Bigger: returns None and leaves `response` streaming exactly as before (the bytes
    already read are sent first). A buffered answer's connection is released; on an
    error while reading, the answer is closed and the error raised.
    """
    if response.stream is None:
        body = response.body or b""
        return body if len(body) <= limit else None
    length = response.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    source = response.stream
    parts: list[bytes] = []
    size = 0
    iterator = source.__aiter__()
    try:
        while True:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > limit:
                response.stream = _chain(parts, iterator)
                return None
    except BaseException:
        response.stream = None
        await response.close()
        raise
    response.stream = None
    response.body = b"".join(parts)
    await response.close()
    return response.body


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def snapshot(
    response: Response, body: bytes, wall: float, *, age: float = 0.0, lifetime: float | None = None
) -> StoredResponse:
    """A storable copy of a buffered answer (hop-by-hop and recomputed headers left out)."""
    headers = tuple((k, v) for k, v in response.headers.items() if k.lower() not in NOT_STORED)
    return StoredResponse(
        status=response.status,
        headers=headers,
        body=body,
        stored_at=wall,
        upstream=response.upstream,
        age=age,
        lifetime=lifetime,
    )


def from_snapshot(stored: StoredResponse, *, upstream: str) -> Response:
    """A fresh Response from a stored one; `upstream` unless the record names its producer."""
    headers: CIMultiDict[str] = CIMultiDict(stored.headers)
    return Response(status=stored.status, headers=headers, body=stored.body, upstream=stored.upstream or upstream)
