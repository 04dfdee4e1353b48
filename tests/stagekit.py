"""Building a stage for a unit test: one StageContext recipe for every stage's tests, and
one way to run a retry policy, circuit breaker or rate limiter: in the attempt loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from plugins.base import GenericPlugin, ProviderPlugin
from proxy.clock import Clock
from proxy.config.schema import Policy
from proxy.events import EventBus
from proxy.model import Call, Response
from proxy.pipeline import Handler, StageContext, UpstreamHandle
from proxy.stages.circuit import CircuitBreaker
from proxy.stages.ratelimit import RateLimiter
from proxy.stages.retry import RetryPolicy
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState
from proxy.upstream import attempt_loop

T = TypeVar("T")


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


class Looped:
    """A retry policy, circuit breaker or rate limiter alone in the attempt loop
    (proxy/upstream.py), as the pipeline runs it: `looped(call, terminal)` makes one call
    with a fake terminal; every other attribute is the part's own."""

    def __init__(self, part: Any) -> None:
        self.part = part
        if isinstance(part, RetryPolicy):
            self.kind = "retry"
        elif isinstance(part, CircuitBreaker):
            self.kind = "breaker"
        else:
            assert isinstance(part, RateLimiter)
            self.kind = "limiter"

    async def __call__(self, call: Call, terminal: Handler) -> Response:
        return await attempt_loop(terminal, **{self.kind: self.part})(call)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.part, name)


def looped(part: T | None) -> T:
    """`part` (built by a factory that must not have left it out) in the attempt loop."""
    assert part is not None
    return cast(T, Looped(part))
