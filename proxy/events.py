"""Pipeline events: the only way metrics, logs and the status page learn what happened.

Stages emit small frozen values; subscribers (proxy.observe) turn them into metrics,
log lines and status data. Stages never import prometheus_client or logging handlers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CallFinished:
    """One proxied call is answered (emitted once per call, by the server)."""

    route: str
    upstream: str
    method: str
    path: str
    status: int
    outcome: str  # success | client_error | upstream_error | proxy_error | replayed | cached
    attempts: int
    duration: float
    request_id: str
    error_code: str | None = None
    cache: str | None = None
    failover: str | None = None
    bytes_out: int = 0
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class AttemptFinished:
    """One try to an upstream ended; result is a status class or an error kind."""

    upstream: str
    result: str  # 2xx | 3xx | 4xx | 429 | 5xx | connect_error | timeout | reset | protocol_error
    status: int | None
    duration: float


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    upstream: str
    reason: str  # the status code or error kind that caused it
    delay: float


@dataclass(frozen=True, slots=True)
class RetrySkipped:
    upstream: str
    reason: str  # unsafe | budget | deadline | not_replayable | should_retry_false


@dataclass(frozen=True, slots=True)
class CircuitChanged:
    upstream: str
    state: str  # closed | half_open | open
    previous: str


@dataclass(frozen=True, slots=True)
class RateLimitWaited:
    upstream: str
    seconds: float


@dataclass(frozen=True, slots=True)
class RateLimited:
    upstream: str
    reason: str  # queue_full | max_wait | paused


@dataclass(frozen=True, slots=True)
class UpstreamPaused:
    upstream: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CacheResult:
    upstream: str
    result: str  # hit | miss | stale | bypass | store


@dataclass(frozen=True, slots=True)
class FailoverResult:
    source: str
    target: str
    result: str  # used | refused | failed
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class IdempotencyResult:
    upstream: str
    result: str  # replayed | mismatch | joined | generated | fingerprint_duplicate


@dataclass(frozen=True, slots=True)
class ConfigReloaded:
    result: str  # success | failure
    version: str | None
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StateBackendError:
    backend: str
    operation: str
    error: str


Event = (
    CallFinished
    | AttemptFinished
    | RetryScheduled
    | RetrySkipped
    | CircuitChanged
    | RateLimitWaited
    | RateLimited
    | UpstreamPaused
    | CacheResult
    | FailoverResult
    | IdempotencyResult
    | ConfigReloaded
    | StateBackendError
)

Subscriber = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out to subscribers; a failing subscriber never breaks a call."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(event)
            except Exception:
                import logging

                logging.getLogger("egressd").exception("event subscriber failed")
