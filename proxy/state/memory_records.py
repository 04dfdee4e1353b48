"""In-process records: the idempotency ledger, the response cache and small shared values.

A mixin of `proxy.state.memory.MemoryState` (which sets `self.clock` first). Each
operation below is self-contained and mirrors one Redis Lua script of the Redis backend,
so both backends keep the same semantics (tests/test_state_records.py runs against both).

Memory is bounded twice:

* `max_records` caps each of the three stores (idempotency, cache, kv) for the whole
  process; past it expired records go first, then the least recently used one.
* `limit_scope(scope, max_entries)` caps one scope (one upstream's stage under one
  configuration, the part of a key before `SCOPE_SEP`); stages call it with the policy's
  `idempotency.max_entries` / `cache.max_entries`. Past it the oldest record of that
  scope goes first.

What eviction means: an evicted cache entry is a later miss; an evicted *completed*
idempotency record means a later repeat of that call is sent upstream again (for Stripe
and PayPal the provider itself still deduplicates by the key, which the proxy forwards).

An *in-flight* idempotency claim is never evicted: dropping it would let a concurrent
duplicate through while the first call is still running. When only in-flight claims are
left to evict, the cap is exceeded until they complete, are released or lapse (at their
owner's deadline plus a margin); so the overshoot is bounded by the calls in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache

from proxy.state.base import SCOPE_SEP, IdempotencyClaim, StoredResponse

if TYPE_CHECKING:
    from proxy.clock import Clock

_MAX_SCOPES = 1024  # scope limits remembered (upstreams x recent configurations)
_PURGE_EVERY = 60.0  # at most this often, a full store drops its expired records first


@dataclass(slots=True)
class _Record:
    expires: float  # clock.now() value
    value: Any


@dataclass(slots=True)
class _IdemValue:
    state: str  # in_flight | completed
    fingerprint: str
    response: StoredResponse | None = None


def _never_pinned(_value: Any) -> bool:
    return False


def _in_flight(value: Any) -> bool:
    return isinstance(value, _IdemValue) and value.state == "in_flight"


class _Store:
    """One TTL store: per-record expiry, a global LRU cap, and optional per-scope caps.

    `pinned(value)` marks live records that eviction must skip (in-flight idempotency
    claims); they still expire, and a cap may be exceeded while only they are left.
    """

    def __init__(
        self,
        clock: Clock,
        max_records: int,
        scope_limits: LRUCache[str, int],
        pinned: Callable[[Any], bool] = _never_pinned,
    ) -> None:
        self._clock = clock
        self._max = max(1, max_records)
        self._pinned = pinned
        self._data: OrderedDict[str, _Record] = OrderedDict()  # least recently used first
        self._last_purge = clock.now()
        self._scope_limits = scope_limits
        # scope -> keys in insertion order (the oldest is trimmed first)
        self._scopes: LRUCache[str, OrderedDict[str, None]] = LRUCache(maxsize=_MAX_SCOPES)

    def get(self, key: str) -> Any | None:
        record = self._data.get(key)
        if record is None:
            return None
        if record.expires <= self._clock.now():
            self.delete(key)
            return None
        self._data.move_to_end(key)
        return record.value

    def set(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0:
            self.delete(key)
            return
        self._data[key] = _Record(self._clock.now() + ttl, value)
        self._data.move_to_end(key)
        scope, sep, _ = key.rpartition(SCOPE_SEP)
        limit = self._scope_limits.get(scope) if sep else None
        if limit is not None:
            keys = self._scopes.get(scope)
            if keys is None:
                keys = OrderedDict()
                self._scopes[scope] = keys
            keys[key] = None
            keys.move_to_end(key)
            self._trim(keys, limit, keep=key)
        if len(self._data) > self._max:
            now = self._clock.now()
            if now - self._last_purge >= _PURGE_EVERY:  # O(n): not on every insert
                self._last_purge = now
                self._purge_expired()
            self._trim(self._data, self._max, keep=key)

    def _evictable(self, key: str, now: float) -> bool:
        record = self._data.get(key)
        return record is None or record.expires <= now or not self._pinned(record.value)

    def _trim(self, order: OrderedDict[str, Any], limit: int, *, keep: str) -> None:
        """Drop the oldest evictable keys of `order` until at most `limit` are left.

        Pinned keys met on the way move to the back (each at most once per trim), so a
        trim costs O(evicted + pinned), and stops when only pinned keys (or `keep`, the
        key just written) are left."""
        now = self._clock.now()
        skipped = 0
        while len(order) > limit and skipped < len(order):
            oldest = next(iter(order))
            if oldest != keep and self._evictable(oldest, now):
                self.delete(oldest)
                order.pop(oldest, None)  # a scope's key whose record already went
            else:
                order.move_to_end(oldest)
                skipped += 1

    def _purge_expired(self) -> None:
        now = self._clock.now()
        for key in [k for k, r in self._data.items() if r.expires <= now]:
            self.delete(key)

    def delete(self, key: str) -> None:
        if self._data.pop(key, None) is None:
            return
        scope, sep, _ = key.rpartition(SCOPE_SEP)
        keys = self._scopes.get(scope) if sep else None
        if keys is not None:
            keys.pop(key, None)

    def __len__(self) -> int:
        self._purge_expired()
        return len(self._data)


class MemoryRecords:
    """Idempotency ledger, response cache and kv in process memory (see module doc)."""

    clock: Clock

    def __init__(self, *, max_records: int = 100_000) -> None:
        self.max_records = max_records
        self._scope_limits: LRUCache[str, int] = LRUCache(maxsize=_MAX_SCOPES)
        self._idem = _Store(self.clock, max_records, self._scope_limits, pinned=_in_flight)
        self._cache = _Store(self.clock, max_records, self._scope_limits)
        self._kv = _Store(self.clock, max_records, self._scope_limits)

    def limit_scope(self, scope: str, max_entries: int) -> None:
        """Cap the records of one scope (keys `scope|...`); memory backend only."""
        self._scope_limits[scope] = max(1, max_entries)

    # -- idempotency ledger (one Lua script each in Redis) ------------------------------
    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float
    ) -> IdempotencyClaim:
        """new: the caller now owns an in-flight record that lapses after `lock_ttl`
        (so a crashed owner does not block the key for ever); `ttl` is unused here and
        is given for symmetry with `idem_complete`."""
        current: _IdemValue | None = self._idem.get(key)
        if current is None:
            self._idem.set(key, _IdemValue("in_flight", fingerprint), lock_ttl)
            return IdempotencyClaim("new")
        if current.fingerprint != fingerprint:
            return IdempotencyClaim("mismatch")
        if current.state == "completed":
            return IdempotencyClaim("completed", current.response)
        return IdempotencyClaim("in_flight")

    async def idem_complete(self, key: str, response: StoredResponse, *, ttl: float) -> None:
        """Turn the in-flight record into a completed one kept for `ttl`.

        When the record is gone (its lock lapsed and it was evicted or expired) nothing is
        stored: the fingerprint is unknown, and a replay must never answer a different body.
        """
        current: _IdemValue | None = self._idem.get(key)
        if current is None or current.state != "in_flight":
            return
        self._idem.set(key, _IdemValue("completed", current.fingerprint, response), ttl)

    async def idem_release(self, key: str) -> None:
        current: _IdemValue | None = self._idem.get(key)
        if current is not None and current.state == "in_flight":
            self._idem.delete(key)

    # -- response cache -----------------------------------------------------------------
    async def cache_get(self, key: str) -> StoredResponse | None:
        value: StoredResponse | None = self._cache.get(key)
        return value

    async def cache_set(self, key: str, response: StoredResponse, *, ttl: float) -> None:
        self._cache.set(key, response, ttl)

    # -- small shared values ------------------------------------------------------------
    async def kv_get(self, key: str) -> bytes | None:
        value: bytes | None = self._kv.get(key)
        return value

    async def kv_set(self, key: str, value: bytes, *, ttl: float) -> None:
        self._kv.set(key, value, ttl)
