"""Prometheus metrics, fed by pipeline events (the stages never import this)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.events import (
    AttemptFinished,
    CacheResult,
    CallFinished,
    CircuitChanged,
    ConfigReloaded,
    Event,
    FailoverResult,
    RateLimited,
    RateLimitWaited,
    RetryScheduled,
    RetrySkipped,
    StateBackendError,
)

CIRCUIT_VALUE = {"closed": 0, "half_open": 1, "open": 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The contract's metric families, in a registry of their own (one per server)."""

    interests = (
        CallFinished,
        AttemptFinished,
        RetryScheduled,
        RetrySkipped,
        CircuitChanged,
        RateLimitWaited,
        RateLimited,
        CacheResult,
        FailoverResult,
        ConfigReloaded,
        StateBackendError,
    )

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "egressd_requests",
            "Calls answered, by upstream, status and outcome.",
            ["upstream", "status", "outcome"],
            registry=r,
        )
        self.duration = Histogram(
            "egressd_request_duration_seconds",
            "Time from arrival to answer headers.",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "egressd_upstream_attempts", "Tries sent to upstreams, by result.", ["upstream", "result"], registry=r
        )
        self.retries = Counter("egressd_retries", "Retries made, by reason.", ["upstream", "reason"], registry=r)
        self.retries_skipped = Counter(
            "egressd_retries_skipped", "Retries wanted but not made, by reason.", ["upstream", "reason"], registry=r
        )
        self.circuit = Gauge(
            "egressd_circuit_state", "Circuit state: 0 closed, 1 half-open, 2 open.", ["upstream"], registry=r
        )
        self.rl_wait = Histogram(
            "egressd_rate_limit_wait_seconds",
            "Time calls waited for the rate limiter.",
            ["upstream"],
            buckets=(0.0, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.rate_limited = Counter(
            "egressd_rate_limited", "Calls refused by the rate limiter.", ["upstream"], registry=r
        )
        self.cache = Counter("egressd_cache", "Cache lookups by result.", ["upstream", "result"], registry=r)
        self.failovers = Counter(
            "egressd_failovers", "Failovers by source, target and result.", ["from", "to", "result"], registry=r
        )
        self.reloads = Counter("egressd_config_reloads", "Policy reloads by result.", ["result"], registry=r)
        self.backend_errors = Counter(
            "egressd_state_backend_errors", "State backend failures.", ["backend"], registry=r
        )
        # Label children are looked up once and kept: this runs on every call.
        self._requests: dict[tuple[str, int, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._attempts: dict[tuple[str, str], Counter] = {}
        self._waits: dict[str, Histogram] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, CallFinished):
            key = (event.route, event.status, event.outcome)
            counter = self._requests.get(key)
            if counter is None:
                counter = self._requests[key] = self.requests.labels(event.route, str(event.status), event.outcome)
            counter.inc()
            histogram = self._durations.get(event.route)
            if histogram is None:
                histogram = self._durations[event.route] = self.duration.labels(event.route)
            histogram.observe(event.duration)
        elif isinstance(event, AttemptFinished):
            akey = (event.upstream, event.result)
            attempts = self._attempts.get(akey)
            if attempts is None:
                attempts = self._attempts[akey] = self.attempts.labels(event.upstream, event.result)
            attempts.inc()
        elif isinstance(event, RetryScheduled):
            self.retries.labels(event.upstream, event.reason).inc()
        elif isinstance(event, RetrySkipped):
            self.retries_skipped.labels(event.upstream, event.reason).inc()
        elif isinstance(event, CircuitChanged):
            self.circuit.labels(event.upstream).set(CIRCUIT_VALUE.get(event.state, 0))
        elif isinstance(event, RateLimitWaited):
            wait = self._waits.get(event.upstream)
            if wait is None:
                wait = self._waits[event.upstream] = self.rl_wait.labels(event.upstream)
            wait.observe(event.seconds)
        elif isinstance(event, RateLimited):
            self.rate_limited.labels(event.upstream).inc()
        elif isinstance(event, CacheResult):
            self.cache.labels(event.upstream, event.result).inc()
        elif isinstance(event, FailoverResult):
            self.failovers.labels(event.source, event.target, event.result).inc()
        elif isinstance(event, ConfigReloaded):
            self.reloads.labels(event.result).inc()
        elif isinstance(event, StateBackendError):
            self.backend_errors.labels(event.backend).inc()

    def declare_upstream(self, name: str) -> None:
        """Make an upstream's series visible at 0 before its first call."""
        self.circuit.labels(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)
