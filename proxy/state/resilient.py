"""Redis trouble never fails a call, and never lets two replicas send the same claimed call.

`ResilientState` wraps a `RedisState` (primary) and a `MemoryState` (fallback):

* Every operation gets `budget` seconds (default 50 ms) on Redis; idempotency claims get
  their own, longer `claim_budget` (default max(budget, 250 ms)). An error or a timeout
  emits `StateBackendError` (metric `egressd_state_backend_errors_total{backend}`) and
  logs (at most one line per `log_every` seconds, with a count of the ones left out).
  What then answers the call depends on the operation (below).
* Only trouble reaching Redis counts toward marking it down: a connection error
  (`redis.ConnectionError`, `OSError`: refused, reset, ...) marks it down at once;
  timeouts (the budget ran out, `redis.TimeoutError`) do after `down_after_timeouts` in a
  row with no success in between. Timeouts are counted when they complete, and the ones
  of operations that were already in flight when a timeout was counted are not counted
  again: one stall that times out fifty concurrent operations counts once. Any other
  error (a script error, an unexpected reply) is handled like a timeout for that one
  operation, logged and counted, and leaves Redis up.
* While Redis is down no operation goes to Redis (no call pays the budget again), except
  the claims that may not be decided locally (below), and a background probe PINGs
  Redis every `probe_interval` seconds; the first answer marks it up, the write-back
  queue (below) is written, and shared state resumes.

What holds while Redis is slow or away:

* *Rate limit, pause, retry budget, circuit, cache, kv*: answered from the fallback
  (per replica). The shared rate falls back to a *local share*: the configured rate
  divided by the number of replicas that sent a heartbeat to Redis in the last
  `REPLICA_TTL` seconds (learned while Redis was up; 1 if it never was). The sum over
  replicas is then about the configured rate, as long as the replica count did not
  change during the outage. Cache entries and limit state written locally stay local.
* *Idempotency and fingerprint claims* (`idem_claim`) are never decided from this
  replica's memory alone, because two replicas would then both send the call (contract
  7.2). Such a claim is sent to Redis even while it is marked down (it may be back
  before the probe notices, or, in a Cluster, the claim's slot may live on a master
  that is up; the completion or release of a claim Redis granted is too). A claim Redis
  does not answer within `claim_budget` (a timeout or an error) raises
  `RecordsUnavailable`, except that a recorded answer this replica knows (its recent
  completions, and those waiting to be written back) is still replayed, and that a
  claim with `dedupes=True` (the upstream deduplicates on the key sent: Stripe, PayPal,
  `upstream_dedupes`) is decided locally as before. A key claimed locally stays local
  on this replica (completed, released and replayed from its memory); its completion is
  also written back to Redis.
* A claim that timed out may still have run in Redis, under its `owner`: the (key,
  owner) is remembered. Claims are idempotent per owner, so the caller's retry with the
  same owner gets its claim ("new"). If the caller gives up it calls `abandon_claim`,
  which releases the record now or, if Redis does not answer, queues the release for
  write-back. A remembered claim that nobody retried nor abandoned before its lock ended
  is released the same way.
* *Completions and the routing ledger are never lost*: a completion (`idem_complete`) or
  a `ledger_set` that Redis cannot take, and every completion of a locally claimed key,
  is kept here and put in a bounded write-back queue (`WRITE_BACK_MAX` records,
  `WRITE_BACK_BYTES`); a release Redis could not take is queued too. While Redis is up
  the probe loop writes the queue, oldest first: completions with their fingerprint
  (`idem_complete` never overwrites a completed record, so the first answer wins, and
  stores the record even when Redis restarted empty), releases only of the owner's own
  in-flight record, ledger entries for the rest of their ttl. If the queue overflows the
  oldest entries are dropped (counted, logged).
* Each replica also keeps a bounded copy of the completions it stored through Redis
  (`_RECENT_COMPLETIONS` answers of up to 64 KiB, for 5 minutes): a repeat on this
  replica is replayed from it when Redis lost the record (asynchronous replication
  during a Cluster failover, a restart without persistence) or cannot be reached, and
  the record is then written to Redis again.
* `health()` is `degraded: ...` while Redis is down, while claims are being refused (a
  `RecordsUnavailable` within the last `refusal_window` seconds) or while the write-back
  queue is not empty, with the counts; `records_snapshot()` has the same counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
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
    RecordsUnavailable,
    StoredResponse,
)
from proxy.state.memory import MemoryState
from proxy.state.redis import RedisState

if TYPE_CHECKING:
    from proxy.outbox.store import OutboxStore

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
# Claims wait longer than other operations: a claim Redis does not answer is refused
# (`RecordsUnavailable`), not decided locally, so a short stall should not refuse it.
CLAIM_BUDGET = 0.25
REFUSAL_WINDOW = 10.0  # health says "degraded" for this long after a refused claim
_MAX_LOCAL_CLAIMS = 100_000
# Completions this replica stored in Redis are also remembered here for a while. Redis
# replication is asynchronous: a Cluster master (or a lone Redis without persistence) can
# lose a record it had acknowledged. A repeat that then reaches this replica finds the
# answer here, is replayed, and the record is written to Redis again.
_RECENT_COMPLETIONS = 10_000
_RECENT_FOR = 300.0
_RECENT_MAX_BODY = 64 * 1024  # bounds the copies' memory: at most ~640 MB in the worst case
# The write-back queue: what Redis could not take, written when it answers again.
WRITE_BACK_MAX = 10_000
WRITE_BACK_BYTES = 256 * 1024 * 1024


class _NoAnswer(Exception):
    """Redis did not answer an operation (down, failed or too slow); already counted."""


@dataclass(slots=True)
class _Completion:
    fingerprint: str
    response: StoredResponse
    until: float  # clock.now() value: the end of the record's ttl


@dataclass(slots=True)
class _Release:
    owner: str


@dataclass(slots=True)
class _Ledger:
    value: bytes
    until: float


_Pending = _Completion | _Release | _Ledger


def _size(entry: _Pending) -> int:
    if isinstance(entry, _Completion):
        r = entry.response
        return len(r.body) + sum(len(k) + len(v) for k, v in r.headers) + 200
    if isinstance(entry, _Ledger):
        return len(entry.value) + 100
    return 100


class ResilientState:
    """Implements `StateBackend`: Redis when it answers within the budget, memory otherwise
    (except for claims that must not be decided locally; see the module doc)."""

    name = "redis"

    def __init__(
        self,
        primary: RedisState,
        fallback: MemoryState | None = None,
        events: EventBus | None = None,
        *,
        budget: float = DEFAULT_BUDGET,
        claim_budget: float | None = None,
        probe_interval: float = 0.5,
        heartbeat_interval: float = 2.0,
        log_every: float = 10.0,
        down_after_timeouts: int = 3,
        refusal_window: float = REFUSAL_WINDOW,
        clock: Clock | None = None,
    ) -> None:
        self.primary = primary
        # The probe loop beats, so claims may judge the owners of in-flight records dead.
        expect_heartbeats = getattr(primary, "expect_heartbeats", None)
        if callable(expect_heartbeats):
            expect_heartbeats()
        self.fallback = fallback or MemoryState(clock)
        self.local = self.fallback  # per-replica state, also for `rate_limit.shared: false`
        self.events = events or EventBus()
        self.budget = budget
        self.claim_budget = max(budget, CLAIM_BUDGET) if claim_budget is None else claim_budget
        self.probe_interval = probe_interval
        self.heartbeat_interval = heartbeat_interval
        self.log_every = log_every
        self.down_after_timeouts = max(down_after_timeouts, 1)
        self.refusal_window = refusal_window
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
        # Keys claimed in this replica's memory (dedupes=True while Redis was away):
        # key -> fingerprint. They stay local (see the module doc).
        self._local_claims: OrderedDict[str, str] = OrderedDict()
        # Claims Redis granted and that are not completed yet: key -> (fingerprint, owner),
        # so a completion Redis cannot take is kept (and written back) under it.
        self._redis_claims: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Claims that got no answer and may have run in Redis: (key, owner) -> the end of
        # their lock (clock.now()); released if neither retried nor abandoned by then.
        self._unsettled: OrderedDict[tuple[str, str], float] = OrderedDict()
        # key -> (fingerprint, answer, until): see _RECENT_COMPLETIONS.
        self._recent: OrderedDict[str, tuple[str, StoredResponse, float]] = OrderedDict()
        # The write-back queue, oldest first: ("complete" | "release" | "ledger", key,
        # owner) -> what to write.
        self._write_back: OrderedDict[tuple[str, str, str], _Pending] = OrderedDict()
        self._write_back_bytes = 0
        self._ledger_ttls: OrderedDict[str, float] = OrderedDict()  # key -> until, for write-back
        self.claims_refused = 0
        self._last_refused: float | None = None
        self.written_back = 0
        self.write_backs_dropped = 0
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._warm = False
        self._outbox: OutboxStore | None = None

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

    async def _on_redis(
        self,
        operation: str,
        primary: Callable[[], Awaitable[T]],
        budget: float | None = None,
        *,
        repeatable: bool = False,
        even_if_down: bool = False,
    ) -> T:
        """`primary()` on Redis within `budget`; `_NoAnswer` (counted, logged) if Redis is
        down, fails or is too slow. `_NoAnswer.__cause__` is None when nothing was sent.

        `repeatable`: the operation may safely run twice (a claim with an owner, a
        completion, a release by owner, a ledger write), so a connection error is tried
        again at once, within the same budget: after a Redis restart the pool's first
        connections fail with "Connection closed by server" although Redis is back.

        `even_if_down`: tried even while Redis is marked down (a claim that must not be
        decided locally: Redis may be back before the probe sees it, or, in a Cluster,
        the claim's slot may be on a master that is up)."""
        self._ensure_probe()
        if not self.up and not even_if_down:
            raise _NoAnswer(operation)
        budget = self.budget if budget is None else budget
        seq = self._started
        self._started += 1
        try:
            async with asyncio.timeout(budget):
                if repeatable:
                    result = await _repeating(primary)
                else:
                    result = await primary()
        except Exception as exc:  # TimeoutError included: the budget ran out
            self._failed(operation, exc, seq, budget)
            raise _NoAnswer(operation) from exc
        self._timeouts = 0
        return result

    async def _guard(
        self, operation: str, primary: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            return await self._on_redis(operation, primary)
        except _NoAnswer:
            return await fallback()

    def _failed(self, operation: str, exc: BaseException, seq: int | None = None, budget: float | None = None) -> None:
        """Count, log and classify one failed operation (`seq`: its sequence number)."""
        kind = failure_kind(exc)
        if kind == "timeout":
            error = f"no answer within {(self.budget if budget is None else budget) * 1000:g} ms"
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
        """Reconnects (PING until Redis answers), keeps the replica heartbeat fresh and
        writes the write-back queue while Redis answers."""
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
                        log.warning(
                            "redis state backend is back; shared state resumes",
                            extra={"write_backs_pending": len(self._write_back)},
                        )
                        since_beat = self.heartbeat_interval
                    if since_beat >= self.heartbeat_interval:
                        # (a heartbeat may run twice: it only refreshes this replica's entry)
                        self.replicas = await _repeating(self.primary.heartbeat)
                        since_beat = 0.0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.up:
                    self._failed("probe", exc)
            if self.up:
                try:
                    self._settle_lapsed_claims()
                    if self._write_back:
                        await self.flush_write_back()
                except Exception:  # never let the probe die
                    log.exception("redis write-back failed")
            await asyncio.sleep(self.probe_interval)
            since_beat += self.probe_interval

    def health(self) -> str:
        parts: list[str] = []
        if not self.up:
            parts.append(f"{self.last_error}; local state, rate share 1/{self.replicas}")
        elif self._refusing():
            parts.append(f"idempotency claims refused in the last {self.refusal_window:g} s ({self.last_error})")
        if not parts and not self._write_back:
            return "ok"
        parts.append(f"claims refused: {self.claims_refused}, write-backs pending: {len(self._write_back)}")
        return "degraded: " + "; ".join(parts)

    def _refusing(self) -> bool:
        return self._last_refused is not None and self.clock.now() - self._last_refused < self.refusal_window

    def records_snapshot(self) -> dict[str, Any]:
        """Counts for /status.json (no keys, no values)."""
        return {
            "claims_refused": self.claims_refused,
            "refusing_claims": self._refusing(),
            "claims_unsettled": len(self._unsettled),
            "local_claims": len(self._local_claims),
            "write_backs_pending": len(self._write_back),
            "write_backs_done": self.written_back,
            "write_backs_dropped": self.write_backs_dropped,
        }

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

    # -- idempotency and fingerprint records ---------------------------------------------------
    def _remembered(self, key: str, fingerprint: str) -> IdempotencyClaim | None:
        """The answer to a claim from what this replica knows was completed: a completion
        waiting to be written back, or the copy of a recent completion."""
        now = self.clock.now()
        pending = self._write_back.get(("complete", key, ""))
        if isinstance(pending, _Completion) and pending.until > now:
            known_fingerprint, answer = pending.fingerprint, pending.response
        else:
            remembered = self._recent.get(key)
            if remembered is None or remembered[2] <= now:
                return None
            known_fingerprint, answer, _ = remembered
        if not known_fingerprint:
            return None  # which request it answers is unknown: never replayed
        if known_fingerprint != fingerprint:
            return IdempotencyClaim("mismatch")
        return IdempotencyClaim("completed", answer)

    async def _claim_locally(
        self, key: str, fingerprint: str, ttl: float, lock_ttl: float, owner: str, dedupes: bool
    ) -> IdempotencyClaim:
        known = self._remembered(key, fingerprint)
        if known is not None:
            return known
        claim = await self.fallback.idem_claim(
            key, fingerprint, ttl=ttl, lock_ttl=lock_ttl, owner=owner, dedupes=dedupes
        )
        if claim.state == "new":
            self._local_claims[key] = fingerprint
            self._local_claims.move_to_end(key)
            while len(self._local_claims) > _MAX_LOCAL_CLAIMS:
                self._local_claims.popitem(last=False)
        return claim

    def _refuse(self) -> RecordsUnavailable:
        self.claims_refused += 1
        self._last_refused = self.clock.now()
        return RecordsUnavailable(f"shared records unavailable: {self.last_error}")

    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
    ) -> IdempotencyClaim:
        """Redis decides, within `claim_budget`. Without an answer: `dedupes=True` decides
        locally; otherwise a known answer is replayed or `RecordsUnavailable` is raised.

        A claim that raised may have run in Redis under `owner`: the caller retries with
        the same `owner` (claims are idempotent per owner), and calls `abandon_claim(key,
        owner)` if it gives up, so that the record is released (now, or when Redis answers
        again). A claim neither retried nor abandoned is released when its lock ends.
        """
        if key in self._local_claims:
            local = await self._claim_locally(key, fingerprint, ttl, lock_ttl, owner, dedupes)
            if local.state != "new" or dedupes:
                return local
            # A new claim for an upstream that does not deduplicate is never decided here.
            await self.fallback.idem_release(key, owner)
            self._local_claims.pop(key, None)
        elif (known := self._remembered_pending(key, fingerprint)) is not None:
            return known  # Redis does not have this answer yet (it is queued for it)
        try:
            claim = await self._on_redis(
                "idem_claim",
                lambda: self.primary.idem_claim(
                    key, fingerprint, ttl=ttl, lock_ttl=lock_ttl, owner=owner, dedupes=dedupes
                ),
                self.claim_budget,
                repeatable=bool(owner),  # claims are idempotent per owner
                even_if_down=not dedupes,  # the alternative is a refusal
            )
        except _NoAnswer as exc:
            if exc.__cause__ is not None and owner:
                # Sent, but no answer: it may have run. Settled by a retry, `abandon_claim`
                # or the end of its lock.
                self._unsettled[(key, owner)] = self.clock.now() + lock_ttl
                self._unsettled.move_to_end((key, owner))
                while len(self._unsettled) > _MAX_LOCAL_CLAIMS:
                    (old_key, old_owner), _ = self._unsettled.popitem(last=False)
                    self._queue(("release", old_key, old_owner), _Release(old_owner))
            if dedupes:
                return await self._claim_locally(key, fingerprint, ttl, lock_ttl, owner, dedupes)
            known = self._remembered(key, fingerprint)
            if known is not None:
                return known
            raise self._refuse() from None
        if claim.state == "new":
            # This owner holds the record now, whatever an earlier attempt did. (Another
            # answer leaves an unsettled attempt as it is: it may still run after this one.)
            self._unsettled.pop((key, owner), None)
            known = self._remembered(key, fingerprint)
            if known is not None:
                # Redis lost a record this replica completed: answer from the copy, and
                # put the record back so other replicas see it again.
                if known.response is None:
                    await self._release_in_redis(key, owner)
                else:
                    await self._complete_in_redis(key, known.response, ttl, fingerprint, owner)
                return known
            self._redis_claims[key] = (fingerprint, owner)
            self._redis_claims.move_to_end(key)
            while len(self._redis_claims) > _MAX_LOCAL_CLAIMS:
                self._redis_claims.popitem(last=False)
        return claim

    def _remembered_pending(self, key: str, fingerprint: str) -> IdempotencyClaim | None:
        """Only a completion waiting to be written back (Redis would not know it)."""
        if ("complete", key, "") not in self._write_back:
            return None
        return self._remembered(key, fingerprint)

    async def abandon_claim(self, key: str, owner: str) -> None:
        """The caller gives up a claim it could not get (`RecordsUnavailable` until its
        deadline; the idempotency stage then answers 503 `state_unavailable`): if one of
        its attempts ran in Redis, the record is released now, or, if Redis does not
        answer, the release is queued and written when Redis is back. Only `owner`'s own
        in-flight record is touched. Never raises."""
        if not owner:
            return
        may_hold = self._unsettled.pop((key, owner), None) is not None
        held = self._redis_claims.get(key)
        if held is not None and held[1] == owner:
            del self._redis_claims[key]
            may_hold = True
        if may_hold:
            await self._release_in_redis(key, owner, "abandon_claim")
        elif self.up:
            # Every attempt was refused before it reached Redis, as far as we know; a
            # release costs one round trip and is harmless.
            with contextlib.suppress(_NoAnswer):
                await self._on_redis(
                    "abandon_claim", lambda: self.primary.idem_release(key, owner), self.claim_budget, repeatable=True
                )

    def _settle_lapsed_claims(self) -> None:
        """Unsettled claims whose lock ended: their caller is gone; release them."""
        if not self._unsettled:
            return
        now = self.clock.now()
        for (key, owner), until in list(self._unsettled.items()):
            if until <= now:
                del self._unsettled[(key, owner)]
                self._queue(("release", key, owner), _Release(owner))

    async def _release_in_redis(
        self, key: str, owner: str, operation: str = "idem_release", *, even_if_down: bool = False
    ) -> None:
        """Release `owner`'s record in Redis now, or queue the release (owner "" is only
        tried now: a queued release of any owner could free a later claim)."""
        try:
            await self._on_redis(
                operation,
                lambda: self.primary.idem_release(key, owner),
                self.claim_budget,
                repeatable=bool(owner),
                even_if_down=even_if_down,
            )
        except _NoAnswer:
            if owner:
                self._queue(("release", key, owner), _Release(owner))

    async def _complete_in_redis(
        self,
        key: str,
        response: StoredResponse,
        ttl: float,
        fingerprint: str,
        owner: str,
        *,
        even_if_down: bool = False,
    ) -> bool:
        """Store the completion in Redis now, or queue it for write-back; True if stored now."""
        try:
            await self._on_redis(
                "idem_complete",
                lambda: self.primary.idem_complete(key, response, ttl=ttl, fingerprint=fingerprint, owner=owner),
                repeatable=True,  # an existing completed record is kept: the first answer wins
                even_if_down=even_if_down,
            )
        except _NoAnswer:
            self._queue(("complete", key, ""), _Completion(fingerprint, response, self.clock.now() + ttl))
            return False
        return True

    async def idem_complete(
        self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
    ) -> None:
        """Redis stores it; if it cannot (it went away or is slow between the claim and the
        answer), the answer is kept here (a repeat on this replica is replayed) and written
        back when Redis answers. A locally claimed key completes here and is written back."""
        claimed = self._redis_claims.pop(key, None)
        fingerprint = fingerprint or (claimed[0] if claimed else "") or self._local_claims.get(key, "")
        if owner:
            self._unsettled.pop((key, owner), None)  # completing settles its record in Redis
        if key in self._local_claims:  # kept: a repeat on this replica replays locally
            await self.fallback.idem_complete(key, response, ttl=ttl, fingerprint=fingerprint, owner=owner)
            if ttl > 0 and fingerprint:
                self._queue(("complete", key, ""), _Completion(fingerprint, response, self.clock.now() + ttl))
            return
        # A claim Redis granted: its answer is tried there even if Redis was marked down since.
        stored = await self._complete_in_redis(key, response, ttl, fingerprint, owner, even_if_down=claimed is not None)
        if stored and fingerprint:
            self._remember(key, fingerprint, response, ttl)

    def _remember(self, key: str, fingerprint: str, response: StoredResponse, ttl: float) -> None:
        if len(response.body) > _RECENT_MAX_BODY or ttl <= 0:
            return
        self._recent[key] = (fingerprint, response, self.clock.now() + min(ttl, _RECENT_FOR))
        self._recent.move_to_end(key)
        while len(self._recent) > _RECENT_COMPLETIONS:
            self._recent.popitem(last=False)

    async def idem_release(self, key: str, owner: str = "") -> None:
        claimed = self._redis_claims.pop(key, None)
        unsettled = bool(owner) and self._unsettled.pop((key, owner), None) is not None
        if key in self._local_claims:
            del self._local_claims[key]
            await self.fallback.idem_release(key, owner)
            if unsettled:  # an earlier attempt may hold the key in Redis too
                await self._release_in_redis(key, owner)
            return
        await self._release_in_redis(key, owner, even_if_down=claimed is not None)

    # -- the failover routing ledger ---------------------------------------------------------
    async def ledger_get(self, key: str) -> bytes | None:
        if ("ledger", key, "") in self._write_back:
            return await self.fallback.ledger_get(key)  # Redis does not have it yet
        try:
            value = await self._on_redis("ledger_get", lambda: self.primary.ledger_get(key), repeatable=True)
        except _NoAnswer:
            return await self.fallback.ledger_get(key)
        if value is None:
            # Redis lost an entry this replica wrote (a restart without persistence): this
            # replica's copy answers, and is written back.
            local = await self.fallback.ledger_get(key)
            if local is not None:
                ttl = self._ledger_ttls.get(key)
                if ttl is not None and ttl > self.clock.now():
                    self._queue(("ledger", key, ""), _Ledger(local, ttl))
            return local
        return value

    async def ledger_set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Kept here too (the entry must not be lost), and written back if Redis cannot take it."""
        await self.fallback.ledger_set(key, value, ttl=ttl)
        until = self.clock.now() + ttl
        self._ledger_ttls[key] = until
        self._ledger_ttls.move_to_end(key)
        while len(self._ledger_ttls) > _MAX_LOCAL_CLAIMS:
            self._ledger_ttls.popitem(last=False)
        try:
            await self._on_redis("ledger_set", lambda: self.primary.ledger_set(key, value, ttl=ttl), repeatable=True)
        except _NoAnswer:
            self._queue(("ledger", key, ""), _Ledger(value, until))
            return
        older = self._write_back.pop(("ledger", key, ""), None)  # superseded
        if older is not None:
            self._write_back_bytes -= _size(older)

    # -- the write-back queue ------------------------------------------------------------------
    def _queue(self, name: tuple[str, str, str], entry: _Pending) -> None:
        """Queue a write for when Redis answers again; a queued completion is kept (the
        first answer wins), a ledger entry replaces an older one for its key."""
        old = self._write_back.get(name)
        if old is not None:
            if isinstance(old, _Completion):
                return
            self._write_back_bytes -= _size(old)
        self._write_back[name] = entry
        self._write_back.move_to_end(name)
        self._write_back_bytes += _size(entry)
        dropped = 0
        while len(self._write_back) > WRITE_BACK_MAX or (
            self._write_back_bytes > WRITE_BACK_BYTES and len(self._write_back) > 1
        ):
            _, gone = self._write_back.popitem(last=False)
            self._write_back_bytes -= _size(gone)
            dropped += 1
        if dropped:
            self.write_backs_dropped += dropped
            log.warning(
                "redis write-back queue full; oldest records dropped",
                extra={"dropped": dropped, "pending": len(self._write_back)},
            )

    async def flush_write_back(self) -> int:
        """Write the queue to Redis, oldest first, while Redis answers; returns how many
        were written. Called by the probe loop; safe to call at any time."""
        written = 0
        while self._write_back and self.up:
            name, entry = next(iter(self._write_back.items()))
            kind, key, _owner = name
            now = self.clock.now()
            operation = self._write_op(key, entry, now)
            if operation is not None:
                try:
                    await self._on_redis(f"write_back_{kind}", operation, self.claim_budget, repeatable=True)
                except _NoAnswer:
                    break
                written += 1
                self.written_back += 1
            if self._write_back.get(name) is entry:
                del self._write_back[name]
                self._write_back_bytes -= _size(entry)
                if isinstance(entry, _Completion) and operation is not None:
                    self._remember(key, entry.fingerprint, entry.response, entry.until - now)
        if not self._write_back:
            self._write_back_bytes = 0
        return written

    def _write_op(self, key: str, entry: _Pending, now: float) -> Callable[[], Awaitable[None]] | None:
        """The Redis write of one queued entry (None: its ttl has ended, nothing to write)."""
        if isinstance(entry, _Completion):
            if entry.until <= now:
                return None
            response, ttl, fingerprint = entry.response, entry.until - now, entry.fingerprint
            return lambda: self.primary.idem_complete(key, response, ttl=ttl, fingerprint=fingerprint)
        if isinstance(entry, _Ledger):
            if entry.until <= now:
                return None
            value, ttl = entry.value, entry.until - now
            return lambda: self.primary.ledger_set(key, value, ttl=ttl)
        owner = entry.owner
        return lambda: self.primary.idem_release(key, owner)

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

    # -- the outbox ------------------------------------------------------------------------------
    def outbox_store(self) -> OutboxStore:
        """The outbox of `--redis` (`proxy.outbox.store.open_outbox` asks for it): kept sends
        in Redis, shared by every replica, on the primary's client, prefix and replica id
        (its liveness is this state's heartbeat). No local fallback: a send Redis cannot
        take is refused (503), never kept where another replica could not deliver it."""
        if self._outbox is None:
            from proxy.outbox.redis_store import RedisOutbox

            self._outbox = RedisOutbox(self.primary, wall=self.clock.wall)
        return self._outbox

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

    # -- webhook events (contract 7.5): kept here at the end of the class --------------------
    def webhook_store(self) -> Any:
        """The webhook store every replica shares (proxy/webhooks/redis_store.py): on the
        Redis client, with this replica's id as the owner of what it claims. It is not
        wrapped by the time budget: a webhook that cannot be stored is answered 503, and
        the provider sends it again."""
        from proxy.webhooks.redis_store import RedisWebhookStore

        return RedisWebhookStore(self.primary.client, prefix=self.primary.prefix, instance=self.primary.replica_id)


async def _none() -> None:
    return None


_REPEATS = 3


async def _repeating(call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again (up to `_REPEATS` times in all) after a connection error: redis-py
    drops the broken connection, and the next one it hands out is connected afresh."""
    for attempt in range(1, _REPEATS + 1):
        try:
            return await call()
        except (redis.exceptions.ConnectionError, ConnectionError):
            if attempt == _REPEATS:
                raise
    raise AssertionError("unreachable")


def open_shared_state(
    url: str, *, prefix: str = "egressd:", events: EventBus | None = None, fallback: MemoryState | None = None
) -> ResilientState:
    """What `egressd run --redis URL` uses: a `RedisState` wrapped in a `ResilientState`.

    The URL may carry `budget_ms=N` (the per-operation time budget, default 50) in its
    query; it is taken out before the URL reaches redis-py. `fallback`: the replica's own
    state (the data dir's `SQLiteState`; a new `MemoryState` when None).
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
    state = ResilientState(RedisState(clean, prefix=prefix), fallback or MemoryState(), events, budget=budget)
    # With a running loop, start the background probe now: it warms the connection pool
    # and counts replicas without blocking this call (nothing is connected here). Without
    # one (RuntimeError), it starts with the first operation instead.
    with contextlib.suppress(RuntimeError):
        state.start()
    return state
