"""Redis trouble never fails a call: shared state with a time budget and a local fallback.

`ResilientState` wraps a `RedisState` (primary) and a `MemoryState` (fallback):

* Every operation gets `budget` seconds (default 50 ms) on Redis. An error or a timeout
  emits `StateBackendError` (metric `egressd_state_backend_errors_total{backend}`), logs
  (at most one line per `log_every` seconds, with a count of the ones left out) and
  answers that call from the fallback.
* Only trouble reaching Redis counts toward marking it down: a connection error
  (`redis.ConnectionError`, `OSError`: refused, reset, ...) marks it down at once;
  timeouts (the budget ran out, `redis.TimeoutError`) do after `down_after_timeouts` in a
  row with no success in between. Timeouts are counted when they complete, and the ones
  of operations that were already in flight when a timeout was counted are not counted
  again: one stall that times out fifty concurrent operations counts once. Any other
  error (a script error, an unexpected reply) is answered from the fallback for that one
  operation, logged and counted, and leaves Redis up.
* While Redis is down every operation goes straight to the fallback (no call pays the
  budget again), and a background probe PINGs Redis every `probe_interval` seconds; the
  first answer marks it up, and shared state resumes with the next operation.
* The shared rate falls back to a *local share*: the configured rate divided by the
  number of replicas that sent a heartbeat to Redis in the last `REPLICA_TTL` seconds
  (learned while Redis was up; 1 if it never was). The sum over replicas is then about
  the configured rate, as long as the replica count did not change during the outage.
* An idempotency key claimed locally stays local (completed, released and replayed from
  this replica's memory), even if Redis came back in between: Redis never saw the claim.
  So does a key Redis claimed but whose answer it could not take (it went away, or a
  Cluster master was failing over, between the claim and the answer): the answer is kept
  here, and a repeat on this replica is replayed instead of sent a second time.

Weaker while Redis is away (docs/scaling.md): each replica has its own circuit, retry
budget, pause and cache; a repeat of an idempotent call that lands on another replica is
not recognised by egressd (providers that deduplicate by key, e.g. Stripe, still do);
what was recorded locally is not copied to Redis afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.exceptions

from proxy.clock import Clock, RealClock
from proxy.events import EventBus, StateBackendError
from proxy.state.base import (
    CircuitAdmission,
    CircuitSettings,
    CircuitTransition,
    IdempotencyClaim,
    RateDecision,
    StoredResponse,
)
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState

log = logging.getLogger("egressd.state")

T = TypeVar("T")


def failure_kind(exc: BaseException) -> str:
    """`timeout`, `connection` (both count toward marking Redis down) or `other`."""
    if isinstance(exc, (TimeoutError, redis.exceptions.TimeoutError)):
        return "timeout"
    if isinstance(exc, (redis.exceptions.ConnectionError, OSError)):
        return "connection"
    return "other"
DEFAULT_BUDGET = 0.05
_MAX_LOCAL_CLAIMS = 100_000
# Completions this replica stored in Redis are also remembered here for a while. Redis
# replication is asynchronous: a Cluster master (or a lone Redis without persistence) can
# lose a record it had acknowledged. A repeat that then reaches this replica finds the
# answer here, is replayed, and the record is written to Redis again.
_RECENT_COMPLETIONS = 10_000
_RECENT_FOR = 300.0
_RECENT_MAX_BODY = 64 * 1024  # bounds the copies' memory: at most ~640 MB in the worst case


class ResilientState:
    """Implements `StateBackend`: Redis when it answers within the budget, memory otherwise."""

    name = "redis"

    def __init__(
        self,
        primary: RedisState,
        fallback: MemoryState | None = None,
        events: EventBus | None = None,
        *,
        budget: float = DEFAULT_BUDGET,
        probe_interval: float = 0.5,
        heartbeat_interval: float = 2.0,
        log_every: float = 10.0,
        down_after_timeouts: int = 3,
        clock: Clock | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback or MemoryState(clock)
        self.local = self.fallback  # per-replica state, also for `rate_limit.shared: false`
        self.events = events or EventBus()
        self.budget = budget
        self.probe_interval = probe_interval
        self.heartbeat_interval = heartbeat_interval
        self.log_every = log_every
        self.down_after_timeouts = max(down_after_timeouts, 1)
        self._timeouts = 0  # timeouts counted in a row (see `_failed`)
        self._started = 0  # operations started so far (a sequence number per operation)
        self._count_after = 0  # a timeout counts only for operations started from here on
        self.clock: Clock = clock or RealClock()
        self.up = True
        self.replicas = 1  # replicas seen in Redis lately (for the local share of a rate)
        self.errors = 0
        self.last_error: str | None = None
        self.down_since: float | None = None
        self._last_log = -1e18
        self._unlogged = 0
        self._local_claims: OrderedDict[str, None] = OrderedDict()
        # Claims Redis granted and that are not completed yet: key -> (fingerprint, lock_ttl),
        # so a completion Redis cannot take is kept locally instead (see `idem_complete`).
        self._redis_claims: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # key -> (fingerprint, answer, until): see _RECENT_COMPLETIONS.
        self._recent: OrderedDict[str, tuple[str, StoredResponse, float]] = OrderedDict()
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._warm = False

    # -- the guard -------------------------------------------------------------------------
    async def connect(self) -> bool:
        """Warm the connection pool and count replicas now; False if Redis is away."""
        try:
            async with asyncio.timeout(max(self.budget * 20, 1.0)):
                await self.primary.warm()
                self.replicas = await self.primary.heartbeat()
        except Exception as exc:
            self._timeouts = self.down_after_timeouts
            self._failed("connect", exc)
            return False
        self._warm = True
        return True

    def start(self) -> None:
        """Start the probe / heartbeat now (it also starts with the first operation)."""
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        if self._probe is None and not self._closed:
            self._probe = asyncio.get_running_loop().create_task(self._probe_loop())

    async def _guard(
        self, operation: str, primary: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        self._ensure_probe()
        if not self.up:
            return await fallback()
        seq = self._started
        self._started += 1
        try:
            async with asyncio.timeout(self.budget):
                result = await primary()
        except Exception as exc:  # TimeoutError included: the budget ran out
            self._failed(operation, exc, seq)
            return await fallback()
        self._timeouts = 0
        return result

    def _failed(self, operation: str, exc: BaseException, seq: int | None = None) -> None:
        """Count, log and classify one failed operation (`seq`: its sequence number)."""
        kind = failure_kind(exc)
        if kind == "timeout":
            error = f"no answer within {self.budget * 1000:g} ms"
            if isinstance(exc, redis.exceptions.TimeoutError):
                error = f"{type(exc).__name__}: {exc}"
        else:
            error = f"{type(exc).__name__}: {exc}"
        self.errors += 1
        self.last_error = error[:200]
        if kind == "connection":
            self._timeouts = self.down_after_timeouts  # refused, reset...: Redis is away
        elif kind == "timeout" and (seq is None or seq >= self._count_after):
            # One slow answer may be a blip (or this process's own event loop being busy);
            # operations that were in flight together during one stall count once.
            self._timeouts += 1
            self._count_after = self._started
        if self.up and self._timeouts >= self.down_after_timeouts:
            self.up = False
            self.down_since = self.clock.wall()
        self.events.emit(StateBackendError(self.name, operation, self.last_error))
        now = self.clock.now()
        if now - self._last_log >= self.log_every:
            message = (
                "redis state operation failed; answered from local state"
                if kind == "other"
                else "redis state backend unavailable; using local state until it answers again"
            )
            log.warning(
                message,
                extra={
                    "operation": operation,
                    "error": self.last_error,
                    "suppressed": self._unlogged,
                    "local_rate_share": f"1/{self.replicas}",
                },
            )
            self._last_log = now
            self._unlogged = 0
        else:
            self._unlogged += 1

    async def _probe_loop(self) -> None:
        """Reconnects (PING until Redis answers) and keeps the replica heartbeat fresh."""
        since_beat = self.heartbeat_interval  # beat at once
        while True:
            try:
                async with asyncio.timeout(max(self.budget * 10, 0.5)):
                    if not self._warm:
                        await self.primary.warm()
                        self._warm = True
                    if not self.up:
                        await self.primary.warm()
                        self.up = True
                        self._timeouts = 0
                        self.down_since = None
                        log.warning("redis state backend is back; shared state resumes")
                        since_beat = self.heartbeat_interval
                    if since_beat >= self.heartbeat_interval:
                        self.replicas = await self.primary.heartbeat()
                        since_beat = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.up:
                    self._failed("probe", exc)
            await asyncio.sleep(self.probe_interval)
            since_beat += self.probe_interval

    def health(self) -> str:
        if self.up:
            return "ok"
        return f"degraded: {self.last_error}; local state, rate share 1/{self.replicas}"

    # -- rate limiting and upstream back-pressure ---------------------------------------------
    async def rate_take(self, key: str, *, interval: float, burst: int, max_wait: float) -> RateDecision:
        return await self._guard(
            "rate_take",
            lambda: self.primary.rate_take(key, interval=interval, burst=burst, max_wait=max_wait),
            lambda: self.fallback.rate_take(
                key, interval=interval * self.replicas, burst=max(burst // self.replicas, 1), max_wait=max_wait
            ),
        )

    async def pause(self, key: str, seconds: float) -> None:
        await self.fallback.pause(key, seconds)  # cheap; keeps the pause if Redis goes away
        await self._guard("pause", lambda: self.primary.pause(key, seconds), _none)

    async def paused_for(self, key: str) -> float:
        return await self._guard(
            "paused_for", lambda: self.primary.paused_for(key), lambda: self.fallback.paused_for(key)
        )

    # -- retry budget -------------------------------------------------------------------------
    async def budget_record(self, key: str, *, window: float, retry: bool) -> None:
        await self._guard(
            "budget_record",
            lambda: self.primary.budget_record(key, window=window, retry=retry),
            lambda: self.fallback.budget_record(key, window=window, retry=retry),
        )

    async def budget_try_retry(self, key: str, *, window: float, ratio: float, min_per_second: float) -> bool:
        return await self._guard(
            "budget_try_retry",
            lambda: self.primary.budget_try_retry(key, window=window, ratio=ratio, min_per_second=min_per_second),
            lambda: self.fallback.budget_try_retry(key, window=window, ratio=ratio, min_per_second=min_per_second),
        )

    # -- circuit breaker ------------------------------------------------------------------------
    async def circuit_admit(self, key: str, settings: CircuitSettings) -> CircuitAdmission:
        return await self._guard(
            "circuit_admit",
            lambda: self.primary.circuit_admit(key, settings),
            lambda: self.fallback.circuit_admit(key, settings),
        )

    async def circuit_record(
        self, key: str, settings: CircuitSettings, *, failure: bool, trial: bool
    ) -> CircuitTransition:
        return await self._guard(
            "circuit_record",
            lambda: self.primary.circuit_record(key, settings, failure=failure, trial=trial),
            lambda: self.fallback.circuit_record(key, settings, failure=failure, trial=trial),
        )

    async def circuit_release(self, key: str, settings: CircuitSettings) -> None:
        await self._guard(
            "circuit_release",
            lambda: self.primary.circuit_release(key, settings),
            lambda: self.fallback.circuit_release(key, settings),
        )

    async def circuit_state(self, key: str, settings: CircuitSettings) -> str:
        return await self._guard(
            "circuit_state",
            lambda: self.primary.circuit_state(key, settings),
            lambda: self.fallback.circuit_state(key, settings),
        )

    # -- idempotency ledger ---------------------------------------------------------------------
    def _remembered(self, key: str, fingerprint: str) -> IdempotencyClaim | None:
        """The answer to a claim from this replica's copy of a recent completion, if any."""
        remembered = self._recent.get(key)
        if remembered is None or remembered[2] <= self.clock.now():
            return None
        known_fingerprint, answer, _ = remembered
        if known_fingerprint != fingerprint:
            return IdempotencyClaim("mismatch")
        return IdempotencyClaim("completed", answer)

    async def _claim_locally(self, key: str, fingerprint: str, ttl: float, lock_ttl: float) -> IdempotencyClaim:
        # Redis is away: a call this replica completed through Redis is still replayed.
        known = self._remembered(key, fingerprint)
        if known is not None:
            return known
        claim = await self.fallback.idem_claim(key, fingerprint, ttl=ttl, lock_ttl=lock_ttl)
        if claim.state == "new":
            self._local_claims[key] = None
            while len(self._local_claims) > _MAX_LOCAL_CLAIMS:
                self._local_claims.popitem(last=False)
        return claim

    async def idem_claim(self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float) -> IdempotencyClaim:
        if key in self._local_claims:
            return await self._claim_locally(key, fingerprint, ttl, lock_ttl)
        return await self._guard(
            "idem_claim",
            lambda: self._claim_in_redis(key, fingerprint, ttl, lock_ttl),
            lambda: self._claim_locally(key, fingerprint, ttl, lock_ttl),
        )

    async def _claim_in_redis(self, key: str, fingerprint: str, ttl: float, lock_ttl: float) -> IdempotencyClaim:
        claim = await self.primary.idem_claim(key, fingerprint, ttl=ttl, lock_ttl=lock_ttl)
        if claim.state == "new":
            known = self._remembered(key, fingerprint)
            if known is not None:
                # Redis lost a record this replica completed: answer from the copy, and
                # put the record back so other replicas see it again.
                if known.response is None:
                    await self.primary.idem_release(key)
                else:
                    await self.primary.idem_complete(key, known.response, ttl=ttl)
                return known
            self._redis_claims[key] = (fingerprint, lock_ttl)
            while len(self._redis_claims) > _MAX_LOCAL_CLAIMS:
                self._redis_claims.popitem(last=False)
        return claim

    async def idem_complete(self, key: str, response: StoredResponse, *, ttl: float) -> None:
        claimed = self._redis_claims.pop(key, None)
        if key in self._local_claims:  # kept: a repeat on this replica replays locally
            await self.fallback.idem_complete(key, response, ttl=ttl)
            return

        async def keep_locally() -> None:
            # Redis granted the claim but cannot take the answer (it went away in between, or
            # a Cluster master is failing over): keep it here, so a repeat on this replica is
            # replayed instead of sent again (the upstream already acted once).
            if claimed is None:
                return
            fingerprint, lock_ttl = claimed
            if (await self._claim_locally(key, fingerprint, ttl, lock_ttl)).state == "new":
                await self.fallback.idem_complete(key, response, ttl=ttl)

        await self._guard("idem_complete", lambda: self.primary.idem_complete(key, response, ttl=ttl), keep_locally)
        if claimed is not None and len(response.body) <= _RECENT_MAX_BODY:
            self._recent[key] = (claimed[0], response, self.clock.now() + min(ttl, _RECENT_FOR))
            self._recent.move_to_end(key)
            while len(self._recent) > _RECENT_COMPLETIONS:
                self._recent.popitem(last=False)

    async def idem_release(self, key: str) -> None:
        self._redis_claims.pop(key, None)
        if key in self._local_claims:
            del self._local_claims[key]
            await self.fallback.idem_release(key)
            return
        await self._guard("idem_release", lambda: self.primary.idem_release(key), _none)

    # -- response cache and small shared values ----------------------------------------------------
    async def cache_get(self, key: str) -> StoredResponse | None:
        return await self._guard("cache_get", lambda: self.primary.cache_get(key), lambda: self.fallback.cache_get(key))

    async def cache_set(self, key: str, response: StoredResponse, *, ttl: float) -> None:
        await self._guard(
            "cache_set",
            lambda: self.primary.cache_set(key, response, ttl=ttl),
            lambda: self.fallback.cache_set(key, response, ttl=ttl),
        )

    async def kv_get(self, key: str) -> bytes | None:
        return await self._guard("kv_get", lambda: self.primary.kv_get(key), lambda: self.fallback.kv_get(key))

    async def kv_set(self, key: str, value: bytes, *, ttl: float) -> None:
        await self._guard(
            "kv_set",
            lambda: self.primary.kv_set(key, value, ttl=ttl),
            lambda: self.fallback.kv_set(key, value, ttl=ttl),
        )

    def limit_scope(self, scope: str, max_entries: int) -> None:
        """Per-scope caps apply to the local fallback (Redis is bounded by TTLs and maxmemory)."""
        self.fallback.limit_scope(scope, max_entries)

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        with contextlib.suppress(Exception):
            await self.primary.close()
        await self.fallback.close()


async def _none() -> None:
    return None


def open_shared_state(url: str, *, prefix: str = "egressd:", events: EventBus | None = None) -> ResilientState:
    """What `egressd run --redis URL` uses: a `RedisState` wrapped in a `ResilientState`.

    The URL may carry `budget_ms=N` (the per-operation time budget, default 50) in its
    query; it is taken out before the URL reaches redis-py.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query)
    budget = DEFAULT_BUDGET
    kept: list[tuple[str, str]] = []
    for name, value in query:
        if name == "budget_ms":
            budget = float(value) / 1000.0
        else:
            kept.append((name, value))
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(kept), parts.fragment))
    state = ResilientState(RedisState(clean, prefix=prefix), MemoryState(), events, budget=budget)
    # With a running loop, start the background probe now: it warms the connection pool
    # and counts replicas without blocking this call (nothing is connected here). Without
    # one (RuntimeError), it starts with the first operation instead.
    with contextlib.suppress(RuntimeError):
        state.start()
    return state
