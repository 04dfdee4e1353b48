"""The failover stage on its own: when a failed call is ambiguous, and the probe path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from plugins.base import (
    FailoverContext,
    ProviderPlugin,
    Translated,
    Translator,
    TranslatorRun,
    WireAnswer,
    WireRequest,
)
from proxy.clock import FakeClock
from proxy.config.schema import Policy
from proxy.errors import ProxyError
from proxy.model import Attempt, Call, RequestBody, Response
from proxy.pipeline import UpstreamHandle
from proxy.stages.failover import FailoverStage, build
from tests.stagekit import stage_context


def _translate(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    answer = yield WireRequest("POST", "/send", headers={"Content-Type": "application/json"}, body=request.body)
    body = b'{"via":"fallback","n":' + answer.body + b"}"
    return Translated(WireAnswer(200, {"Content-Type": "application/json"}, body))


class Primary(ProviderPlugin):
    """Documents a 503 carrying `X-Not-Processed: 1` as rejected before processing."""

    name = "primary"

    def __init__(self, probe: bool = False) -> None:
        super().__init__()
        self.probe = probe

    def not_processed(self, status: int, headers: Mapping[str, str]) -> bool:
        return status == 429 or (status == 503 and headers.get("X-Not-Processed") == "1")

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        return _translate

    def ambiguity_probe(self, request: WireRequest) -> WireRequest | None:
        return request if self.probe else None

    def probe_verdict(self, answer: WireAnswer) -> str:
        return "processed" if answer.status < 500 else "unknown"


class Fallback(ProviderPlugin):
    name = "fallback"


class Harness:
    def __init__(self, primary: Primary, on: list[Any], *, max_body: int = 1 << 20) -> None:
        self.clock = FakeClock()
        self.fallback_calls: list[Call] = []
        policy = Policy.model_validate(
            {
                "upstream": "prim",
                "target": "https://prim.example",
                "limits": {"max_body": max_body},
                "failover": [{"to": "fb", "on": on}],
            }
        )
        fb_policy = Policy.model_validate({"upstream": "fb", "target": "https://fb.example", "auth": {"bearer": "k"}})

        async def fallback(call: Call) -> Response:
            self.fallback_calls.append(call)
            return Response(200, CIMultiDict(), b"1", upstream="fb", attempts=1)

        handle = UpstreamHandle("fb", fallback, Fallback(), fb_policy)
        ctx = stage_context(policy, self.clock, plugin=primary, lookup=lambda name: handle if name == "fb" else None)
        stage = build(ctx)
        assert isinstance(stage, FailoverStage)
        self.stage = stage

    def call(self, method: str = "POST") -> Call:
        return Call(
            method=method,
            upstream="prim",
            path="/charge",
            query="",
            headers=CIMultiDictProxy(CIMultiDict({"Idempotency-Key": "k1"})),
            body=RequestBody(data=b"{}"),
            deadline=self.clock.now() + 30,
            started=self.clock.now(),
            request_id="r1",
            route="prim",
        )


class Tracked:
    """Primary answers whose connection release is counted."""

    def __init__(self) -> None:
        self.released: list[int] = []

    def answer(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"err", n: int = 0) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield body

        async def release() -> None:
            self.released.append(n)

        headers_ = CIMultiDict(headers or {})
        return Response(status, headers_, body=None, stream=stream(), release=release, upstream="prim")


async def test_503_the_plugin_documents_as_not_processed_fails_over() -> None:
    h = Harness(Primary(), on=[503])
    tracked = Tracked()

    async def primary(call: Call) -> Response:
        return tracked.answer(503, {"X-Not-Processed": "1"})

    answer = await h.stage(h.call(), primary)
    assert answer.status == 200 and answer.upstream == "fb" and answer.failover == "used; from=prim"
    assert len(h.fallback_calls) == 1 and tracked.released == [0]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_unsafe_5xx_without_a_not_processed_verdict_is_ambiguous(status: int) -> None:
    h = Harness(Primary(), on=[500, 502, 503, 504, "exhausted"])

    async def primary(call: Call) -> Response:
        return Response(status, CIMultiDict(), b"err", upstream="prim")

    answer = await h.stage(h.call(), primary)
    assert answer.status == status and answer.failover == "refused; reason=ambiguous"
    assert h.fallback_calls == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_safe_method_5xx_fails_over(method: str) -> None:
    h = Harness(Primary(), on=[500])

    async def primary(call: Call) -> Response:
        return Response(500, CIMultiDict(), b"err", upstream="prim")

    answer = await h.stage(h.call(method), primary)
    assert answer.status == 200 and len(h.fallback_calls) == 1


async def test_probe_answer_replaces_the_primary_and_closes_it() -> None:
    h = Harness(Primary(probe=True), on=[500])
    tracked = Tracked()
    sends: list[int] = []

    async def primary(call: Call) -> Response:
        sends.append(1)
        if len(sends) == 1:
            assert call.story is not None  # an earlier attempt timed out: ambiguous
            call.story.attempts.append(Attempt("prim", "timeout"))
            return tracked.answer(500, n=1)
        return Response(200, CIMultiDict(), b'{"id":"ch_1"}', upstream="prim")

    answer = await h.stage(h.call(), primary)
    assert answer.status == 200 and answer.body == b'{"id":"ch_1"}'
    assert answer.failover == "skipped; reason=ambiguous; probe=answered"
    assert tracked.released == [1]  # the primary's 500 was not leaked
    assert h.fallback_calls == []


async def test_probe_read_failure_keeps_the_primary_error() -> None:
    h = Harness(Primary(probe=True), on=[500], max_body=10)
    tracked = Tracked()
    sends: list[int] = []

    async def primary(call: Call) -> Response:
        sends.append(1)
        if len(sends) == 1:
            assert call.story is not None
            call.story.attempts.append(Attempt("prim", "timeout"))
            return Response(500, CIMultiDict(), b"primary", upstream="prim")
        return tracked.answer(200, body=b"x" * 100, n=2)  # over max_body: read() raises

    answer = await h.stage(h.call(), primary)
    assert answer.status == 500 and answer.body == b"primary"
    assert answer.failover == "refused; reason=ambiguous"
    assert tracked.released == [2]


async def test_probe_error_keeps_the_primary_error() -> None:
    h = Harness(Primary(probe=True), on=[500])
    sends: list[int] = []

    async def primary(call: Call) -> Response:
        sends.append(1)
        if len(sends) == 1:
            return Response(500, CIMultiDict(), b"primary", upstream="prim")
        raise ProxyError("upstream_unreachable", "refused", detail="connect_error")

    answer = await h.stage(h.call(), primary)
    assert answer.status == 500 and answer.failover == "refused; reason=ambiguous"
