"""The one small protocol behind which shared state lives.

Three backends implement it with the same semantics: `memory` (one process), `sqlite`
(the durable store in `--data-dir`: memory for limits and cache, SQLite for the records
that must survive a restart) and `redis` (every replica that uses the same Redis).

Keys passed in are already scoped by the caller. Limits, circuits and the cache are
scoped to one upstream and one configuration fingerprint (see `state_key`), so an
upstream whose relevant settings did not change keeps that state across a reload, and one
whose settings changed starts fresh. Idempotency and fingerprint records and the routing
ledger are scoped by upstream only: they survive every reload (contract 7.2).

Every operation that must be atomic is one call here (one Lua script in Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: Record keys built by the stages look like `<state_key scope>|<digest>`; the part before
#: the last `SCOPE_SEP` is the scope (memory: per-scope caps; Redis: the hash tag).
SCOPE_SEP = "|"


def state_key(upstream: str, kind: str, fingerprint: str) -> str:
    """`stripe:rl:3f2a9c...`: the scope of one stage's state."""
    return f"{upstream}:{kind}:{fingerprint[:16]}"


@dataclass(frozen=True, slots=True)
class RateDecision:
    """GCRA admission. `allowed`: a slot is reserved and the caller sleeps `wait` first.

    Not allowed: nothing was reserved; `wait` is how long until a caller would be admitted
    without queueing (the `Retry-After` to send).
    """

    allowed: bool
    wait: float


@dataclass(frozen=True, slots=True)
class CircuitAdmission:
    allowed: bool
    state: str  # closed | half_open | open
    trial: bool  # this call is one of the half-open trial calls
    retry_after: float  # when refused: seconds until a trial may be admitted


@dataclass(frozen=True, slots=True)
class CircuitSettings:
    window: float
    min_requests: int
    failure_rate: float
    open_for: float
    half_open_requests: int


@dataclass(frozen=True, slots=True)
class CircuitTransition:
    before: str
    after: str


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A complete answer kept for idempotent replay or caching (bodies are bytes)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # wall-clock seconds
    # Optional extras (defaults keep records written by older versions readable):
    upstream: str = ""  # the upstream that produced it ("" = the stage's own upstream)
    age: float = 0.0  # cache: the answer's age when stored (the upstream's `Age` header)
    lifetime: float | None = None  # cache: freshness lifetime (None: work it out from headers)


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """Result of claiming an idempotency (or fingerprint) record.

    state:

    * "new": the caller now owns an in-flight record and must complete or release it
      (also the answer to an owner that claims its own in-flight record again, e.g. after
      a timeout whose reply was lost: claims are idempotent per `owner`);
    * "in_flight": someone else owns it and is still within its lock; wait and claim again;
    * "completed": `response` holds the recorded answer (a complete answer, or the
      ambiguous one a keyless call got, see docs/resilience.md "Exactly once");
    * "mismatch": the key was used with a different request fingerprint;
    * "in_doubt": the record was in flight under an owner that is gone (its lock lapsed,
      or, in the durable store, its process died) without an outcome: the upstream may or
      may not have acted. The record stays in doubt until its `ttl` ends. A claim with
      `dedupes=True` takes such a record over (answers "new") instead.
    """

    state: str
    response: StoredResponse | None = None


class RecordsUnavailable(Exception):
    """The shared store cannot decide a claim now (Redis slow or away) and the caller did
    not allow a local decision (`dedupes=False`). Nothing was claimed, or what may have
    been claimed is owned by `owner` and will be given back; the caller may try again
    (same `owner`) or answer 503 `state_unavailable`."""


class SyncLimits(Protocol):
    """Optional: the limit operations of an in-process backend as plain calls.

    A backend whose limit operations never wait (memory) may expose this as its
    `sync_limits` attribute (None or absent otherwise); each `*_now` method is exactly the
    async `StateBackend` operation of the same name, without the coroutine, except
    `rate_take_free_now`, the guard's common case in one step (`paused_for_now` and then
    `rate_take_now` with `max_wait=0`). The guards (proxy/pipeline.py) look it up and use
    it in `enter`/`leave`; a backend without it (Redis, the resilient wrapper) is always
    called through the async protocol, by the stages' wrappers.
    """

    def rate_take_now(self, key: str, interval: float, burst: int, max_wait: float) -> RateDecision: ...

    def rate_take_free_now(self, key: str, interval: float, burst: int) -> bool: ...

    def pause_now(self, key: str, seconds: float) -> None: ...

    def paused_for_now(self, key: str) -> float: ...

    def budget_record_now(self, key: str, window: float, retry: bool) -> None: ...

    def budget_try_retry_now(self, key: str, window: float, ratio: float, min_per_second: float) -> bool: ...

    def circuit_admit_now(self, key: str, settings: CircuitSettings) -> CircuitAdmission: ...

    def circuit_record_now(
        self, key: str, settings: CircuitSettings, failure: bool, trial: bool
    ) -> CircuitTransition: ...

    def circuit_release_now(self, key: str, settings: CircuitSettings) -> None: ...


def sync_limits(state: object) -> SyncLimits | None:
    """The synchronous limit operations of `state`, or None when it only has the async ones."""
    found: SyncLimits | None = getattr(state, "sync_limits", None)
    return found


class StateBackend(Protocol):
    name: str

    # -- rate limiting (GCRA) and upstream back-pressure ------------------------------
    async def rate_take(self, key: str, *, interval: float, burst: int, max_wait: float) -> RateDecision:
        """Admit one call at one per `interval` seconds with `burst` tolerance.

        A caller is admitted if it would have to wait at most `max_wait` (0: no queue).
        """

    async def pause(self, key: str, seconds: float) -> None:
        """Pause the upstream's whole budget for `seconds` from now (never shortens a pause)."""

    async def paused_for(self, key: str) -> float:
        """Seconds left of a pause, 0 when none."""

    # -- retry budget --------------------------------------------------------------------
    async def budget_record(self, key: str, *, window: float, retry: bool) -> None:
        """Count a request (retry=False) or a retry (retry=True) in a sliding window."""

    async def budget_try_retry(self, key: str, *, window: float, ratio: float, min_per_second: float) -> bool:
        """Atomically: if retries in the window stay under
        `ratio * requests + min_per_second * window`, count one more retry and return
        True; otherwise change nothing and return False."""

    # -- circuit breaker -----------------------------------------------------------------
    async def circuit_admit(self, key: str, settings: CircuitSettings) -> CircuitAdmission: ...

    async def circuit_record(
        self, key: str, settings: CircuitSettings, *, failure: bool, trial: bool
    ) -> CircuitTransition: ...

    async def circuit_release(self, key: str, settings: CircuitSettings) -> None:
        """Give back a half-open trial slot whose call ended without a verdict.

        (The call was refused by the rate limiter below the breaker, or cancelled.)
        """

    async def circuit_state(self, key: str, settings: CircuitSettings) -> str: ...

    # -- idempotency and fingerprint records ---------------------------------------------
    # Keys are `<upstream>:idem|k:<digest>` (app keys) or `...|w:<digest>` (fingerprints):
    # they depend on the upstream, the credential scope and the key or fingerprint only, so
    # records survive reloads and restarts (contract 7.2).
    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
    ) -> IdempotencyClaim:
        """Claim `key` for `owner` (a token unique to the claiming call).

        new record: in flight for `lock_ttl` seconds, then (if neither completed nor
        released) in doubt until `ttl` more seconds have passed. `dedupes`: the upstream
        deduplicates on the key that is sent, so a record in doubt may be taken over, and a
        backend that cannot reach its shared store may decide locally instead of raising
        `RecordsUnavailable`.
        """

    async def idem_complete(
        self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
    ) -> None:
        """Record `response` as the outcome of `key` for `ttl` seconds.

        Stored even when the record is gone (a Redis restarted empty, an evicted record),
        under `fingerprint`, so the answer of a call that may have acted is never lost; an
        existing completed record is kept as it is."""

    async def idem_release(self, key: str, owner: str = "") -> None:
        """Forget an in-flight claim whose call did not reach the upstream (so a resend
        may run). Only the owner's own in-flight record is removed (`owner` "" matches any
        owner, for older callers)."""

    # -- the failover routing ledger (durable where the backend is) ------------------------
    async def ledger_get(self, key: str) -> bytes | None: ...

    async def ledger_set(self, key: str, value: bytes, *, ttl: float) -> None: ...

    # -- response cache ------------------------------------------------------------------
    async def cache_get(self, key: str) -> StoredResponse | None: ...

    async def cache_set(self, key: str, response: StoredResponse, *, ttl: float) -> None: ...

    # -- small shared values (OAuth tokens; kept out of the durable store) ----------------
    async def kv_get(self, key: str) -> bytes | None: ...

    async def kv_set(self, key: str, value: bytes, *, ttl: float) -> None: ...

    async def close(self) -> None: ...
