"""Pipeline events: the only way metrics, logs and the status page learn what happened.

Stages emit small frozen values; subscribers (proxy.observe) turn them into metrics,
log lines and status data. Stages never import prometheus_client or logging handlers.

One event happens on nearly every call and carries nothing but its upstream: a call
admitted by the rate limiter without waiting (`RateLimitWaited(upstream, 0.0)`). Sending
it through the bus each time cost ~3 us of a ~75 us call under load, so it is a *tally*:
the stage adds 1 to an integer (`EventBus.tally`), and the subscribers that report it
read how far the count moved when they report (metrics at scrape, the status page once a
second). A tally is one per event type and value, kept for the bus's life.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple


class CallFinished(NamedTuple):
    """One proxied call is answered (emitted once per call, by the server)."""

    route: str
    upstream: str
    method: str
    path: str
    status: int
    outcome: str  # success | client_error | upstream_error | proxy_error | replayed | cached | aborted | app_gone
    attempts: int
    duration: float
    request_id: str
    error_code: str | None = None
    cache: str | None = None
    failover: str | None = None
    bytes_out: int = 0
    detail: str | None = None
    # The app closed its connection before the answer: the call either ended there
    # (outcome app_gone, status 499) or was owned by egressd to its outcome (contract 7.2).
    app_gone: bool = False
    # Seconds of `duration` spent inside egressd itself: the duration minus the time its
    # attempts waited on the upstream and the waits a policy asked for (rate-limit queue,
    # retry back-off, joining an identical call in flight); None when not known (a call
    # whose app left, or a request refused before it became a call).
    overhead: float | None = None


class AttemptFinished(NamedTuple):
    """One try to an upstream ended; result is a status class or an error kind."""

    upstream: str
    # 2xx | 3xx | 4xx | 429 | 5xx | connect_error | timeout | reset | protocol_error, or
    # stale_connection: a reused connection the upstream had closed (a safe call then went
    # out again on a new connection within the same attempt: proxy/_http1.py)
    result: str
    status: int | None
    duration: float


class PoolConnected(NamedTuple):
    """A new upstream connection is up (TCP and TLS): for a call, or warm in the background."""

    upstream: str
    seconds: float  # from the start of the connect (DNS included) to the end of the handshake
    resumed: bool  # the TLS handshake resumed an earlier session
    warm: bool  # opened by the warm pool, not on a call's path


class RetryScheduled(NamedTuple):
    upstream: str
    reason: str  # the status code or error kind that caused it
    delay: float


class RetrySkipped(NamedTuple):
    upstream: str
    reason: str  # unsafe | budget | deadline | not_replayable | should_retry_false


class CircuitChanged(NamedTuple):
    upstream: str
    state: str  # closed | half_open | open
    previous: str


class RateLimitWaited(NamedTuple):
    upstream: str
    seconds: float


class RateLimited(NamedTuple):
    upstream: str
    reason: str  # queue_full | max_wait | paused


class UpstreamPaused(NamedTuple):
    upstream: str
    seconds: float


class CacheResult(NamedTuple):
    upstream: str
    result: str  # hit | miss | stale | bypass | store


class FailoverResult(NamedTuple):
    source: str
    target: str
    result: str  # used | refused | failed
    reason: str | None = None


class IdempotencyResult(NamedTuple):
    upstream: str
    result: str  # replayed | mismatch | joined | shared | generated | fingerprint_duplicate


class ConfigReloaded(NamedTuple):
    result: str  # success | failure
    version: str | None
    problems: tuple[str, ...] = ()


class StateBackendError(NamedTuple):
    backend: str
    operation: str
    error: str


class OutboxDelivery(NamedTuple):
    """A kept send's delivery attempt settled (proxy/outbox/worker.py)."""

    upstream: str
    result: str  # delivered | failed_over | retried | ambiguous | dead


class OutboxDepth(NamedTuple):
    """The outbox of one upstream, as the worker last read it (every few seconds)."""

    upstream: str
    entries: int  # pending: queued, claimed, sending, in doubt
    oldest_seconds: float  # age of the oldest pending entry (0 when none)


class WebhookResult(NamedTuple):
    """What happened to inbound webhook events (proxy/webhooks/): `n` events of one
    upstream (the one they came in on) had this result."""

    upstream: str
    result: str  # received | duplicate | rejected | delivered | translated | retried | dead | dropped
    n: int = 1


class WebhookDepth(NamedTuple):
    """One upstream's stored webhook POSTs, as the delivery worker last read them."""

    upstream: str
    pending: int  # queued or being delivered
    oldest_seconds: float  # age of the oldest pending one (0 when none)
    dead: int  # kept after max_age without a 2xx from the app


Event = (
    CallFinished
    | AttemptFinished
    | PoolConnected
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
    | OutboxDelivery
    | OutboxDepth
    | WebhookResult
    | WebhookDepth
)

Subscriber = Callable[[Event], None]


class Tally:
    """How many times one event value happened, counted instead of sent (see the module
    docstring). The producer does `tally.n += 1`; a reader keeps the `n` it saw last
    and takes the difference."""

    __slots__ = ("event", "n")

    def __init__(self, event: Event) -> None:
        self.event = event
        self.n = 0


def tally_gains(tallies: Iterable[Tally], seen: dict[Tally, int]) -> list[tuple[Event, int]]:
    """Each tally that moved since the counts in `seen`, with how much; updates `seen`.
    (What a reader of tallies does when it reports.)"""
    gains: list[tuple[Event, int]] = []
    for tally in tallies:
        n = tally.n
        gained = n - seen.get(tally, 0)
        if gained > 0:
            seen[tally] = n
            gains.append((tally.event, gained))
    return gains


class EventBus:
    """Synchronous fan-out to subscribers; a failing subscriber never breaks a call.

    A subscriber may declare `interests` (a tuple of event types); it is then called
    only for those. Routes are computed once per event type, so an event nobody wants
    (e.g. an AttemptFinished with only the access log listening) costs one dict lookup.
    """

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._routes: dict[type, tuple[Subscriber, ...]] = {}
        # Keyed by type and value: NamedTuples of different types with equal fields are
        # equal tuples (UpstreamPaused("up", 0.0) == RateLimitWaited("up", 0.0)).
        self._tallies: dict[tuple[type, Event], Tally] = {}

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)
        self._routes.clear()

    def _route(self, kind: type) -> tuple[Subscriber, ...]:
        route = tuple(
            s for s in self._subscribers if (wanted := getattr(s, "interests", None)) is None or kind in wanted
        )
        self._routes[kind] = route
        return route

    def tally(self, event: Event) -> Tally:
        """The tally of `event` (one per event type and value, kept for the bus's life, so
        a stage rebuilt on reload counts on where the old one stopped)."""
        key = (type(event), event)
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally(event)
        return found

    def tallies(self) -> tuple[Tally, ...]:
        return tuple(self._tallies.values())

    def emit(self, event: Event) -> None:
        route = self._routes.get(type(event))
        if route is None:
            route = self._route(type(event))
        for subscriber in route:
            try:
                subscriber(event)
            except Exception:
                import logging

                logging.getLogger("egressd").exception("event subscriber failed")
