"""One call's way through egressd, outermost stage first.

    idempotency -> cache -> failover -> retry -> circuit -> rate limit -> transport

The chain is built once per configuration load for each upstream, with only the stages
its policy uses: a policy that leaves a block out pays nothing for it. Each stage is an
`async (call, next) -> Response` wrapper that owns one concern (proxy/stages/).
Why this order: docs/design.md, "Stage order".

Retry, circuit breaker and rate limit are also *guards*: their common case is a few
synchronous steps before and after the call (count it, let it through, record how it
ended). Consecutive guards run in one coroutine frame (`Guarded`) that calls those steps
in the same order the nested wrappers would; a guard that needs to wait or to talk to an
async state backend hands the call to its ordinary wrapper (`Flow.ASYNC`), and the retry
guard goes back to its wrapper's loop for a second attempt (`Flow.RESUME`).
"""

from __future__ import annotations

import abc
import enum
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

from proxy.clock import Clock
from proxy.errors import ProxyError
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


class Flow(enum.Enum):
    ASYNC = "async"  # from Guard.enter: this call takes the stage's ordinary wrapper
    RESUME = "resume"  # from Guard.leave: the wrapper's `resume` decides what comes back


# The members as module constants: `x is ASYNC` costs a fraction of `x is Flow.ASYNC`.
ASYNC: Final = Flow.ASYNC
RESUME: Final = Flow.RESUME

Result = Response | ProxyError


class Guard(abc.ABC):
    """A stage whose common case needs no await of its own (see the module docstring).

    `__call__` stays the whole behaviour, for any state backend; `enter` and `leave` are
    its synchronous common case, split around the call to the next handler:

    - `enter(call)`: the steps before the call. Returns a ticket for `leave`, or
      `Flow.ASYNC`, having changed nothing, when this call needs `__call__` (a queue
      wait, a state backend without synchronous operations). Raises `ProxyError` to
      refuse the call, as `__call__` would.
    - `leave(call, ticket, result)`: the steps after it, given the response or the
      `ProxyError` from inside; returns what goes out, or `Flow.RESUME` to have
      `resume(call, result, nxt)` decide (the retry loop after a first failed attempt).
    - `abandon(call, ticket)`: the call ended without a result (cancelled, or a bug
      raised something other than `ProxyError`).
    """

    name: str

    @abc.abstractmethod
    async def __call__(self, call: Call, nxt: Handler) -> Response:
        """The whole behaviour, for any state backend (what `Flow.ASYNC` hands over to)."""

    def enter(self, call: Call) -> Any:
        return Flow.ASYNC

    def leave(self, call: Call, ticket: Any, result: Result) -> Result | Literal[Flow.RESUME]:
        return result

    def abandon(self, call: Call, ticket: Any) -> None:
        return None

    async def resume(self, call: Call, result: Result, nxt: Handler) -> Response:
        raise TypeError(f"stage {self.name} returned Flow.RESUME without a resume()")


class Guarded:
    """Consecutive guards in one coroutine frame: `enter` outermost first, the handler
    inside them, then `leave` innermost first, exactly the order of the nested wrappers.

    `run` is the entry point (the pipeline binds it directly): a closure over the guards
    rather than an `async __call__`, which spares every call an instance-call dispatch
    and the attribute loads (under 1 us of ~75 per call under load: within the noise of
    bench/stages_ab.py, but never more expensive).
    """

    __slots__ = ("guards", "inner", "run")

    def __init__(self, guards: Sequence[Guard], inner: Handler) -> None:
        self.guards = tuple(guards)
        self.inner = inner
        # wrapped[i]: guard i and all inside it as ordinary wrappers (for Flow.ASYNC);
        # within[i]: what is inside guard i (for resume).
        handler = inner
        wrapped: list[Handler] = []
        within: list[Handler] = []
        for guard in reversed(self.guards):
            within.append(handler)
            handler = _bind(guard, handler)
            wrapped.append(handler)
        self.run: Handler = _runner(self.guards, inner, tuple(reversed(wrapped)), tuple(reversed(within)))

    def __call__(self, call: Call) -> Awaitable[Response]:
        return self.run(call)


def _runner(
    guards: tuple[Guard, ...], inner: Handler, wrapped: tuple[Handler, ...], within: tuple[Handler, ...]
) -> Handler:
    def abandon(call: Call, tickets: list[Any], count: int) -> None:
        """Tell the first `count` entered guards, innermost first, that the call is gone."""
        for i in range(count - 1, -1, -1):
            guards[i].abandon(call, tickets[i])

    async def run(call: Call) -> Response:
        tickets: list[Any] = []
        result: Result
        try:
            for guard in guards:
                ticket = guard.enter(call)
                if ticket is ASYNC:
                    result = await wrapped[len(tickets)](call)
                    break
                tickets.append(ticket)
            else:
                result = await inner(call)
        except ProxyError as exc:
            result = exc
        except BaseException:
            abandon(call, tickets, len(tickets))
            raise
        i = len(tickets)
        try:
            while i:
                i -= 1
                settled = guards[i].leave(call, tickets[i], result)
                if settled is RESUME:
                    try:
                        result = await guards[i].resume(call, result, within[i])
                    except ProxyError as exc:
                        result = exc
                else:
                    result = settled
        except BaseException:
            abandon(call, tickets, i)  # the guards outside guard i have not left yet
            raise
        if type(result) is Response:
            return result
        if isinstance(result, ProxyError):
            raise result
        return result

    return run


class Pipeline:
    """The stage chain of one upstream under one policy."""

    def __init__(self, stages: Sequence[Stage], terminal: Handler) -> None:
        self.stages = tuple(stages)
        handler = terminal
        run: list[Guard] = []  # consecutive guards met so far (innermost first)
        guarded: list[Guarded] = []
        for stage in reversed(self.stages):
            if isinstance(stage, Guard):
                run.append(stage)
                continue
            if run:
                guarded.append(Guarded(run[::-1], handler))
                handler, run = guarded[-1].run, []
            handler = _bind(stage, handler)
        if run:
            guarded.append(Guarded(run[::-1], handler))
            handler = guarded[-1].run
        self.guarded = tuple(reversed(guarded))  # outermost first
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
