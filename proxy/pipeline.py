"""One call's way through egressd, outermost step first.

    idempotency -> outbox -> cache -> failover -> upstream (attempt loop) -> terminal

    idempotency   proxy/stages/idempotency.py  replay a stored answer; claim the key
    outbox        proxy/outbox/stage.py        keep a send durably and answer "accepted"
                                               (the delivery worker sends it later through
                                               the steps below: `Pipeline.below("outbox")`)
    cache         proxy/stages/cache.py        answer from the cache; stale-if-error
    failover      proxy/stages/failover.py     hand the call to a fallback upstream
    upstream      proxy/upstream.py            every attempt at the upstream: the retry
                                               policy, circuit breaker and rate limiter
                                               asked around each (read its docstring)
    terminal      Transport.send (proxy/transport.py), or OAuthSender.send (proxy/oauth.py)

The chain is built once per configuration load for each upstream (`build_pipeline`),
with only the steps its policy uses: a policy that leaves a block out pays nothing for
it. The outer stages are `async (call, next) -> Response` wrappers that each own one
concern. Retry, circuit breaker and rate limit are not wrappers: they are plain objects
(`RetryPolicy`, `CircuitBreaker`, `RateLimiter`) that the attempt loop calls; with none
of them (and no OAuth token to refresh), there is no loop and the terminal is called
directly. Why this order: docs/design.md, "Stage order".
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from proxy.clock import Clock
from proxy.events import EventBus
from proxy.model import Call, Response
from proxy.state.base import StateBackend

if TYPE_CHECKING:
    from plugins.base import ProviderPlugin
    from proxy.config.schema import Policy
    from proxy.oauth import OAuthSender
    from proxy.stages.circuit import CircuitBreaker
    from proxy.stages.ratelimit import RateLimiter
    from proxy.stages.retry import RetryPolicy

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


def stage_order() -> tuple[StageFactory, ...]:
    """The factories of the wrapper stages, outermost first. Each returns None when the
    policy does not use its block, and the stage is then left out of the chain. (A
    function, not a module constant: the stage modules import this one.)"""
    from proxy.outbox import stage as outbox
    from proxy.stages import cache, failover, idempotency

    return (idempotency.build, outbox.build, cache.build, failover.build)


class Pipeline:
    """The steps of one upstream under one policy: the wrapper stages around the attempt
    loop (proxy/upstream.py) around the terminal. `handle` is the entry point."""

    def __init__(
        self,
        stages: Sequence[Stage],
        terminal: Handler,
        *,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        limiter: RateLimiter | None = None,
        auth: OAuthSender | None = None,
    ) -> None:
        from proxy.upstream import attempt_loop

        self.wrappers = tuple(stages)
        self.retry = retry
        self.breaker = breaker
        self.limiter = limiter
        handler = terminal
        if retry is not None or breaker is not None or limiter is not None or auth is not None:
            handler = attempt_loop(terminal, retry=retry, breaker=breaker, limiter=limiter, auth=auth)
        self.upstream: Handler = handler  # what the innermost wrapper calls
        self._below: dict[str, Handler] = {}
        for stage in reversed(self.wrappers):
            self._below[stage.name] = handler
            handler = _bind(stage, handler)
        self.handle: Handler = handler

    def below(self, name: str) -> Handler:
        """The steps under the wrapper `name` (what it calls next): the outbox worker
        delivers a kept send there, so it is not kept again nor claimed twice."""
        return self._below.get(name, self.handle)

    @property
    def stages(self) -> tuple[Any, ...]:
        """Every step of the policy, outermost first, each with a `name` (and `snapshot()`
        for the circuit breaker and the rate limiter: the status page reads them)."""
        parts = (self.retry, self.breaker, self.limiter)
        return (*self.wrappers, *(p for p in parts if p is not None))

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)


def _bind(stage: Stage, nxt: Handler) -> Handler:
    # A partial, not a wrapper coroutine: one frame less per stage on every call.
    return functools.partial(stage.__call__, nxt=nxt)


def build_pipeline(ctx: StageContext, terminal: Handler, *, auth: OAuthSender | None = None) -> Pipeline:
    """The pipeline of `ctx.policy`: its wrapper stages, then the attempt loop with the
    retry policy, circuit breaker and rate limiter it uses, then `terminal`. `auth` (an
    upstream with `oauth_client_credentials`) sends the attempts with a token instead of
    `terminal` and lets the loop refresh a rejected one."""
    from proxy.stages import circuit, ratelimit, retry

    stages = [stage for stage in (factory(ctx) for factory in stage_order()) if stage is not None]
    return Pipeline(
        stages,
        terminal,
        retry=retry.build(ctx),
        breaker=circuit.build(ctx),
        limiter=ratelimit.build(ctx),
        auth=auth,
    )
