"""Pipeline assembly, guards run in one frame, and runtime shutdown."""

from __future__ import annotations

import asyncio
import functools
import importlib
from typing import Any, Literal

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import pipeline
from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import EventBus
from proxy.model import Call, RequestBody, Response
from proxy.pipeline import Flow, Guard, Guarded, Handler, Pipeline, Result, StageContext, build_pipeline
from proxy.runtime import Runtime, _close_later
from proxy.state.memory import MemoryState
from tests.stagekit import stage_context


def _ctx() -> StageContext:
    policy = Policy.model_validate({"upstream": "up", "target": "https://up.example", "retry": {"attempts": 2}})
    return stage_context(policy, FakeClock())


@pytest.mark.parametrize(("block", "spec"), pipeline.STAGE_ORDER)
def test_a_stage_is_left_out_when_its_block_is(block: str, spec: str) -> None:
    """Every stage factory returns None for a policy without its block: it costs nothing."""
    module, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    assert factory(stage_context(Policy(upstream="up", target="http://127.0.0.1:9"), FakeClock())) is None


async def _terminal(call: Call) -> Response:
    raise AssertionError("not called")


def test_missing_stage_module_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "STAGE_ORDER", (("retry", "proxy.stages.no_such_stage:build"),))
    with pytest.raises(ImportError):
        build_pipeline(_ctx(), _terminal)


def test_stages_of_the_policy_are_built() -> None:
    assert build_pipeline(_ctx(), _terminal).stage_names == ("retry",)


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        await asyncio.sleep(0)
        self.closed = True


async def test_runtime_close_waits_for_retired_transports() -> None:
    clock = FakeClock()
    runtime = Runtime(clock, EventBus(), MemoryState(clock))
    transport = _Transport()
    task = asyncio.get_running_loop().create_task(_close_later(transport, 3600))  # type: ignore[arg-type]
    runtime._retired.add(task)
    await asyncio.sleep(0)
    await runtime.close()
    assert task.done() and transport.closed


# -- guards: consecutive guards in one frame, in the order the nested wrappers would run ----


class Traced(Guard):
    """A guard that writes what happens to it into `trace`; `enter_with` scripts `enter`."""

    def __init__(self, name: str, trace: list[str], *, enter_with: object = None, resume: bool = False) -> None:
        self.name = name
        self.trace = trace
        self.enter_with = enter_with
        self.resumes = resume

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        self.trace.append(f"{self.name}:call")
        try:
            return await nxt(call)
        finally:
            self.trace.append(f"{self.name}:return")

    def enter(self, call: Call) -> Any:
        if isinstance(self.enter_with, ProxyError):
            self.trace.append(f"{self.name}:refuse")
            raise self.enter_with
        if self.enter_with is Flow.ASYNC:
            return Flow.ASYNC
        self.trace.append(f"{self.name}:enter")
        return f"ticket-{self.name}"

    def leave(self, call: Call, ticket: Any, result: Result) -> Result | Literal[Flow.RESUME]:
        outcome = result.status if isinstance(result, Response) else result.code
        self.trace.append(f"{self.name}:leave:{ticket}:{outcome}")
        return Flow.RESUME if self.resumes else result

    def abandon(self, call: Call, ticket: Any) -> None:
        self.trace.append(f"{self.name}:abandon:{ticket}")

    async def resume(self, call: Call, result: Result, nxt: Handler) -> Response:
        self.trace.append(f"{self.name}:resume")
        return await nxt(call)  # one more attempt through what is inside this guard


def _call() -> Call:
    return Call("GET", "up", "/x", "", CIMultiDictProxy(CIMultiDict()), RequestBody.empty(), 60.0, 0.0, "r")


def _inner(trace: list[str], answer: int | BaseException = 200) -> Handler:
    async def inner(call: Call) -> Response:
        trace.append("inner")
        if isinstance(answer, BaseException):
            raise answer
        return Response(answer, CIMultiDict())

    return inner


async def test_guards_enter_outermost_first_and_leave_innermost_first() -> None:
    trace: list[str] = []
    run = Guarded([Traced("a", trace), Traced("b", trace), Traced("c", trace)], _inner(trace))
    assert (await run(_call())).status == 200
    assert trace == [
        "a:enter",
        "b:enter",
        "c:enter",
        "inner",
        "c:leave:ticket-c:200",
        "b:leave:ticket-b:200",
        "a:leave:ticket-a:200",
    ]


async def test_a_guard_that_needs_its_wrapper_gets_it_with_the_rest_inside() -> None:
    trace: list[str] = []
    run = Guarded([Traced("a", trace), Traced("b", trace, enter_with=Flow.ASYNC), Traced("c", trace)], _inner(trace))
    assert (await run(_call())).status == 200
    # b and c run as ordinary wrappers (c's own __call__, not its enter/leave); a leaves after.
    assert trace == ["a:enter", "b:call", "c:call", "inner", "c:return", "b:return", "a:leave:ticket-a:200"]


async def test_a_refusal_in_enter_is_the_result_the_outer_guards_see() -> None:
    trace: list[str] = []
    refused = ProxyError("circuit_open", "open")
    run = Guarded([Traced("a", trace), Traced("b", trace, enter_with=refused), Traced("c", trace)], _inner(trace))
    with pytest.raises(ProxyError) as info:
        await run(_call())
    assert info.value is refused
    assert trace == ["a:enter", "b:refuse", "a:leave:ticket-a:circuit_open"]


async def test_resume_goes_on_with_what_is_inside_that_guard() -> None:
    trace: list[str] = []
    run = Guarded([Traced("a", trace, resume=True), Traced("b", trace)], _inner(trace, 503))
    assert (await run(_call())).status == 503
    assert trace == [
        "a:enter",
        "b:enter",
        "inner",
        "b:leave:ticket-b:503",
        "a:leave:ticket-a:503",
        "a:resume",
        "b:call",
        "inner",
        "b:return",
    ]


@pytest.mark.parametrize("failure", [asyncio.CancelledError(), RuntimeError("bug")])
async def test_a_call_that_ends_without_a_result_is_abandoned_innermost_first(failure: BaseException) -> None:
    trace: list[str] = []
    run = Guarded([Traced("a", trace), Traced("b", trace)], _inner(trace, failure))
    with pytest.raises(type(failure)):
        await run(_call())
    assert trace == ["a:enter", "b:enter", "inner", "b:abandon:ticket-b", "a:abandon:ticket-a"]


async def test_a_failing_resume_abandons_the_guards_outside_it() -> None:
    trace: list[str] = []
    run = Guarded([Traced("a", trace), Traced("b", trace, resume=True)], _inner(trace, asyncio.CancelledError()))
    # The first attempt is cancelled inside b: both are abandoned, nobody resumes.
    with pytest.raises(asyncio.CancelledError):
        await run(_call())
    assert trace == ["a:enter", "b:enter", "inner", "b:abandon:ticket-b", "a:abandon:ticket-a"]

    trace.clear()
    answers: list[int | BaseException] = [503, asyncio.CancelledError()]

    async def flaky(call: Call) -> Response:
        trace.append("inner")
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return Response(answer, CIMultiDict())

    run = Guarded([Traced("a", trace), Traced("b", trace, resume=True)], flaky)
    with pytest.raises(asyncio.CancelledError):
        await run(_call())
    assert trace == ["a:enter", "b:enter", "inner", "b:leave:ticket-b:503", "b:resume", "inner", "a:abandon:ticket-a"]


def test_consecutive_guards_share_one_frame_and_other_stages_split_them() -> None:
    trace: list[str] = []

    class Plain:
        name = "plain"

        async def __call__(self, call: Call, nxt: Handler) -> Response:
            return await nxt(call)

    a, b, c = Traced("a", trace), Traced("b", trace), Traced("c", trace)
    built = Pipeline([a, b, Plain(), c], _inner(trace))
    outer, inner = built.guarded
    assert built.handle is outer.run and outer.guards == (a, b) and inner.guards == (c,)
    assert isinstance(outer.inner, functools.partial) and outer.inner.keywords["nxt"] is inner.run


def test_the_resilience_stages_of_a_policy_run_as_one_guarded_frame() -> None:
    policy = Policy.model_validate(
        {
            "upstream": "up",
            "target": "http://127.0.0.1:9",
            "retry": {"attempts": 2},
            "circuit_breaker": {},
            "rate_limit": {"rate": "10/s"},
        }
    )
    built = build_pipeline(stage_context(policy, FakeClock()), _terminal)
    (guarded,) = built.guarded
    assert built.handle is guarded.run and guarded.inner is _terminal
    assert [g.name for g in guarded.guards] == ["retry", "circuit_breaker", "rate_limit"]
