"""The failover stage on its own: when a failed call is ambiguous, and the probe path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from plugins.base import (
    FailoverContext,
    ProviderPlugin,
    Refused,
    Translated,
    Translator,
    TranslatorRun,
    WireAnswer,
    WireRequest,
    detail_value,
    encode_name,
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
    assert answer.status == status and answer.failover == f"refused; reason=ambiguous; detail={status}"
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
    assert answer.failover == "refused; reason=ambiguous; detail=timeout"  # what made it ambiguous
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
    assert answer.status == 500 and answer.failover == "refused; reason=ambiguous; detail=500"


# ---- a refused failover says why (contract 7.4 / 7.7 `detail=`) ------------------------------


class Refusing(Primary):
    """A primary whose translator refuses every call with the given names."""

    def __init__(self, reason: str, names: tuple[str, ...]) -> None:
        super().__init__()
        self.reason = reason
        self.names = names

    def failover_to(self, target: ProviderPlugin) -> Translator | None:
        def refuse(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
            raise Refused(self.reason, "log text with a value: 4111111111111111", names=self.names)
            yield request  # pragma: no cover - a generator that refuses before its first request

        return refuse


def test_detail_names_percent_encode_the_header_separators() -> None:
    assert encode_name("expand") == "expand"
    assert encode_name("purchase_units[0].shipping") == "purchase_units[0].shipping"
    assert encode_name("a;b") == "a%3Bb"
    assert encode_name("c,d") == "c%2Cd"
    assert encode_name("e=f") == "e%3Df"
    assert encode_name("100%") == "100%25"  # so a decoder gets the name back exactly
    assert encode_name("h:X\r\nSet-Cookie") == "h:X%0D%0ASet-Cookie"  # never breaks the header line
    assert encode_name("café") == "caf%C3%A9"
    assert detail_value(["expand", "Stripe-Account", "expand"]) == "expand,Stripe-Account"
    assert detail_value([]) == ""


def test_detail_is_capped_and_counts_what_it_left_out() -> None:
    names = [f"field_{i:04d}" for i in range(500)]
    value = detail_value(names)
    assert len(value) < 500
    shown = value.split(",")
    assert shown[0] == "field_0000" and shown[-1] == f"+{500 - (len(shown) - 1)}"


async def test_refusal_names_go_in_the_header_and_the_message() -> None:
    h = Harness(Refusing("lossy", ("expand", "a;b", "c,d", "e=f")), on=["circuit_open"])

    async def primary(call: Call) -> Response:
        raise ProxyError("circuit_open", "circuit open for upstream prim", retry_after=5)

    answer = await h.stage(h.call(), primary)
    assert answer.status == 503
    assert answer.failover == "refused; reason=lossy; detail=expand,a%3Bb,c%2Cd,e%3Df"
    message = json.loads(answer.body or b"{}")["error"]["message"]
    assert message == "circuit open for upstream prim; failover to fb refused: lossy (expand, a%3Bb, c%2Cd, e%3Df)"
    assert "4111" not in message  # the refusal's log text (which may hold values) is not told
    assert answer.headers["Retry-After"] == "5"
    assert h.fallback_calls == []


async def test_refusal_without_names_has_no_detail() -> None:
    h = Harness(Refusing("fallback_misconfigured", ()), on=["circuit_open"])

    async def primary(call: Call) -> Response:
        raise ProxyError("circuit_open", "circuit open")

    answer = await h.stage(h.call(), primary)
    assert answer.failover == "refused; reason=fallback_misconfigured"
    assert (
        json.loads(answer.body or b"{}")["error"]["message"]
        == "circuit open; failover to fb refused: fallback_misconfigured"
    )


async def test_refusal_keeps_the_primary_answer_and_adds_the_header() -> None:
    h = Harness(Refusing("unmappable_field", ("Stripe-Account",)), on=[503])

    async def primary(call: Call) -> Response:
        return Response(503, CIMultiDict({"X-Not-Processed": "1"}), b"primary's own body", upstream="prim")

    answer = await h.stage(h.call(), primary)
    assert answer.status == 503 and answer.body == b"primary's own body"
    assert answer.failover == "refused; reason=unmappable_field; detail=Stripe-Account"


async def test_ambiguous_detail_names_what_made_it_ambiguous() -> None:
    h = Harness(Primary(), on=[503, "timeout"])

    async def primary(call: Call) -> Response:
        assert call.story is not None
        call.story.attempts.append(Attempt("prim", "timeout"))
        call.story.attempts.append(Attempt("prim", "answered", 503))
        return Response(503, CIMultiDict(), b"err", upstream="prim")

    answer = await h.stage(h.call(), primary)
    assert answer.failover == "refused; reason=ambiguous; detail=timeout,503"
