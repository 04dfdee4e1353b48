"""Response cache: fresh answers from the state backend, coalesced misses, stale-if-error.

Rules (docs/resilience.md, "Cache"):

* Only methods in `cache.methods`. The key is sha256 over the method, the full target
  URL (`policy.target` + path + query), the credentials hash (proxy.credentials) and the
  request headers in `VARY_HEADERS`, so one tenant never gets another's answer.
* A request with `Cache-Control: no-store` bypasses the cache (no lookup, no store);
  `no-cache` (or `Pragma: no-cache`) skips the lookup but may refresh the entry.
* Stored: statuses in `CACHEABLE_STATUSES`, not proxy-made, no `Set-Cookie`, no
  `Cache-Control: no-store/private/no-cache`, no `Vary` beyond `VARY_HEADERS`, at most
  `max_entry_size` bytes. Fresh for min(ttl, max-age, s-maxage) minus `Age`; kept for
  that plus `stale_if_error`.
* Concurrent identical misses run one inner call; followers get a copy of the leader's
  answer (see `_share`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.credentials import credentials_hash
from proxy.errors import ProxyError
from proxy.events import CacheResult
from proxy.model import Call, Response
from proxy.pipeline import Handler, Stage, StageContext
from proxy.state.base import StoredResponse, state_key
from proxy.state.memory_records import SCOPE_SEP

CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
# Request headers that select a representation; part of every cache key.
VARY_HEADERS: tuple[str, ...] = (
    "Accept",
    "Accept-Encoding",
    "Accept-Language",
    "Stripe-Account",
    "Stripe-Version",
    "PayPal-Partner-Attribution-Id",
)
_VARY_OK = frozenset(h.lower() for h in (*VARY_HEADERS, "Origin", "Authorization", "Cookie"))
# Not kept in stored answers: per-connection, or recomputed on the way out.
_NOT_STORED = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Transfer-Encoding",
        "TE",
        "Trailer",
        "Upgrade",
        "Content-Length",
        "Age",
        "Set-Cookie",
    )
)
STALE_ERROR_CODES = frozenset({"upstream_unreachable", "upstream_timeout", "circuit_open"})


# ---- helpers shared with the idempotency stage --------------------------------------------


def cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """`Cache-Control` directives, lower-cased: {"max-age": "60", "private": None}."""
    out: dict[str, str | None] = {}
    for value in values:
        for part in value.split(","):
            name, eq, arg = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = arg.strip().strip('"') if eq else None
    return out


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        return None


async def buffer_answer(response: Response, limit: int) -> bytes | None:
    """Buffer the whole answer if it is at most `limit` bytes and return it.

    Bigger: returns None and leaves `response` streaming exactly as before (the bytes
    already read are sent first). A buffered answer's connection is released.
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


def snapshot(response: Response, body: bytes, wall: float) -> StoredResponse:
    headers = tuple((k, v) for k, v in response.headers.items() if k.lower() not in _NOT_STORED)
    return StoredResponse(status=response.status, headers=headers, body=body, stored_at=wall)


def from_snapshot(stored: StoredResponse, *, upstream: str) -> Response:
    headers: CIMultiDict[str] = CIMultiDict(stored.headers)
    return Response(status=stored.status, headers=headers, body=stored.body, upstream=upstream)


# ---- the stage ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Shared:
    """What a leader hands its followers: an answer to copy, an error, or "go yourself"."""

    stored: StoredResponse | None = None
    upstream: str = ""
    cache: str = "miss"
    error: ProxyError | None = None


@dataclass(slots=True)
class _Flight:
    future: asyncio.Future[_Shared]
    followers: int = 0


class CacheStage:
    name = "cache"

    def __init__(self, ctx: StageContext) -> None:
        cfg = ctx.policy.cache
        assert cfg is not None
        self.cfg = cfg
        self.policy = ctx.policy
        self.clock = ctx.clock
        self.events = ctx.events
        self.state = ctx.state
        self.upstream = ctx.policy.upstream
        self.methods = frozenset(m.upper() for m in cfg.methods)
        self.target = ctx.policy.target.rstrip("/")
        self.scope = state_key(self.upstream, "cache", ctx.policy.fingerprint("target", "auth", "cache"))
        limit = getattr(ctx.state, "limit_scope", None)
        if callable(limit):
            limit(self.scope, cfg.max_entries)
        self._inflight: dict[str, _Flight] = {}

    def _emit(self, result: str) -> None:
        self.events.emit(CacheResult(self.upstream, result))

    def key_for(self, call: Call) -> str:
        h = hashlib.sha256()
        for part in (
            call.method,
            self.target + call.target_path,
            credentials_hash(call.headers, self.policy),
        ):
            h.update(part.encode("utf-8", "surrogatepass") + b"\0")
        for name in VARY_HEADERS:
            h.update(name.lower().encode() + b"=" + ",".join(call.headers.getall(name, [])).encode() + b"\0")
        return f"{self.scope}{SCOPE_SEP}{h.hexdigest()}"

    def fresh_for(self, status: int, headers: CIMultiDict[str] | Iterable[tuple[str, str]]) -> float:
        """Seconds an answer stays fresh from when it was received (0: never store it)."""
        hdrs = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)
        cc = cache_control(hdrs.getall("Cache-Control", []))
        ttl = self.cfg.ttl
        for name in ("max-age", "s-maxage"):
            limit = _seconds(cc.get(name))
            if limit is not None:
                ttl = min(ttl, limit)
        age = _seconds(hdrs.get("Age"))
        return max(0.0, ttl - (age or 0.0))

    def storable(self, response: Response) -> bool:
        if response.error_code is not None or response.status not in CACHEABLE_STATUSES:
            return False
        if "Set-Cookie" in response.headers:
            return False
        cc = cache_control(response.headers.getall("Cache-Control", []))
        if {"no-store", "private", "no-cache"} & cc.keys():
            return False
        for value in response.headers.getall("Vary", []):
            for name in value.split(","):
                if name.strip() and name.strip().lower() not in _VARY_OK:
                    return False  # includes "*"
        return self.fresh_for(response.status, response.headers) > 0

    @staticmethod
    def _shareable(response: Response) -> bool:
        """Can followers get a copy? Not when the answer is marked for one client only."""
        if "Set-Cookie" in response.headers:
            return False
        cc = cache_control(response.headers.getall("Cache-Control", []))
        return not ({"no-store", "private"} & cc.keys())

    def _answer(self, stored: StoredResponse, cache: str, upstream: str | None = None) -> Response:
        response = from_snapshot(stored, upstream=upstream or self.upstream)
        response.cache = cache
        if cache in ("hit", "stale"):
            response.headers["Age"] = str(int(max(0.0, self.clock.wall() - stored.stored_at)))
            response.notes["outcome"] = "cached"
        return response

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if call.method not in self.methods:
            return await nxt(call)
        cc = cache_control(call.headers.getall("Cache-Control", []))
        if "no-store" in cc:
            self._emit("bypass")
            return await nxt(call)
        no_cache = "no-cache" in cc or "no-cache" in call.headers.get("Pragma", "").lower()
        key = self.key_for(call)
        entry: StoredResponse | None = None
        if not no_cache:
            entry = await self.state.cache_get(key)
            if entry is not None:
                age = self.clock.wall() - entry.stored_at
                if age < self.fresh_for(entry.status, entry.headers):
                    self._emit("hit")
                    return self._answer(entry, "hit")
            flight = self._inflight.get(key)
            if flight is not None:
                return await self._follow(call, nxt, flight)
        return await self._lead(call, nxt, key, entry)

    async def _follow(self, call: Call, nxt: Handler, flight: _Flight) -> Response:
        flight.followers += 1
        shared = await asyncio.shield(flight.future)
        if shared.error is not None:
            self._emit("miss")
            err = shared.error
            raise ProxyError(
                err.code, err.message, retry_after=err.retry_after, status=err.status, detail=err.detail
            )
        if shared.stored is None:
            # The leader's answer was not for sharing (too big, private, Set-Cookie, or
            # the leader was cancelled): go upstream on our own.
            self._emit("miss")
            response = await nxt(call)
            response.cache = "miss"
            return response
        self._emit(shared.cache)
        response = self._answer(shared.stored, shared.cache, shared.upstream)
        response.notes["cache_coalesced"] = True
        return response

    async def _lead(self, call: Call, nxt: Handler, key: str, entry: StoredResponse | None) -> Response:
        flight = _Flight(asyncio.get_running_loop().create_future())
        self._inflight[key] = flight
        shared = _Shared()
        try:
            try:
                response = await nxt(call)
            except ProxyError as exc:
                stale = self._stale(entry) if exc.code in STALE_ERROR_CODES else None
                if stale is None:
                    self._emit("miss")
                    shared.error = exc
                    raise
                shared.stored, shared.cache = stale, "stale"
                self._emit("stale")
                return self._answer(stale, "stale")
            if response.status >= 500 or response.error_code in STALE_ERROR_CODES:
                stale = self._stale(entry)
                if stale is not None:
                    await response.close()
                    shared.stored, shared.cache = stale, "stale"
                    self._emit("stale")
                    return self._answer(stale, "stale")
            self._emit("miss")
            response.cache = "miss"
            storable = self.storable(response)
            shareable = flight.followers > 0 and self._shareable(response)
            if storable or shareable:
                body = await buffer_answer(response, self.cfg.max_entry_size)
                if body is not None:
                    stored = snapshot(response, body, self.clock.wall())
                    if self._shareable(response):
                        shared.stored, shared.upstream = stored, response.upstream
                    if storable:
                        ttl = self.fresh_for(response.status, response.headers)
                        await self.state.cache_set(key, stored, ttl=ttl + self.cfg.stale_if_error)
                        self._emit("store")
            return response
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if not flight.future.done():
                flight.future.set_result(shared)

    def _stale(self, entry: StoredResponse | None) -> StoredResponse | None:
        if entry is None or self.cfg.stale_if_error <= 0:
            return None
        age = self.clock.wall() - entry.stored_at
        if age < self.fresh_for(entry.status, entry.headers) + self.cfg.stale_if_error:
            return entry
        return None


def build(ctx: StageContext) -> Stage | None:
    if ctx.policy.cache is None:
        return None
    return CacheStage(ctx)
