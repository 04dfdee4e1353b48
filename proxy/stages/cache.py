"""Response cache: fresh answers from the state backend, coalesced misses, stale-if-error.

Rules (docs/resilience.md, "Cache"):

* Only methods in `cache.methods`. The key is sha256 over the method, the full target
  URL (`policy.target` + path + query), the credentials hash (proxy.credentials) and the
  request headers in `VARY_HEADERS` and the provider plugin's `vary_headers`, so one tenant
  never gets another's answer.
* A request with `Cache-Control: no-store` bypasses the cache (no lookup, no store);
  `no-cache` (or `Pragma: no-cache`) skips the lookup but may refresh the entry.
* A request with `Range` or any `If-*` header goes straight through (no lookup, no
  coalescing, no store): its answer (206, 304, 412) is not the plain representation.
* Stored: statuses in `CACHEABLE_STATUSES`, not proxy-made, no `Set-Cookie`, no
  `Cache-Control: no-store/private/no-cache`, no `Vary` beyond `VARY_HEADERS`, at most
  `max_entry_size` bytes. The freshness lifetime is min(ttl, max-age, s-maxage); the
  upstream's `Age` when received is kept with the entry, so the entry is fresh while
  that age plus the time since it was stored is under the lifetime, and the `Age` sent
  out counts both. Kept for the rest of that lifetime plus `stale_if_error`.
  Delta-seconds values are capped at 2**31 (RFC 9111), garbage ones are ignored.
* Concurrent identical misses run one inner call; followers get a copy of the leader's
  answer when its status is cacheable (or 429/5xx) and it is not marked for one client
  (`_shareable`); otherwise they go upstream on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.credentials import credentials_hash
from proxy.errors import ProxyError
from proxy.events import CacheResult
from proxy.hashing import digest
from proxy.model import Call, Response
from proxy.pipeline import Handler, Stage, StageContext
from proxy.stages._answers import buffer_answer, cache_control, delta_seconds, from_snapshot, snapshot
from proxy.state.base import SCOPE_SEP, StoredResponse, state_key

CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 410})
# Request headers that select a representation; part of every cache key, with the
# provider's own (`ProviderPlugin.vary_headers`: Stripe-Account, PayPal-Partner-...).
VARY_HEADERS: tuple[str, ...] = ("Accept", "Accept-Encoding", "Accept-Language")
# `Vary` names an answer may carry and still be cached (besides the provider's own).
_VARY_ALWAYS_OK = ("Origin", "Authorization", "Cookie")
STALE_ERROR_CODES = frozenset({"upstream_unreachable", "upstream_timeout", "circuit_open"})


def _partial_or_conditional(call: Call) -> bool:
    """A request whose answer is not the plain representation (206 for a Range, 304 or
    412 for an If-* precondition): it must neither be served from nor feed the cache."""
    return any(name.lower() == "range" or name.lower().startswith("if-") for name in call.headers)


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
        self.vary: tuple[str, ...] = (*VARY_HEADERS, *ctx.plugin.vary_headers)
        self.vary_ok = frozenset(h.lower() for h in (*self.vary, *_VARY_ALWAYS_OK))

    def _emit(self, result: str) -> None:
        self.events.emit(CacheResult(self.upstream, result))

    def key_for(self, call: Call) -> str:
        parts: list[str] = [call.method, self.target + call.target_path, credentials_hash(call.headers, self.policy)]
        for name in self.vary:
            values = call.headers.getall(name, [])
            parts.extend((name.lower(), str(len(values)), *values))
        return f"{self.scope}{SCOPE_SEP}{digest(*parts)}"

    def lifetime(self, headers: CIMultiDict[str] | Iterable[tuple[str, str]]) -> float:
        """Freshness lifetime: min(ttl, max-age, s-maxage)."""
        hdrs = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)
        cc = cache_control(hdrs.getall("Cache-Control", []))
        ttl = self.cfg.ttl
        for name in ("max-age", "s-maxage"):
            limit = delta_seconds(cc.get(name))
            if limit is not None:
                ttl = min(ttl, limit)
        return ttl

    @staticmethod
    def received_age(headers: CIMultiDict[str]) -> float:
        """The answer's age when it reached us (the upstream's `Age`, 0 without one)."""
        return delta_seconds(headers.get("Age")) or 0.0

    def fresh_for(self, status: int, headers: CIMultiDict[str] | Iterable[tuple[str, str]]) -> float:
        """Seconds an answer stays fresh from when it was received (0: never store it)."""
        hdrs = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers)
        return max(0.0, self.lifetime(hdrs) - self.received_age(hdrs))

    def _entry_age(self, entry: StoredResponse) -> float:
        """The entry's current age: its age when stored plus the time since."""
        return entry.age + max(0.0, self.clock.wall() - entry.stored_at)

    def _entry_lifetime(self, entry: StoredResponse) -> float:
        return entry.lifetime if entry.lifetime is not None else self.lifetime(entry.headers)

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
                if name.strip() and name.strip().lower() not in self.vary_ok:
                    return False  # includes "*"
        return self.fresh_for(response.status, response.headers) > 0

    @staticmethod
    def _shareable(response: Response) -> bool:
        """Can followers get a copy? Only an answer with a cacheable status, or an error
        every identical caller would meet now (429, 5xx: one call during an outage, not
        one per follower), and not marked for one client. Never a 206, 304 or 412."""
        if response.status not in CACHEABLE_STATUSES and response.status != 429 and response.status < 500:
            return False
        if "Set-Cookie" in response.headers:
            return False
        cc = cache_control(response.headers.getall("Cache-Control", []))
        return not ({"no-store", "private"} & cc.keys())

    def _answer(self, stored: StoredResponse, cache: str, upstream: str | None = None) -> Response:
        response = from_snapshot(stored, upstream=upstream or self.upstream)
        response.cache = cache
        if cache in ("hit", "stale"):
            response.headers["Age"] = str(int(self._entry_age(stored)))
            response.outcome = "cached"
        elif stored.age:
            response.headers["Age"] = str(int(stored.age))
        return response

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if call.method not in self.methods:
            return await nxt(call)
        cc = cache_control(call.headers.getall("Cache-Control", []))
        if "no-store" in cc or _partial_or_conditional(call):
            self._emit("bypass")
            return await nxt(call)
        no_cache = "no-cache" in cc or "no-cache" in call.headers.get("Pragma", "").lower()
        key = self.key_for(call)
        entry: StoredResponse | None = None
        if not no_cache:
            entry = await self.state.cache_get(key)
            if entry is not None and self._entry_age(entry) < self._entry_lifetime(entry):
                self._emit("hit")
                return self._answer(entry, "hit")
            flight = self._inflight.get(key)
            if flight is not None:
                return await self._follow(call, nxt, flight)
        return await self._lead(call, nxt, key, entry)

    async def _follow(self, call: Call, nxt: Handler, flight: _Flight) -> Response:
        flight.followers += 1
        began = self.clock.now()
        shared = await asyncio.shield(flight.future)
        if call.story is not None:  # waiting on the leader's upstream call: not egressd's overhead
            call.story.held_seconds += self.clock.now() - began
        if shared.error is not None:
            self._emit("miss")
            err = shared.error
            raise ProxyError(
                err.code, err.message, retry_after=err.retry_after, status=err.status, detail=err.detail
            )
        if shared.stored is None:
            # The leader's answer was not for sharing (too big, private, Set-Cookie, not
            # cacheable, or the leader was cancelled): go upstream on our own.
            self._emit("miss")
            response = await nxt(call)
            response.cache = "miss"
            return response
        self._emit(shared.cache)
        response = self._answer(shared.stored, shared.cache, shared.upstream)
        response.cache_coalesced = True
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
            try:
                return await self._keep(response, key, entry, flight, shared)
            except BaseException:
                await response.close()  # never drop an answer with its connection held
                raise
        finally:
            if self._inflight.get(key) is flight:
                del self._inflight[key]
            if not flight.future.done():
                flight.future.set_result(shared)

    async def _keep(
        self, response: Response, key: str, entry: StoredResponse | None, flight: _Flight, shared: _Shared
    ) -> Response:
        """The leader's answer: serve stale instead of an error, store it, share it."""
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
        shareable = self._shareable(response)
        if storable or (shareable and flight.followers > 0):
            body = await buffer_answer(response, self.cfg.max_entry_size)
            if body is not None:
                age = self.received_age(response.headers)
                lifetime = self.lifetime(response.headers)
                # The lifetime follows from the stored headers and this (fingerprinted)
                # configuration, so only the age is kept: fewer records need the extras.
                stored = snapshot(response, body, self.clock.wall(), age=age)
                if shareable:
                    shared.stored, shared.upstream = stored, response.upstream
                if storable:
                    ttl = lifetime - age
                    await self.state.cache_set(key, stored, ttl=ttl + self.cfg.stale_if_error)
                    self._emit("store")
        return response

    def _stale(self, entry: StoredResponse | None) -> StoredResponse | None:
        if entry is None or self.cfg.stale_if_error <= 0:
            return None
        if self._entry_age(entry) < self._entry_lifetime(entry) + self.cfg.stale_if_error:
            return entry
        return None


def build(ctx: StageContext) -> Stage | None:
    if ctx.policy.cache is None:
        return None
    return CacheStage(ctx)
