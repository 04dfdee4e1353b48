"""Prometheus metrics, fed by pipeline events (the stages never import this)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from proxy.events import (
    AttemptFinished,
    CacheResult,
    CallFinished,
    CircuitChanged,
    ConfigReloaded,
    Event,
    FailoverResult,
    OutboxDelivery,
    OutboxDepth,
    PoolConnected,
    RateLimited,
    RateLimitWaited,
    RetryScheduled,
    RetrySkipped,
    StateBackendError,
    Tally,
    WebhookDepth,
    WebhookResult,
    tally_gains,
)
from proxy.fds import fd_limit, open_fds

CIRCUIT_VALUE = {"closed": 0, "half_open": 1, "open": 2}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# egressd's own share of a call is tens of microseconds to a few milliseconds.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
POOL_STATES = ("in_use", "idle", "opening")
#: Reads each upstream pool's connections now (`Transport.pool_stats`): name -> stats or None.
PoolStats = Callable[[], Mapping[str, Mapping[str, Any] | None]]


class Metrics:
    """The contract's metric families, in a registry of their own (one per server)."""

    interests = (
        CallFinished,
        AttemptFinished,
        PoolConnected,
        RetryScheduled,
        RetrySkipped,
        CircuitChanged,
        RateLimitWaited,
        RateLimited,
        CacheResult,
        FailoverResult,
        ConfigReloaded,
        StateBackendError,
        OutboxDelivery,
        OutboxDepth,
        WebhookResult,
        WebhookDepth,
    )

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        tallies: Callable[[], Iterable[Tally]] | None = None,
        pools: PoolStats | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # Admissions without any wait (most calls through a rate limit far above its load)
        # arrive as tallies of the bus (`tallies`, proxy/events.py) or as zero-second events;
        # both are counted here, by upstream, and folded into `rl_wait` when the registry
        # is collected: registered before `rl_wait`, so it runs first on every collection.
        self._zero_waits: dict[str, int] = {}
        self._tallies = tallies
        self._tallies_seen: dict[Tally, int] = {}
        r.register(_Flush(self._flush_zero_waits))
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
        # egressd's own share of each call (CallFinished.overhead; docs/operations.md).
        self.overhead = Histogram(
            "egressd_overhead_seconds",
            "Time a call spent inside egressd: its duration minus upstream attempts and policy waits.",
            ["upstream"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        # Upstream connections: opened (TCP and TLS handshakes, warm or for a call), and how
        # many of those resumed a TLS session; the pools' connections now are read at scrape.
        self.handshakes = Counter(
            "egressd_pool_handshakes", "New upstream connections (TCP and TLS handshakes).", ["upstream"], registry=r
        )
        self.resumed = Counter(
            "egressd_pool_tls_resumed",
            "New upstream connections whose TLS handshake resumed an earlier session.",
            ["upstream"],
            registry=r,
        )
        if pools is not None:
            r.register(_PoolCollector(pools))
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
        # The outbox (contract 7.6): deliveries by result, and each upstream's depth and
        # oldest pending entry as the delivery worker last read them (every 2 s).
        self.outbox_deliveries = Counter(
            "egressd_outbox_deliveries", "Outbox deliveries by result.", ["upstream", "result"], registry=r
        )
        self.outbox_entries = Gauge(
            "egressd_outbox_entries", "Kept sends waiting for delivery.", ["upstream"], registry=r
        )
        self.outbox_oldest = Gauge(
            "egressd_outbox_oldest_seconds",
            "Age of the oldest kept send waiting for delivery.",
            ["upstream"],
            registry=r,
        )
        # Inbound webhooks (contract 7.5): events by result, and each upstream's stored POSTs
        # waiting for the app (and the oldest's age) and dead ones, as the worker last read them.
        self.webhooks = Counter(
            "egressd_webhooks", "Inbound webhook events by result.", ["upstream", "result"], registry=r
        )
        self.webhook_pending = Gauge(
            "egressd_webhook_pending", "Webhook deliveries waiting for the app.", ["upstream"], registry=r
        )
        self.webhook_oldest = Gauge(
            "egressd_webhook_oldest_seconds",
            "Age of the oldest webhook delivery waiting for the app.",
            ["upstream"],
            registry=r,
        )
        self.webhook_dead = Gauge(
            "egressd_webhook_dead", "Webhook deliveries kept after max_age without a 2xx.", ["upstream"], registry=r
        )
        # The process's file descriptors against its file limit (proxy/fds.py), read at
        # each scrape; proxy/server.py also warns in the log from 80 %.
        self.open_fds = Gauge("egressd_open_fds", "File descriptors open in this process.", registry=r)
        self.open_fds.set_function(lambda: float(open_fds()))
        self.max_fds = Gauge(
            "egressd_max_fds", "The process's file limit (soft RLIMIT_NOFILE; -1: unlimited).", registry=r
        )
        self.max_fds.set_function(lambda: float(fd_limit()))
        # Label children are looked up once and kept: this runs on every call.
        self._requests: dict[tuple[str, int, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._overheads: dict[str, Histogram] = {}
        self._attempts: dict[tuple[str, str], Counter] = {}
        self._waits: dict[str, Histogram] = {}

        # Handlers by event type (one dict lookup instead of a chain of isinstance checks).
        self._handlers: dict[type, Callable[[Any], None]] = {
            CallFinished: self._call_finished,
            AttemptFinished: self._attempt_finished,
            PoolConnected: self._pool_connected,
            RetryScheduled: lambda e: self.retries.labels(e.upstream, e.reason).inc(),
            RetrySkipped: lambda e: self.retries_skipped.labels(e.upstream, e.reason).inc(),
            CircuitChanged: lambda e: self.circuit.labels(e.upstream).set(CIRCUIT_VALUE.get(e.state, 0)),
            RateLimitWaited: self._rate_limit_waited,
            RateLimited: lambda e: self.rate_limited.labels(e.upstream).inc(),
            CacheResult: lambda e: self.cache.labels(e.upstream, e.result).inc(),
            FailoverResult: lambda e: self.failovers.labels(e.source, e.target, e.result).inc(),
            ConfigReloaded: lambda e: self.reloads.labels(e.result).inc(),
            StateBackendError: lambda e: self.backend_errors.labels(e.backend).inc(),
            OutboxDelivery: lambda e: self.outbox_deliveries.labels(e.upstream, e.result).inc(),
            OutboxDepth: self._outbox_depth,
            WebhookResult: lambda e: self.webhooks.labels(e.upstream, e.result).inc(e.n),
            WebhookDepth: self._webhook_depth,
        }

    def __call__(self, event: Event) -> None:
        if type(event) is RateLimitWaited and event.seconds == 0.0:  # most admitted calls
            zero = self._zero_waits
            zero[event.upstream] = zero.get(event.upstream, 0) + 1
            return
        handler = self._handlers.get(type(event))
        if handler is None:
            # A subclass of an event type (or a type nobody handles): resolve once.
            handler = next((h for t, h in self._handlers.items() if isinstance(event, t)), _ignore)
            self._handlers[type(event)] = handler
        handler(event)

    def _call_finished(self, event: CallFinished) -> None:
        key = (event.route, event.status, event.outcome)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(event.route, str(event.status), event.outcome)
        counter.inc()
        histogram = self._durations.get(event.route)
        if histogram is None:
            histogram = self._durations[event.route] = self.duration.labels(event.route)
        histogram.observe(event.duration)
        if event.overhead is not None:
            overhead = self._overheads.get(event.route)
            if overhead is None:
                overhead = self._overheads[event.route] = self.overhead.labels(event.route)
            overhead.observe(event.overhead)

    def _pool_connected(self, event: PoolConnected) -> None:
        self.handshakes.labels(event.upstream).inc()
        if event.resumed:
            self.resumed.labels(event.upstream).inc()

    def _attempt_finished(self, event: AttemptFinished) -> None:
        akey = (event.upstream, event.result)
        attempts = self._attempts.get(akey)
        if attempts is None:
            attempts = self._attempts[akey] = self.attempts.labels(event.upstream, event.result)
        attempts.inc()

    def _rate_limit_waited(self, event: RateLimitWaited) -> None:
        if event.seconds == 0.0:
            zero = self._zero_waits
            zero[event.upstream] = zero.get(event.upstream, 0) + 1
            return
        wait = self._waits.get(event.upstream)
        if wait is None:
            wait = self._waits[event.upstream] = self.rl_wait.labels(event.upstream)
        wait.observe(event.seconds)

    def _read_tallies(self) -> None:
        """Count the zero waits the tallies gained since the last collection."""
        if self._tallies is None:
            return
        zero = self._zero_waits
        for event, gained in tally_gains(self._tallies(), self._tallies_seen):
            if type(event) is RateLimitWaited and event.seconds == 0.0:
                zero[event.upstream] = zero.get(event.upstream, 0) + gained

    def _flush_zero_waits(self) -> None:
        """Fold the counted zero waits into the histogram (as `observe(0.0)` each would)."""
        self._read_tallies()
        if not self._zero_waits:
            return
        pending, self._zero_waits = self._zero_waits, {}
        for upstream, n in pending.items():
            wait = self._waits.get(upstream)
            if wait is None:
                wait = self._waits[upstream] = self.rl_wait.labels(upstream)
            buckets = getattr(wait, "_buckets", None)
            bounds = getattr(wait, "_upper_bounds", None)
            if buckets is None or bounds is None or len(buckets) != len(bounds):
                for _ in range(n):  # not the prometheus_client layout this was written for
                    wait.observe(0.0)
                continue
            # observe(0.0): the sum gains nothing, the first bucket whose bound is >= 0 one.
            index = next(i for i, bound in enumerate(bounds) if 0.0 <= bound)
            buckets[index].inc(n)

    def _outbox_depth(self, event: OutboxDepth) -> None:
        self.outbox_entries.labels(event.upstream).set(event.entries)
        self.outbox_oldest.labels(event.upstream).set(event.oldest_seconds)

    def _webhook_depth(self, event: WebhookDepth) -> None:
        self.webhook_pending.labels(event.upstream).set(event.pending)
        self.webhook_oldest.labels(event.upstream).set(event.oldest_seconds)
        self.webhook_dead.labels(event.upstream).set(event.dead)

    def declare_upstream(self, name: str) -> None:
        """Make an upstream's series visible at 0 before its first call."""
        self.circuit.labels(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _ignore(event: Event) -> None:
    return None


class _PoolCollector:
    """`egressd_pool_connections{upstream,state}`, read from the live pools at each scrape."""

    def __init__(self, pools: PoolStats) -> None:
        self._pools = pools

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "egressd_pool_connections",
            "Upstream connections of each upstream's pool now, by state (in_use, idle, opening).",
            labels=["upstream", "state"],
        )

    def describe(self) -> Iterable[Metric]:
        return (self._family(),)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for name, stats in sorted(self._pools().items()):
            for state in POOL_STATES:
                family.add_metric([name, state], float(stats.get(state, 0)) if stats is not None else 0.0)
        return (family,)


class _Flush:
    """A collector that exports nothing and runs `flush` whenever the registry is collected."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def collect(self) -> Iterable[Metric]:
        self._flush()
        return ()

    def describe(self) -> Iterable[Metric]:
        return ()
