"""Pipeline assembly and runtime shutdown."""

from __future__ import annotations

import asyncio
import importlib

import pytest

from proxy import pipeline
from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.events import EventBus
from proxy.model import Call, Response
from proxy.pipeline import StageContext, build_pipeline
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
