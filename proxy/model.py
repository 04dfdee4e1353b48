"""The values a call is made of: the request (`Call`), its body, and the answer (`Response`).

Stages pass a `Call` down and get a `Response` back; no stage touches aiohttp's request
object. A `Call` is immutable; a stage that needs a changed call makes one with
`call.replace(...)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import ProxyError

#: Methods safe to send twice (RFC 9110 9.2.2). An allow-list: any other method (POST,
#: PATCH, an extension method, or one of these spelled in another case, since methods
#: are case-sensitive tokens) may act twice when resent and counts as unsafe.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})


def unsafe_method(method: str) -> bool:
    """True unless `method` is exactly one of `IDEMPOTENT_METHODS` (no case folding)."""
    return method not in IDEMPOTENT_METHODS


class RequestBody:
    """A request body that streams by default and is buffered only when a stage asks.

    `max_body` is enforced both ways: buffering raises `body_too_large`, and streaming
    raises it as soon as the running count passes the limit (the upstream then sees an
    aborted, incomplete request, never a complete one).
    """

    __slots__ = ("_consumed", "_data", "_source", "length", "max_body", "replayable")

    def __init__(
        self,
        *,
        data: bytes | None = None,
        source: AsyncIterator[bytes] | None = None,
        length: int | None = None,
        max_body: int | None = None,
    ) -> None:
        self._data = data
        self._source = source
        # True when the body can be sent again (it is buffered, or there is none). A plain
        # attribute, not a property: the retry guard reads it on every call.
        self.replayable = data is not None or source is None
        self._consumed = False
        self.length = len(data) if data is not None else length
        self.max_body = max_body

    @classmethod
    def empty(cls) -> RequestBody:
        return cls(data=b"")

    @property
    def buffered(self) -> bool:
        return self._data is not None

    @property
    def data(self) -> bytes:
        """The buffered bytes; only valid after `read()` (or for a body made from bytes)."""
        if self._data is None:
            raise RuntimeError("request body is not buffered")
        return self._data

    def _too_large(self) -> ProxyError:
        return ProxyError("body_too_large", f"request body is larger than limits.max_body ({self.max_body} bytes)")

    async def read(self) -> bytes:
        """Buffer the whole body (bounded by `max_body`) and return it; idempotent."""
        if self._data is not None:
            return self._data
        if self._consumed or self._source is None:
            raise RuntimeError("request body was already streamed")
        self._consumed = True
        parts: list[bytes] = []
        size = 0
        async for chunk in self._source:
            size += len(chunk)
            if self.max_body is not None and size > self.max_body:
                raise self._too_large()
            parts.append(chunk)
        self._data = b"".join(parts)
        self.replayable = True
        self.length = size
        return self._data

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the body for sending; streams once, or replays the buffered bytes."""
        if self._data is not None:
            if self._data:
                yield self._data
            return
        if self._source is None:
            return
        if self._consumed:
            raise RuntimeError("streamed request body cannot be sent twice")
        self._consumed = True
        size = 0
        async for chunk in self._source:
            size += len(chunk)
            if self.max_body is not None and size > self.max_body:
                raise self._too_large()
            yield chunk


#: Kinds of failed attempts after which the upstream may have acted on the request: the
#: request (or part of it) was written and no complete answer came back.
AMBIGUOUS_KINDS = frozenset({"timeout", "reset", "protocol_error", "header_too_large"})


class Attempt(NamedTuple):
    """One try the transport made to `upstream`: `kind` is "answered" (with `status` and
    `headers`) or the failure kind (connect_error, timeout, reset, protocol_error, header_too_large)."""

    upstream: str
    kind: str
    status: int = 0
    headers: Mapping[str, str] | None = None


class CallStory:
    """What happened to one call so far: one typed record that the stages and the
    transport of a call write and read (never strings in `notes`).

    Shared by every `Call` value derived from the one the server made (a `replace` keeps
    it), so whole-call facts are read at the top: whether any attempt may have reached
    the upstream (failover's honesty rule, the idempotency stage's ambiguous outcomes),
    and whether the app went away while egressd owned the call.
    """

    __slots__ = ("app_gone", "attempts", "before_send", "failover_from", "held_seconds", "sending", "upstream_seconds")

    def __init__(self, *, failover_from: str | None = None) -> None:
        self.attempts: list[Attempt] = []  # finished tries, in order
        self.sending = 0  # tries started (a request written or being written upstream)
        # Where the call's time went outside egressd (for its overhead, `CallFinished`):
        # waiting on the upstream's attempts (from taking a connection to the answer's head,
        # and its body when read whole), and waits a policy asked for (rate-limit queue,
        # retry back-off, an identical call in flight that this one joined).
        self.upstream_seconds = 0.0
        self.held_seconds = 0.0
        self.app_gone = False  # the app closed its connection before the answer
        self.failover_from: str | None = failover_from  # set on calls a failover sends
        # Awaited by the transport before each try writes its first byte, with the
        # upstream's name (the outbox marks a kept send "sending" there: proxy/outbox/).
        self.before_send: Callable[[str], Awaitable[None]] | None = None

    def may_have_acted(self, upstream: str, not_processed: Callable[[int, Mapping[str, str]], bool]) -> bool:
        """Whether an upstream may have acted on this call without a complete answer,
        judged over every attempt: a try that failed after its request was written, or a
        5xx answer not documented as "not processed" by `not_processed` (the plugin of
        `upstream`; a 5xx from another upstream, a fallback, counts as ambiguous)."""
        for attempt in self.attempts:
            if attempt.kind in AMBIGUOUS_KINDS:
                return True
            if attempt.kind == "answered" and attempt.status >= 500:
                if attempt.upstream != upstream or not not_processed(attempt.status, attempt.headers or {}):
                    return True
        return False


class Call(NamedTuple):
    """One proxied call as the stages see it: immutable (a NamedTuple, cheap to build on
    every call); a stage that needs a changed call makes one with `call.replace(...)`."""

    method: str
    upstream: str  # the policy (upstream name) that handles this call now
    path: str  # the part after the route prefix, always starting with "/"
    query: str  # the raw query string, without "?"
    headers: CIMultiDictProxy[str]  # from the app, hop-by-hop headers already removed
    body: RequestBody
    deadline: float  # clock.now() value after which the whole call has run out of time
    started: float  # clock.now() when the call arrived
    request_id: str
    route: str = ""  # the upstream the app addressed (differs from `upstream` after failover)
    idempotency_key: str | None = None
    attrs: tuple[tuple[str, Any], ...] = ()  # small immutable annotations from stages
    # What happened to the call so far (see `CallStory`); the server makes one per call.
    # None for calls made without one (tests, internal calls): nothing is recorded then.
    story: CallStory | None = None

    def replace(self, **changes: Any) -> Call:
        return self._replace(**changes)

    def with_headers(self, headers: CIMultiDict[str]) -> Call:
        return self._replace(headers=CIMultiDictProxy(headers))

    def attr(self, name: str, default: Any = None) -> Any:
        for key, value in self.attrs:
            if key == name:
                return value
        return default

    def with_attr(self, name: str, value: Any) -> Call:
        return self._replace(attrs=(*[(k, v) for k, v in self.attrs if k != name], (name, value)))

    @property
    def target_path(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass(slots=True)
class Response:
    """An answer travelling back up the stages.

    Either `body` holds the whole answer or `stream` yields it; `release` (if set) frees
    the upstream connection and must be called exactly once by whoever finishes with it.
    """

    status: int
    headers: CIMultiDict[str]
    body: bytes | None = b""
    stream: AsyncIterator[bytes] | None = None
    release: Callable[[], Awaitable[None]] | None = None
    upstream: str = ""
    attempts: int = 0
    error_code: str | None = None  # set on answers the proxy made itself
    cache: str | None = None  # hit | miss | stale
    failover: str | None = None  # the X-Egressd-Failover value, if any
    exhausted: bool = False  # retries ran out on this answer (read by failover)
    retry_skipped: str | None = None  # why a retryable answer was not retried, if it was not
    # What the stages say about the answer, for the access log and metrics (typed, no
    # string-keyed side channel):
    outcome: str | None = None  # "replayed" (idempotency) or "cached" (cache hit, stale)
    idempotency: str | None = None  # the idempotency result of a replayed or shared answer
    cache_coalesced: bool = False  # a copy of another caller's identical miss
    detail: str | None = None  # the cause of a proxy-made error (connect_error, in_doubt...)
    close_connection: bool = False  # close the app's connection after this answer

    async def read(self, limit: int | None = None) -> bytes:
        """Buffer a streamed answer (bounded by `limit`) and return the bytes."""
        if self.stream is None:
            return self.body or b""
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in self.stream:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise ProxyError(
                        "upstream_unreachable", f"upstream answer is larger than the {limit}-byte buffer limit"
                    )
                parts.append(chunk)
        finally:
            self.stream = None
            await self.close()
        self.body = b"".join(parts)
        return self.body

    async def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            await release()
