"""Building a stage for a unit test: one StageContext recipe for every stage's tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from plugins.base import GenericPlugin, ProviderPlugin
from proxy.clock import Clock
from proxy.config.schema import Policy
from proxy.events import EventBus
from proxy.model import Call, Response
from proxy.pipeline import Guard, Guarded, Handler, StageContext, UpstreamHandle
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState

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


# How stage tests drive a stage: "wrapper" calls its `__call__` (the whole behaviour, as
# with any async state backend); "guarded" runs it the way the pipeline does, through
# `Guarded` (its synchronous enter/leave, handing over to `__call__` where it must).
# The `stage_mode` fixture (tests/conftest.py) runs a test module once in each mode.
STAGE_MODES = ("guarded", "wrapper")
mode = "wrapper"


class Driven:
    """A stage as a test calls it, `stage(call, nxt)`, in the current `mode`; every other
    attribute is the stage's own."""

    def __init__(self, stage: Any) -> None:
        self.stage = stage

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if mode == "guarded" and isinstance(self.stage, Guard):
            return await Guarded([self.stage], nxt)(call)
        result: Response = await self.stage(call, nxt)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stage, name)


def driven(stage: T | None) -> T:
    """`stage` (built by a factory that must not have left it out), driven as `mode` says."""
    assert stage is not None
    return cast(T, Driven(stage))
