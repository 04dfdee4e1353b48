"""One call's way through egressd, outermost stage first.

    idempotency -> cache -> failover -> retry -> circuit -> rate limit -> transport

The chain is built once per configuration load for each upstream, with only the stages
its policy uses: a policy that leaves a block out pays nothing for it. Each stage is an
`async (call, next) -> Response` wrapper that owns one concern (proxy/stages/).
Why this order: docs/design.md, "Stage order".
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

from proxy.clock import Clock
from proxy.events import EventBus
from proxy.model import Call, Response
from proxy.state.base import StateBackend

if TYPE_CHECKING:
    from plugins.base import ProviderPlugin
    from proxy.config.schema import Policy

Handler = Callable[[Call], Awaitable[Response]]


class Stage(Protocol):
    name: str

    async def __call__(self, call: Call, nxt: Handler) -> Response: ...


@dataclass
class StageContext:
    """What a stage factory may use to build its stage for one upstream."""

    policy: Policy
    clock: Clock
    events: EventBus
    state: StateBackend
    plugin: ProviderPlugin
    # Looks up another upstream's runtime by name at call time (failover): returns its
    # pipeline entry point and plugin, or None when no such upstream is loaded now.
    lookup: Callable[[str], UpstreamHandle | None]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamHandle:
    name: str
    handle: Handler
    plugin: ProviderPlugin
    policy: Policy


StageFactory = Callable[[StageContext], "Stage | None"]

# (policy block, "module:factory"), outermost first. A factory returns None when the
# policy does not use its block, and the stage is then left out of the chain.
STAGE_ORDER: Sequence[tuple[str, str]] = (
    ("idempotency", "proxy.stages.idempotency:build"),
    ("cache", "proxy.stages.cache:build"),
    ("failover", "proxy.stages.failover:build"),
    ("retry", "proxy.stages.retry:build"),
    ("circuit_breaker", "proxy.stages.circuit:build"),
    ("rate_limit", "proxy.stages.ratelimit:build"),
)


def _factory(spec: str) -> StageFactory:
    """The factory named by `module:attr`. A missing stage module is an error (ImportError),
    never a silently thinner chain: a policy that asks for a block gets its stage."""
    module_name, _, attr = spec.partition(":")
    factory: StageFactory = getattr(import_module(module_name), attr)
    return factory


class Pipeline:
    """The stage chain of one upstream under one policy."""

    def __init__(self, stages: Sequence[Stage], terminal: Handler) -> None:
        self.stages = tuple(stages)
        handler = terminal
        for stage in reversed(self.stages):
            handler = _bind(stage, handler)
        self.handle: Handler = handler

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)


def _bind(stage: Stage, nxt: Handler) -> Handler:
    # A partial, not a wrapper coroutine: one frame less per stage on every call.
    return functools.partial(stage.__call__, nxt=nxt)


def build_pipeline(ctx: StageContext, terminal: Handler) -> Pipeline:
    stages: list[Stage] = []
    for block, spec in STAGE_ORDER:
        if getattr(ctx.policy, block, None) in (None, [], ()):
            continue
        stage = _factory(spec)(ctx)
        if stage is not None:
            stages.append(stage)
    return Pipeline(stages, terminal)
