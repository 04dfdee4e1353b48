"""Pipeline assembly, the attempt loop's steps and their order, and runtime shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.events import EventBus
from proxy.model import Call, RequestBody, Response
from proxy.pipeline import Handler, StageContext, build_pipeline, stage_order
from proxy.runtime import Runtime, _close_later
from proxy.stages import circuit, ratelimit, retry
from proxy.state.memory import MemoryState
from proxy.upstream import attempt_loop
from tests import calls
from tests.stagekit import stage_context


def _ctx() -> StageContext:
    policy = Policy.model_validate({"upstream": "up", "target": "https://up.example", "retry": {"attempts": 2}})
    return stage_context(policy, FakeClock())


@pytest.mark.parametrize("factory", [*stage_order(), retry.build, circuit.build, ratelimit.build])
def test_a_stage_is_left_out_when_its_block_is(factory: Any) -> None:
    """Every stage factory returns None for a policy without its block: it costs nothing."""
    assert factory(stage_context(Policy(upstream="up", target="http://127.0.0.1:9"), FakeClock())) is None


async def _terminal(call: Call) -> Response:
    raise AssertionError("not called")


def test_without_retry_circuit_and_rate_limit_there_is_no_loop() -> None:
    """The terminal itself is the pipeline's inner handler: no loop frame at all."""
    built = build_pipeline(stage_context(Policy(upstream="up", target="http://127.0.0.1:9"), FakeClock()), _terminal)
    assert built.handle is _terminal and built.upstream is _terminal and built.stage_names == ()


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


# -- the attempt loop: the order of its steps ------------------------------------------------


def _call(body: RequestBody | None = None) -> Call:
    return calls.make_call(FakeClock(), body=body)


class Traced:
    """Records every step the loop asks of a retry policy, breaker and limiter."""

    def __init__(self, trace: list[str]) -> None:
        self.trace = trace


class TracedRetry(Traced):
    def begin_now(self, call: Call) -> bool:
        self.trace.append("retry.begin")
        return True

    def settled(self, result: Response | ProxyError) -> bool:
        return isinstance(result, Response) and result.status < 400

    async def decide(self, call: Call, result: Response | ProxyError, attempt: int) -> float | str | None:
        self.trace.append(f"retry.decide:{attempt}")
        return 0.0 if attempt < 2 else "exhausted"

    async def wait(self, result: Response | ProxyError, delay: float) -> None:
        self.trace.append("retry.wait")

    def finish(self, result: Response | ProxyError, attempts: int, skip: str | None) -> Response:
        self.trace.append(f"retry.finish:{attempts}:{skip}")
        result.attempts = attempts
        if isinstance(result, ProxyError):
            raise result
        return result


class TracedBreaker(Traced):
    sync = True

    def __init__(self, trace: list[str], refuse: bool = False) -> None:
        super().__init__(trace)
        self.refuse = refuse

    def admit_now(self) -> bool:
        self.trace.append("breaker.admit")
        if self.refuse:
            raise ProxyError("circuit_open", "open")
        return True

    def record_now(self, failure: bool, trial: bool) -> None:
        self.trace.append(f"breaker.record:{failure}")

    def release_now(self) -> None:
        self.trace.append("breaker.release")


class TracedLimiter(Traced):
    pause_sync = True

    def admit_now(self) -> bool:
        self.trace.append("limiter.admit")
        return True

    def pause_asked(self, response: Response) -> float | None:
        self.trace.append(f"limiter.pause_asked:{response.status}")
        return 1.0 if response.status == 429 else None

    def pause_now(self, seconds: float) -> None:
        self.trace.append("limiter.pause")


def _loop(trace: list[str], answers: list[int | BaseException], **parts: Any) -> Handler:
    async def send(call: Call) -> Response:
        answer = answers.pop(0)
        trace.append(f"send:{answer!r}")
        if isinstance(answer, BaseException):
            raise answer
        return Response(answer, CIMultiDict())

    return attempt_loop(send, **parts)


async def test_each_attempt_passes_breaker_and_limiter_and_the_retry_policy_decides() -> None:
    trace: list[str] = []
    run = _loop(trace, [429, 200], retry=TracedRetry(trace), breaker=TracedBreaker(trace), limiter=TracedLimiter(trace))
    answer = await run(_call())
    assert answer.status == 200 and answer.attempts == 2
    assert trace == [
        "retry.begin",
        "breaker.admit",
        "limiter.admit",
        "send:429",
        "limiter.pause_asked:429",
        "limiter.pause",
        "breaker.record:False",
        "retry.decide:1",
        "retry.wait",
        "breaker.admit",
        "limiter.admit",
        "send:200",
        "limiter.pause_asked:200",
        "breaker.record:False",
    ]


async def test_an_open_circuit_is_the_attempts_result() -> None:
    trace: list[str] = []
    run = _loop(trace, [], retry=TracedRetry(trace), breaker=TracedBreaker(trace, refuse=True))
    with pytest.raises(ProxyError) as info:
        await run(_call())
    assert info.value.code == "circuit_open" and info.value.attempts == 2
    assert trace == [
        "retry.begin",
        "breaker.admit",
        "retry.decide:1",
        "retry.wait",
        "breaker.admit",
        "retry.decide:2",
        "retry.finish:2:exhausted",
    ]


@pytest.mark.parametrize(
    ("failure", "verdict"),
    [
        (ProxyError("upstream_unreachable", "x", detail="reset"), "breaker.record:True"),
        (ProxyError("rate_limited", "x"), "breaker.release"),  # no verdict: the trial slot back
        (asyncio.CancelledError(), "breaker.release"),
    ],
)
async def test_an_attempt_without_an_answer(failure: BaseException, verdict: str) -> None:
    trace: list[str] = []
    run = _loop(trace, [failure], breaker=TracedBreaker(trace))
    with pytest.raises(type(failure)):
        await run(_call())
    assert trace == ["breaker.admit", f"send:{failure!r}", verdict]


class FakeAuth:
    """An OAuth sender: tokens t1, t2...; records which token each attempt refused."""

    def __init__(self, trace: list[str], statuses: list[int]) -> None:
        self.trace = trace
        self.statuses = statuses
        self.issued = 0

    async def send(self, call: Call, rejected: str | None = None) -> tuple[Response, str]:
        if rejected is not None or not self.issued:
            self.issued += 1
        token = f"t{self.issued}"
        status = self.statuses.pop(0)
        self.trace.append(f"send:{token}:{status}:rejected={rejected}")
        return Response(status, CIMultiDict()), token

    def refused(self, call: Call) -> ProxyError:
        return ProxyError("upstream_auth_failed", "refused", detail="token_rejected")


async def test_a_rejected_token_is_refreshed_in_one_more_attempt_through_breaker_and_limiter() -> None:
    trace: list[str] = []
    auth = FakeAuth(trace, [401, 201])
    run = attempt_loop(_terminal, breaker=TracedBreaker(trace), limiter=TracedLimiter(trace), auth=auth)  # type: ignore[arg-type]
    answer = await run(_call())
    assert answer.status == 201 and answer.attempts == 2
    assert [t for t in trace if not t.startswith("limiter.pause_asked")] == [
        "breaker.admit",
        "limiter.admit",
        "send:t1:401:rejected=None",
        "breaker.record:False",
        "breaker.admit",
        "limiter.admit",
        "send:t2:201:rejected=t1",
        "breaker.record:False",
    ]


async def test_a_second_401_is_upstream_auth_failed_and_the_retry_policy_sees_it() -> None:
    trace: list[str] = []
    auth = FakeAuth(trace, [401, 401, 401])
    run = attempt_loop(_terminal, retry=TracedRetry(trace), auth=auth)  # type: ignore[arg-type]
    with pytest.raises(ProxyError) as info:
        await run(_call())
    assert info.value.code == "upstream_auth_failed" and info.value.detail == "token_rejected"
    assert info.value.attempts == 3  # 2 tries of the retry policy + 1 with a fresh token
    assert trace[:4] == ["retry.begin", "send:t1:401:rejected=None", "send:t2:401:rejected=t1", "retry.decide:1"]


async def test_a_401_for_a_body_that_cannot_be_sent_again_goes_back_as_is() -> None:
    async def once() -> Any:
        yield b"x"

    trace: list[str] = []
    auth = FakeAuth(trace, [401])
    run = attempt_loop(_terminal, auth=auth)  # type: ignore[arg-type]
    answer = await run(_call(RequestBody(source=once())))
    assert answer.status == 401 and trace == ["send:t1:401:rejected=None"]


def test_the_resilience_parts_of_a_policy_are_steps_of_one_loop() -> None:
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
    assert built.handle is built.upstream and built.handle is not _terminal
    assert built.stage_names == ("retry", "circuit_breaker", "rate_limit")
    assert [type(s).__name__ for s in built.stages] == ["RetryPolicy", "CircuitBreaker", "RateLimiter"]
