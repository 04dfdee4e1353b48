"""Building a stage for a unit test: one StageContext recipe for every stage's tests."""

from __future__ import annotations

from collections.abc import Callable

from plugins.base import GenericPlugin, ProviderPlugin
from proxy.clock import Clock
from proxy.config.schema import Policy
from proxy.events import EventBus
from proxy.pipeline import StageContext, UpstreamHandle
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState


def stage_context(
    policy: Policy,
    clock: Clock,
    *,
    events: EventBus | None = None,
    state: StateBackend | None = None,
    plugin: ProviderPlugin | None = None,
    lookup: Callable[[str], UpstreamHandle | None] | None = None,
) -> StageContext:
    """A context with in-memory state on `clock`, the generic plugin and no other upstreams."""
    return StageContext(
        policy=policy,
        clock=clock,
        events=events if events is not None else EventBus(),
        state=state if state is not None else MemoryState(clock),
        plugin=plugin if plugin is not None else GenericPlugin(),
        lookup=lookup if lookup is not None else (lambda name: None),
    )
