"""The loaded configuration, live: one `UpstreamRuntime` per policy, swapped whole on reload.

A call takes the `UpstreamRuntime` current when it arrives and keeps it to the end, so
in-flight calls finish under the policy they started with. State that belongs to an
upstream (circuit, limiter, cache, idempotency records) lives in the state backend under
keys scoped by a fingerprint of the settings it depends on: an upstream whose relevant
settings did not change finds its state again after a reload. Pooled connections are
kept when the transport settings did not change; a new or changed upstream's pool opens
its `pool.min_warm` connections in the background as soon as it is swapped in, and a
replaced pool stops warming and closes its idle connections at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plugins.base import ProviderPlugin
from plugins.registry import load_plugin
from proxy.clock import Clock
from proxy.events import EventBus
from proxy.oauth import build_sender
from proxy.pipeline import Pipeline, StageContext, UpstreamHandle, build_pipeline
from proxy.state.base import StateBackend
from proxy.transport import AnswerLimits, Transport

if TYPE_CHECKING:
    from proxy.config.loader import PolicySet
    from proxy.config.schema import Policy

log = logging.getLogger("egressd")


class Drain:
    """The end of this process's drain (SIGTERM, contract 7.3): `end()` is called by the
    server when `--drain` runs out. A wait that must not outlive the drain (a call in a
    rate-limit queue) sleeps through `sleep`, which then returns False at once."""

    def __init__(self) -> None:
        self.ended = False
        self._future: asyncio.Future[None] | None = None

    def end(self) -> None:
        self.ended = True
        if self._future is not None and not self._future.done():
            self._future.set_result(None)

    async def sleep(self, clock: Clock, seconds: float) -> bool:
        """Sleep `seconds` on `clock`; False (sooner) when the drain ends first."""
        if self.ended:
            return False
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        sleeper = asyncio.ensure_future(clock.sleep(seconds))
        try:
            await asyncio.wait((sleeper, self._future), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not sleeper.done():
                sleeper.cancel()
        return sleeper.done() and not sleeper.cancelled()


@dataclass
class UpstreamRuntime:
    policy: Policy
    plugin: ProviderPlugin
    transport: Transport
    pipeline: Pipeline
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.policy.upstream


class Runtime:
    """Holds the current set of upstreams and builds a new set on reload."""

    def __init__(
        self, clock: Clock, events: EventBus, state: StateBackend, *, answer_limits: AnswerLimits | None = None
    ) -> None:
        self.clock = clock
        self.answer_limits = answer_limits
        self.events = events
        self.state = state
        self.upstreams: dict[str, UpstreamRuntime] = {}
        self.version: str | None = None
        self.policy_set: PolicySet | None = None
        # Shared with every stage (`StageContext.extras["drain"]`): the rate-limit queue
        # answers 503 `draining` when it ends.
        self.drain = Drain()
        # The outbox's store and the wake-up of its delivery worker (set by the server;
        # a pipeline built without them keeps its sends in memory: proxy/outbox/stage.py).
        self.outbox_store: object | None = None
        self.outbox_wake: Callable[[], None] | None = None
        self._retired: set[asyncio.Task[None]] = set()

    def get(self, name: str) -> UpstreamRuntime | None:
        return self.upstreams.get(name)

    def lookup(self, name: str) -> UpstreamHandle | None:
        rt = self.upstreams.get(name)
        if rt is None:
            return None
        return UpstreamHandle(name, rt.pipeline.handle, rt.plugin, rt.policy)

    def build(self, policy_set: PolicySet) -> dict[str, UpstreamRuntime]:
        """Build runtimes for a validated set (raises on plugin problems; nothing is swapped)."""
        built: dict[str, UpstreamRuntime] = {}
        for policy in policy_set.policies:
            plugin = load_plugin(policy.provider.name, policy.provider.settings)
            old = self.upstreams.get(policy.upstream)
            transport = Transport(policy, self.clock, self.events, limits=self.answer_limits)
            if old is not None and old.transport.fingerprint() == transport.fingerprint():
                transport = old.transport
            ctx = StageContext(
                policy=policy,
                clock=self.clock,
                events=self.events,
                state=self.state,
                plugin=plugin,
                lookup=self.lookup,
                extras={"drain": self.drain, "outbox_store": self.outbox_store, "outbox_wake": self.outbox_wake},
            )
            # With OAuth, the attempt loop sends through the token sender (and refreshes a
            # rejected token as one more attempt): proxy/upstream.py.
            auth = build_sender(policy, transport, self.state, self.clock)
            pipeline = build_pipeline(ctx, transport.send, auth=auth)
            built[policy.upstream] = UpstreamRuntime(policy, plugin, transport, pipeline, ctx.extras)
        return built

    def swap(self, built: dict[str, UpstreamRuntime], policy_set: PolicySet) -> None:
        old = self.upstreams
        self.upstreams = built
        self.policy_set = policy_set
        self.version = policy_set.version
        kept = {id(rt.transport) for rt in built.values()}
        previous = {id(rt.transport) for rt in old.values()}
        for rt in built.values():
            if id(rt.transport) not in previous:
                # A new or changed upstream: its `pool.min_warm` connections are opened now,
                # in the background, so its first call finds them (a kept one already has them).
                rt.transport.warm()
        for rt in old.values():
            if id(rt.transport) not in kept:
                # No more warm-ups for a replaced pool, and its idle connections go now.
                rt.transport.retire()
                # Let calls that started under the old policy finish before closing its pool.
                grace = rt.policy.timeouts.total + 1.0
                task = asyncio.get_running_loop().create_task(_close_later(rt.transport, grace))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)

    async def wait_warm(self) -> None:
        """Return once every upstream's pool has had its `pool.min_warm` idle connections up
        (the caller bounds the wait: `--ready-when-warm`)."""
        waits = [rt.transport.wait_warm() for rt in self.upstreams.values() if rt.policy.pool.min_warm > 0]
        if waits:
            await asyncio.gather(*waits)

    def not_warm(self) -> list[str]:
        """Upstreams whose pool has fewer idle connections than `pool.min_warm` now."""
        late = []
        for name, rt in sorted(self.upstreams.items()):
            need = rt.policy.pool.min_warm
            stats = rt.transport.pool_stats()
            if need > 0 and (stats is None or stats["idle"] < need):
                late.append(name)
        return late

    async def close(self) -> None:
        retired = list(self._retired)
        for task in retired:
            task.cancel()  # skips the grace period; the task still closes its transport
        # Wait for them, so no pool outlives the runtime; their errors are not ours to raise.
        await asyncio.gather(*retired, return_exceptions=True)
        for rt in self.upstreams.values():
            await rt.transport.close()
        self.upstreams = {}


async def _close_later(transport: Transport, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await transport.close()
