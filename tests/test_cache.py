"""The cache stage: hits, TTLs, coalescing, tenant isolation, what is never stored, stale."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from multidict import CIMultiDict
from pydantic import SecretStr

from plugins.registry import load_plugin
from proxy.clock import FakeClock
from proxy.config.schema import Auth, Cache, Policy
from proxy.errors import ProxyError
from proxy.events import CacheResult, Event, EventBus
from proxy.model import Call, Response
from proxy.pipeline import Handler
from proxy.stages.cache import build
from proxy.state.memory import MemoryState
from tests import calls
from tests.stagekit import stage_context

Answer = Callable[[Call, int], Response]


def ok(headers: dict[str, str] | None = None, body: bytes = b'{"ok":true}') -> Answer:
    def answer(call: Call, n: int) -> Response:
        return Response(200, CIMultiDict({"X-N": str(n), **(headers or {})}), body)

    return answer


class Upstream:
    def __init__(self, clock: FakeClock, answer: Answer | None = None, *, latency: float = 0.0) -> None:
        self.clock = clock
        self.answer = answer or ok()
        self.latency = latency
        self.calls: list[Call] = []

    async def __call__(self, call: Call) -> Response:
        self.calls.append(call)
        if self.latency:
            await self.clock.sleep(self.latency)
        return self.answer(call, len(self.calls))


class Harness:
    def __init__(self, policy: Policy, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.events: list[Event] = []
        bus = EventBus()
        bus.subscribe(self.events.append)
        self.state = MemoryState(self.clock)
        plugin = load_plugin(policy.provider.name, policy.provider.settings)
        stage = build(stage_context(policy, self.clock, events=bus, state=self.state, plugin=plugin))
        assert stage is not None
        self.stage = stage

    def handler(self, inner: Handler) -> Handler:
        async def run(call: Call) -> Response:
            return await self.stage(call, inner)

        return run

    def results(self) -> list[str]:
        return [e.result for e in self.events if isinstance(e, CacheResult)]


def policy(auth: Auth | None = None, **cache: Any) -> Policy:
    cache.setdefault("ttl", 60)
    return Policy(upstream="api", target="https://api.example.com/v2", auth=auth, cache=Cache(**cache))


def make_call(
    clock: FakeClock,
    *,
    method: str = "GET",
    path: str = "/items/1",
    query: str = "",
    auth: str | None = "Bearer tenant-a",
    extra: dict[str, str] | None = None,
) -> Call:
    headers: dict[str, str] = {} if auth is None else {"Authorization": auth}
    headers.update(extra or {})
    return calls.make_call(clock, method, upstream="api", path=path, query=query, headers=headers, total=30)


async def test_miss_then_hit() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    h.clock.advance(5)
    second = await handle(make_call(h.clock))
    assert len(up.calls) == 1
    assert first.cache == "miss"
    assert second.cache == "hit"
    assert second.body == first.body and second.status == 200
    assert second.headers["X-N"] == "1"
    assert second.headers["Age"] == "5"
    assert second.outcome == "cached"
    assert h.results() == ["miss", "store", "hit"]


@pytest.mark.parametrize("provider", ["stripe", "generic"])
async def test_provider_headers_select_the_answer(provider: str) -> None:
    """The provider plugin names its own representation-selecting headers: a Stripe
    connected account (`Stripe-Account`) never gets the platform's cached answer; for a
    generic API the header means nothing to the cache."""
    p = policy()
    p = p.model_copy(update={"provider": p.provider.model_copy(update={"name": provider})})
    h = Harness(p)
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    other = await handle(make_call(h.clock, extra={"Stripe-Account": "acct_1"}))
    assert other.cache == ("miss" if provider == "stripe" else "hit")
    assert len(up.calls) == (2 if provider == "stripe" else 1)


async def test_ttl_expiry() -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    h.clock.advance(59)
    assert (await handle(make_call(h.clock))).cache == "hit"
    h.clock.advance(2)
    again = await handle(make_call(h.clock))
    assert again.cache == "miss"
    assert len(up.calls) == 2


async def test_max_age_shorter_than_ttl_wins() -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(h.clock, ok({"Cache-Control": "public, max-age=10"}))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    h.clock.advance(9)
    assert (await handle(make_call(h.clock))).cache == "hit"
    h.clock.advance(2)
    assert (await handle(make_call(h.clock))).cache == "miss"


async def test_s_maxage_and_age_count() -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(h.clock, ok({"Cache-Control": "max-age=100, s-maxage=30", "Age": "20"}))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    h.clock.advance(9)
    assert (await handle(make_call(h.clock))).cache == "hit"
    h.clock.advance(2)
    assert (await handle(make_call(h.clock))).cache == "miss"


async def test_max_age_zero_is_not_stored() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, ok({"Cache-Control": "max-age=0"}))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_fifty_concurrent_identical_gets_reach_upstream_once() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, latency=0.2)
    handle = h.handler(up)
    answers = await asyncio.gather(*(handle(make_call(h.clock)) for _ in range(50)))
    assert len(up.calls) == 1
    assert all(a.status == 200 and a.body == b'{"ok":true}' for a in answers)
    assert all(a.cache == "miss" for a in answers)
    assert sum(1 for a in answers if a.cache_coalesced) == 49
    # followers get their own copies
    answers[1].headers["X-Changed"] = "1"
    assert "X-Changed" not in answers[2].headers


async def test_coalesced_errors_are_shared_not_cached() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, lambda call, n: Response(500, CIMultiDict(), b"boom"), latency=0.2)
    handle = h.handler(up)
    answers = await asyncio.gather(*(handle(make_call(h.clock)) for _ in range(5)))
    assert len(up.calls) == 1
    assert {a.status for a in answers} == {500}
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_coalesced_proxy_error_is_raised_to_followers() -> None:
    h = Harness(policy())

    async def inner(call: Call) -> Response:
        await h.clock.sleep(0.2)
        raise ProxyError("upstream_timeout", "too slow")

    handle = h.handler(inner)
    results = await asyncio.gather(*(handle(make_call(h.clock)) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, ProxyError) and r.code == "upstream_timeout" for r in results)


async def test_private_answers_are_not_shared_with_followers() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, ok({"Cache-Control": "private"}), latency=0.2)
    handle = h.handler(up)
    await asyncio.gather(*(handle(make_call(h.clock)) for _ in range(3)))
    assert len(up.calls) == 3


async def test_tenants_never_share_entries() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, lambda call, n: Response(200, CIMultiDict(), call.headers.get("Authorization", "").encode()))
    handle = h.handler(up)
    a = await handle(make_call(h.clock, auth="Bearer tenant-a"))
    b = await handle(make_call(h.clock, auth="Bearer tenant-b"))
    c = await handle(make_call(h.clock, auth=None, extra={"X-Api-Key": "k1"}))
    d = await handle(make_call(h.clock, auth=None, extra={"X-Api-Key": "k2"}))
    assert [a.body, b.body] == [b"Bearer tenant-a", b"Bearer tenant-b"]
    assert len(up.calls) == 4
    assert (c.cache, d.cache) == ("miss", "miss")
    again = await handle(make_call(h.clock, auth="Bearer tenant-b"))
    assert again.cache == "hit" and again.body == b"Bearer tenant-b"


async def test_concurrent_tenants_are_not_coalesced() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, latency=0.2)
    handle = h.handler(up)
    await asyncio.gather(handle(make_call(h.clock, auth="Bearer a")), handle(make_call(h.clock, auth="Bearer b")))
    assert len(up.calls) == 2


async def test_policy_auth_is_the_credential() -> None:
    h1 = Harness(policy(auth=Auth(bearer=SecretStr("sk_1"))))
    up = Upstream(h1.clock)
    handle = h1.handler(up)
    await handle(make_call(h1.clock, auth="Bearer x"))
    assert (await handle(make_call(h1.clock, auth="Bearer y"))).cache == "hit"


async def test_url_query_and_accept_are_part_of_the_key() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    await handle(make_call(h.clock, path="/items/2"))
    await handle(make_call(h.clock, query="a=1"))
    await handle(make_call(h.clock, extra={"Accept": "text/csv"}))
    assert len(up.calls) == 4
    assert (await handle(make_call(h.clock, query="a=1"))).cache == "hit"


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "no-store"},
        {"Cache-Control": "private, max-age=60"},
        {"Cache-Control": "no-cache"},
        {"Set-Cookie": "session=abc"},
        {"Vary": "*"},
        {"Vary": "X-Tenant"},
    ],
)
async def test_answers_that_must_not_be_stored(headers: dict[str, str]) -> None:
    h = Harness(policy())
    up = Upstream(h.clock, ok(headers))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    second = await handle(make_call(h.clock))
    assert len(up.calls) == 2
    assert second.cache == "miss"


@pytest.mark.parametrize("status", [500, 502, 503, 429, 400, 401, 403])
async def test_errors_are_never_cached(status: int) -> None:
    h = Harness(policy())
    up = Upstream(h.clock, lambda call, n: Response(status, CIMultiDict(), b"err"))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_proxy_made_answers_are_never_cached() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, lambda call, n: Response(200, CIMultiDict(), b"x", error_code="bad_request"))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


@pytest.mark.parametrize("status", [404, 410, 301, 204])
async def test_cacheable_non_200(status: int) -> None:
    h = Harness(policy())
    up = Upstream(h.clock, lambda call, n: Response(status, CIMultiDict(), b""))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    assert (await handle(make_call(h.clock))).status == status
    assert len(up.calls) == 1


async def test_request_no_store_bypasses() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    bypass = await handle(make_call(h.clock, extra={"Cache-Control": "no-store"}))
    assert bypass.cache is None
    assert len(up.calls) == 2
    assert "bypass" in h.results()


async def test_request_no_cache_skips_lookup_and_refreshes() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    fresh = await handle(make_call(h.clock, extra={"Cache-Control": "no-cache"}))
    assert fresh.cache == "miss" and fresh.headers["X-N"] == "2"
    assert (await handle(make_call(h.clock))).headers["X-N"] == "2"


async def test_other_methods_pass_through() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, method="POST"))
    r = await handle(make_call(h.clock, method="POST"))
    assert len(up.calls) == 2
    assert r.cache is None


async def test_stale_if_error_serves_stale_on_upstream_failure() -> None:
    h = Harness(policy(ttl=10, stale_if_error=60))
    mode = {"fail": "none"}

    async def inner(call: Call) -> Response:
        if mode["fail"] == "raise":
            raise ProxyError("upstream_unreachable", "refused")
        if mode["fail"] == "503":
            return Response(503, CIMultiDict(), b"down")
        return Response(200, CIMultiDict(), b"good")

    handle = h.handler(inner)
    await handle(make_call(h.clock))
    h.clock.advance(20)
    mode["fail"] = "raise"
    stale = await handle(make_call(h.clock))
    assert stale.cache == "stale" and stale.body == b"good"
    assert stale.headers["Age"] == "20"
    mode["fail"] = "503"
    assert (await handle(make_call(h.clock))).cache == "stale"
    h.clock.advance(60)  # past ttl + stale_if_error
    assert (await handle(make_call(h.clock))).status == 503
    mode["fail"] = "raise"
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock))
    assert "stale" in h.results()


async def test_stale_not_served_for_client_errors_or_without_setting() -> None:
    h = Harness(policy(ttl=10))
    mode = {"fail": False}

    async def inner(call: Call) -> Response:
        if mode["fail"]:
            raise ProxyError("upstream_unreachable", "refused")
        return Response(200, CIMultiDict(), b"good")

    handle = h.handler(inner)
    await handle(make_call(h.clock))
    h.clock.advance(11)
    mode["fail"] = True
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock))


async def test_stale_for_circuit_open_and_rate_limited_not() -> None:
    h = Harness(policy(ttl=10, stale_if_error=60))
    mode = {"code": ""}

    async def inner(call: Call) -> Response:
        if mode["code"]:
            raise ProxyError(mode["code"], "x")
        return Response(200, CIMultiDict(), b"good")

    handle = h.handler(inner)
    await handle(make_call(h.clock))
    h.clock.advance(11)
    mode["code"] = "circuit_open"
    assert (await handle(make_call(h.clock))).cache == "stale"
    mode["code"] = "rate_limited"
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock))


def streamed(size: int, chunk: int, *, content_length: bool) -> tuple[Answer, list[bool]]:
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    def answer(call: Call, n: int) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            for i in range(0, size, chunk):
                yield b"x" * min(chunk, size - i)

        headers: CIMultiDict[str] = CIMultiDict()
        if content_length:
            headers["Content-Length"] = str(size)
        return Response(200, headers, body=None, stream=stream(), release=release)

    return answer, released


async def test_over_max_entry_size_with_content_length_streams_through() -> None:
    h = Harness(policy(max_entry_size=100))
    answer, _released = streamed(1000, 100, content_length=True)
    up = Upstream(h.clock, answer)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    assert first.stream is not None and first.body is None
    assert len(await first.read()) == 1000
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_over_max_entry_size_without_length_streams_whole_answer() -> None:
    h = Harness(policy(max_entry_size=100))
    answer, released = streamed(1000, 30, content_length=False)
    up = Upstream(h.clock, answer)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    assert len(await first.read()) == 1000
    assert released == [True]
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_streamed_answer_within_size_is_cached() -> None:
    h = Harness(policy(max_entry_size=100))
    answer, released = streamed(90, 30, content_length=True)
    up = Upstream(h.clock, answer)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    assert first.body == b"x" * 90 and released == [True]
    hit = await handle(make_call(h.clock))
    assert hit.cache == "hit" and hit.body == b"x" * 90
    assert "Content-Length" not in hit.headers or hit.headers["Content-Length"] == "90"


async def test_max_entries_caps_the_upstream() -> None:
    h = Harness(policy(max_entries=2))
    up = Upstream(h.clock)
    handle = h.handler(up)
    for i in range(3):
        await handle(make_call(h.clock, path=f"/items/{i}"))
    assert (await handle(make_call(h.clock, path="/items/2"))).cache == "hit"
    assert (await handle(make_call(h.clock, path="/items/0"))).cache == "miss"


async def test_head_is_cached_separately_when_enabled() -> None:
    h = Harness(policy(methods=["GET", "HEAD"]))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, method="HEAD"))
    await handle(make_call(h.clock, method="GET"))
    assert len(up.calls) == 2
    assert (await handle(make_call(h.clock, method="HEAD"))).cache == "hit"


# -- regressions: partial/conditional answers, hostile numbers, upstream Age ------------------


def range_or_conditional(call: Call, n: int) -> Response:
    if "Range" in call.headers:
        return Response(206, CIMultiDict({"Content-Range": "bytes 0-3/100"}), b"abcd")
    if "If-None-Match" in call.headers:
        return Response(304, CIMultiDict({"ETag": '"x"'}), b"")
    return Response(200, CIMultiDict(), b"full body")


@pytest.mark.parametrize("lead", [{"Range": "bytes=0-3"}, {"If-None-Match": '"x"'}, {"If-Modified-Since": "x"}])
async def test_range_and_conditional_requests_go_straight_through(lead: dict[str, str]) -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(h.clock, range_or_conditional, latency=1)
    handle = h.handler(up)
    first = asyncio.ensure_future(handle(make_call(h.clock, extra=lead)))
    await asyncio.sleep(0)
    plain = asyncio.ensure_future(handle(make_call(h.clock)))  # same key without the header
    _r1, r2 = await asyncio.gather(first, plain)
    assert r2.status == 200 and r2.body == b"full body"
    assert not r2.cache_coalesced
    assert len(up.calls) == 2
    # a conditional/partial request is never answered from the cache either
    again = await handle(make_call(h.clock, extra=lead))
    assert again.cache is None and len(up.calls) == 3


@pytest.mark.parametrize("status", [206, 304, 412])
async def test_partial_or_not_modified_answers_are_not_shared(status: int) -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(
        h.clock, lambda call, n: Response(status if n == 1 else 200, CIMultiDict(), b"" if n == 1 else b"b"), latency=1
    )
    handle = h.handler(up)
    answers = await asyncio.gather(*(handle(make_call(h.clock)) for _ in range(3)))
    assert answers[0].status == status
    assert [a.status for a in answers[1:]] == [200, 200]
    assert len(up.calls) == 3


@pytest.mark.parametrize(
    "headers",
    [
        {"Cache-Control": "max-age=" + "9" * 400},
        {"Cache-Control": "s-maxage=" + "9" * 5000},
        {"Cache-Control": "max-age=60", "Age": "9" * 400},
        {"Cache-Control": "max-age=1e999, s-maxage=-5", "Age": "١٢"},
    ],
)
async def test_hostile_delta_seconds_do_not_escape(headers: dict[str, str]) -> None:
    h = Harness(policy(ttl=60))
    answer, released = streamed(10, 5, content_length=True)

    def hostile(call: Call, n: int) -> Response:
        response = answer(call, n)
        response.headers.update(headers)
        return response

    up = Upstream(h.clock, hostile)
    first = await h.handler(up)(make_call(h.clock))
    assert first.status == 200 and await first.read() == b"x" * 10 and released == [True]
    h.clock.advance(1)
    second = await h.handler(up)(make_call(h.clock))
    assert second.status == 200


async def test_answer_is_closed_when_the_stage_fails_after_receiving_it(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(policy(ttl=60))
    answer, released = streamed(10, 5, content_length=True)
    up = Upstream(h.clock, answer)

    def broken(response: Response) -> bool:
        raise ValueError("boom")

    monkeypatch.setattr(h.stage, "storable", broken)
    with pytest.raises(ValueError):
        await h.handler(up)(make_call(h.clock))
    assert released == [True]


async def test_upstream_age_is_kept_with_the_entry() -> None:
    h = Harness(policy(ttl=60, stale_if_error=600))
    up = Upstream(h.clock, ok({"Cache-Control": "max-age=60", "Age": "50"}))
    handle = h.handler(up)
    assert (await handle(make_call(h.clock))).cache == "miss"
    h.clock.advance(5)
    hit = await handle(make_call(h.clock))
    assert hit.cache == "hit" and hit.headers["Age"] == "55"
    h.clock.advance(25)  # 80 s old: the upstream said 10 s of freshness were left
    after = await handle(make_call(h.clock))
    assert after.cache == "miss" and len(up.calls) == 2


async def test_stale_answer_age_counts_upstream_age() -> None:
    h = Harness(policy(ttl=60, stale_if_error=600))
    mode = {"fail": False}

    async def inner(call: Call) -> Response:
        if mode["fail"]:
            raise ProxyError("upstream_unreachable", "refused")
        return Response(200, CIMultiDict({"Cache-Control": "max-age=60", "Age": "50"}), b"x")

    handle = h.handler(inner)
    await handle(make_call(h.clock))
    h.clock.advance(20)
    mode["fail"] = True
    stale = await handle(make_call(h.clock))
    assert stale.cache == "stale" and stale.headers["Age"] == "70"


async def test_cached_failover_answer_keeps_the_upstream_that_made_it() -> None:
    h = Harness(policy(ttl=60))
    up = Upstream(h.clock, lambda call, n: Response(200, CIMultiDict(), b"x", upstream="paypal"))
    handle = h.handler(up)
    assert (await handle(make_call(h.clock))).upstream == "paypal"
    hit = await handle(make_call(h.clock))
    assert hit.cache == "hit" and hit.upstream == "paypal"
