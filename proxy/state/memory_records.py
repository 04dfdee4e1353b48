"""In-process records: idempotency and fingerprint records, the failover routing ledger,
the response cache and small shared values.

A mixin of `proxy.state.memory.MemoryState` (which sets `self.clock` first). Each
operation below is self-contained and mirrors one Redis Lua script of the Redis backend,
so both backends keep the same semantics (tests/test_state_records.py runs against both).

Memory is bounded twice:

* `max_records` caps each of the four stores (idempotency, ledger, cache, kv) for the whole
  process; past it expired records go first, then the least recently used one.
* `limit_scope(scope, max_entries)` caps one scope (one upstream's stage under one
  configuration, the part of a key before `SCOPE_SEP`); stages call it with the policy's
  `idempotency.max_entries` / `cache.max_entries`. Past it the oldest record of that
  scope goes first.

What eviction means: an evicted cache entry is a later miss; an evicted *completed*
idempotency record means a later repeat of that call is sent upstream again (for Stripe
and PayPal the provider itself still deduplicates by the key, which the proxy forwards).

An *in-flight* idempotency claim is never evicted while its owner's lock runs: dropping it
would let a concurrent duplicate through while the first call is still running. When
only such claims are left to evict, the cap is exceeded until they complete, are released
or their lock lapses (at their owner's deadline plus a margin); so the overshoot is
bounded by the calls in flight. A claim whose lock lapsed is kept as *in doubt* for the
record's ttl (base.py), but may be evicted like a completed record.

Times here are `clock.now()` (monotonic): nothing in memory survives a restart. The
durable store (`proxy/state/sqlite.py`) keeps the same records with wall-clock times.
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
    state: str  # in_flight | in_doubt | completed
    fingerprint: str
    response: StoredResponse | None = None
    owner: str = ""  # in flight: the owner token ("" never matches a claim)
    lock_until: float = 0.0  # in flight: the end of the owner's lock (clock.now() value)


def _never_pinned(_value: Any) -> bool:
    return False


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

    def expires_in(self, key: str) -> float:
        """Seconds left of a record's life (0 when it is missing)."""
        record = self._data.get(key)
        return 0.0 if record is None else max(record.expires - self._clock.now(), 0.0)

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
    """Idempotency records, the routing ledger, the response cache and kv in process
    memory (see module doc)."""

    clock: Clock

    def __init__(self, *, max_records: int = 100_000) -> None:
        self.max_records = max_records
        self._scope_limits: LRUCache[str, int] = LRUCache(maxsize=_MAX_SCOPES)
        self._idem = _Store(self.clock, max_records, self._scope_limits, pinned=self._live_claim)
        self._cache = _Store(self.clock, max_records, self._scope_limits)
        self._kv = _Store(self.clock, max_records, self._scope_limits)
        self._ledger = _Store(self.clock, max_records, self._scope_limits)

    def _live_claim(self, value: Any) -> bool:
        """An in-flight record whose owner is still within its lock: never evicted."""
        return isinstance(value, _IdemValue) and value.state == "in_flight" and value.lock_until > self.clock.now()

    def limit_scope(self, scope: str, max_entries: int) -> None:
        """Cap the records of one scope (keys `scope|...`); memory backend only."""
        self._scope_limits[scope] = max(1, max_entries)

    # -- idempotency and fingerprint records (one Lua script each in Redis) -------------
    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
    ) -> IdempotencyClaim:
        """See `StateBackend.idem_claim`: a new record is in flight (owned by `owner`) for
        `lock_ttl` seconds and lives `lock_ttl + ttl` seconds in all, so that a lapsed
        claim is remembered as in doubt for `ttl` more seconds."""
        now = self.clock.now()
        ttl = max(ttl, 0.0)
        current: _IdemValue | None = self._idem.get(key)
        if current is not None:
            if current.fingerprint != fingerprint:
                return IdempotencyClaim("mismatch")
            if current.state == "completed":
                return IdempotencyClaim("completed", current.response)
            if current.state == "in_flight":
                if owner and current.owner == owner:
                    # The owner claims again (its first reply was lost): still its claim,
                    # lock renewed, the record's life never shortened.
                    if lock_ttl > 0:
                        current.lock_until = now + lock_ttl
                        left = self._idem.expires_in(key)
                        self._idem.set(key, current, max(left, lock_ttl + ttl))
                    return IdempotencyClaim("new")
                if current.lock_until > now:
                    return IdempotencyClaim("in_flight")
                # The lock lapsed without an outcome: in doubt for the rest of its life.
                current.state = "in_doubt"
                current.owner = ""
                current.lock_until = 0.0
            if not dedupes:
                return IdempotencyClaim("in_doubt")
        # Missing, expired, or in doubt and taken over by a caller whose upstream dedupes.
        self._idem.delete(key)
        if lock_ttl > 0:
            value = _IdemValue("in_flight", fingerprint, owner=owner, lock_until=now + lock_ttl)
            self._idem.set(key, value, lock_ttl + ttl)
        return IdempotencyClaim("new")

    async def idem_complete(
        self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
    ) -> None:
        """See `StateBackend.idem_complete`. A live completed record is kept (the first
        answer wins); an in-flight or in-doubt one (any owner) becomes completed; a missing
        one is stored under `fingerprint` (nothing when it is ""). A live record of another
        fingerprint is left alone: its answer must never be replayed to another request."""
        current: _IdemValue | None = self._idem.get(key)
        if current is not None:
            if current.state == "completed":
                return
            if fingerprint and current.fingerprint != fingerprint:
                return
            fingerprint = current.fingerprint
        elif not fingerprint:
            return
        self._idem.delete(key)
        if ttl > 0:
            self._idem.set(key, _IdemValue("completed", fingerprint, response), ttl)

    async def idem_release(self, key: str, owner: str = "") -> None:
        """Delete a live in-flight record owned by `owner` ("" matches any owner whose lock
        has not lapsed: a lapsed claim of an unknown owner stays, to become in doubt)."""
        current: _IdemValue | None = self._idem.get(key)
        if current is None or current.state != "in_flight":
            return
        if owner:
            if current.owner != owner:
                return
        elif current.lock_until <= self.clock.now():
            return
        self._idem.delete(key)

    # -- the failover routing ledger ----------------------------------------------------
    async def ledger_get(self, key: str) -> bytes | None:
        value: bytes | None = self._ledger.get(key)
        return value

    async def ledger_set(self, key: str, value: bytes, *, ttl: float) -> None:
        self._ledger.set(key, value, ttl)

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
