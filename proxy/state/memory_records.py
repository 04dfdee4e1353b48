"""In-process records: the idempotency ledger, the response cache and small shared values.

A mixin of `proxy.state.memory.MemoryState` (which sets `self.clock` first). Each
operation below is self-contained and mirrors one Redis Lua script of the Redis backend,
so both backends keep the same semantics (tests/test_state_records.py runs against both).

Memory is bounded twice:

* `max_records` caps each of the three stores (idempotency, cache, kv) for the whole
  process; past it the least recently used record goes first.
* `limit_scope(scope, max_entries)` caps one scope (one upstream's stage under one
  configuration, the part of a key before `SCOPE_SEP`); stages call it with the policy's
  `idempotency.max_entries` / `cache.max_entries`. Past it the oldest record of that
  scope goes first.

What eviction means: an evicted cache entry is a later miss; an evicted idempotency
record means a later repeat of that call is sent upstream again (for Stripe and PayPal
the provider itself still deduplicates by the key, which the proxy forwards).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import LRUCache, TLRUCache

from proxy.state.base import IdempotencyClaim, StoredResponse

if TYPE_CHECKING:
    from proxy.clock import Clock

# Keys built by the stages look like `<state_key scope>|<digest>`.
SCOPE_SEP = "|"
_MAX_SCOPES = 1024  # scope limits remembered (upstreams x recent configurations)


@dataclass(slots=True)
class _Record:
    expires: float  # clock.now() value
    value: Any


@dataclass(slots=True)
class _IdemValue:
    state: str  # in_flight | completed
    fingerprint: str
    response: StoredResponse | None = None


def _ttu(_key: str, record: _Record, _now: float) -> float:
    return record.expires


class _Store:
    """One TTL store: per-record expiry, a global LRU cap, and optional per-scope caps."""

    def __init__(self, clock: Clock, max_records: int, scope_limits: LRUCache[str, int]) -> None:
        self._clock = clock
        self._data: TLRUCache[str, _Record] = TLRUCache(maxsize=max_records, ttu=_ttu, timer=clock.now)
        self._scope_limits = scope_limits
        # scope -> keys in insertion order; may hold keys that already expired (they are
        # the oldest, so they are trimmed first).
        self._scopes: LRUCache[str, OrderedDict[str, None]] = LRUCache(maxsize=_MAX_SCOPES)

    def get(self, key: str) -> Any | None:
        record = self._data.get(key)
        if record is None or record.expires <= self._clock.now():
            return None
        return record.value

    def set(self, key: str, value: Any, ttl: float) -> None:
        if ttl <= 0:
            self.delete(key)
            return
        self._data[key] = _Record(self._clock.now() + ttl, value)
        scope, sep, _ = key.rpartition(SCOPE_SEP)
        limit = self._scope_limits.get(scope) if sep else None
        if limit is None:
            return
        keys = self._scopes.get(scope)
        if keys is None:
            keys = OrderedDict()
            self._scopes[scope] = keys
        keys[key] = None
        keys.move_to_end(key)
        while len(keys) > limit:
            old, _ = keys.popitem(last=False)
            self._data.pop(old, None)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        self._data.expire()
        return len(self._data)


class MemoryRecords:
    """Idempotency ledger, response cache and kv in process memory (see module doc)."""

    clock: Clock

    def __init__(self, *, max_records: int = 100_000) -> None:
        self.max_records = max_records
        self._scope_limits: LRUCache[str, int] = LRUCache(maxsize=_MAX_SCOPES)
        self._idem = _Store(self.clock, max_records, self._scope_limits)
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
