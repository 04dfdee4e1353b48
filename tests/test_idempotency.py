"""The idempotency stage: keys, replay, mismatch, in-flight waits, fingerprint window."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from plugins.registry import load_plugin
from proxy.clock import FakeClock
from proxy.config.schema import Auth, Idempotency, Limits, Policy
from proxy.errors import ProxyError
from proxy.events import Event, EventBus, IdempotencyResult
from proxy.model import Call, RequestBody, Response
from proxy.pipeline import Handler
from proxy.stages.idempotency import build
from proxy.state.memory import MemoryState
from tests import calls
from tests.stagekit import stage_context


class Upstream:
    """A terminal handler that records calls and answers with real Response objects."""

    def __init__(
        self,
        clock: FakeClock,
        *,
        latency: float = 0.0,
        answer: Callable[[Call, int], Response] | None = None,
    ) -> None:
        self.clock = clock
        self.latency = latency
        self.calls: list[Call] = []
        self.bodies: list[bytes] = []
        self.answer = answer or (lambda call, n: Response(200, CIMultiDict({"X-N": str(n)}), b'{"n":%d}' % n))

    async def __call__(self, call: Call) -> Response:
        self.calls.append(call)
        self.bodies.append(b"".join([c async for c in call.body.chunks()]))
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
        ctx = stage_context(policy, self.clock, events=bus, state=self.state, plugin=plugin)
        stage = build(ctx)
        assert stage is not None
        self.stage = stage

    def handler(self, inner: Handler) -> Handler:
        async def run(call: Call) -> Response:
            return await self.stage(call, inner)

        return run

    def results(self) -> list[str]:
        return [e.result for e in self.events if isinstance(e, IdempotencyResult)]


def policy(**idem: Any) -> Policy:
    return Policy(upstream="stripe", target="https://api.stripe.com", idempotency=Idempotency(**idem))


def make_call(
    clock: FakeClock,
    *,
    method: str = "POST",
    path: str = "/v1/charges",
    query: str = "",
    body: bytes = b"amount=100",
    key: str | None = "k-1",
    header: str = "Idempotency-Key",
    auth: str = "Bearer sk_a",
    timeout: float = 30.0,
    extra: dict[str, str] | None = None,
) -> Call:
    headers: dict[str, str] = {"Authorization": auth}
    if key is not None:
        headers[header] = key
    headers.update(extra or {})
    return calls.make_call(
        clock, method, upstream="stripe", path=path, query=query, headers=headers, body=body, total=timeout,
        request_id="req-1",
    )  # fmt: skip


async def test_replay_returns_stored_answer_without_upstream() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    second = await handle(make_call(h.clock))
    assert len(up.calls) == 1
    assert first.status == second.status == 200
    assert second.body == b'{"n":1}'
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["X-N"] == "1"
    assert "Idempotent-Replayed" not in first.headers
    assert second.outcome == "replayed"
    assert second.upstream == "stripe"
    assert "replayed" in h.results()


async def test_concurrent_calls_with_one_key_reach_upstream_once() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, latency=0.5)
    handle = h.handler(up)
    a, b = await asyncio.gather(handle(make_call(h.clock)), handle(make_call(h.clock)))
    assert len(up.calls) == 1
    assert a.body == b.body == b'{"n":1}'
    assert [a.headers.get("Idempotent-Replayed"), b.headers.get("Idempotent-Replayed")].count("true") == 1
    assert "joined" in h.results()


async def test_waiter_wakes_at_once_in_process() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, latency=0.5)
    handle = h.handler(up)
    start = h.clock.now()
    await asyncio.gather(handle(make_call(h.clock)), handle(make_call(h.clock)))
    # woken by the owner's event, not by a later poll
    assert h.clock.now() - start < 0.5 + 0.01


async def test_same_key_different_body_is_422() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, body=b"amount=100"))
    with pytest.raises(ProxyError) as err:
        await handle(make_call(h.clock, body=b"amount=200"))
    assert err.value.code == "idempotency_mismatch"
    assert err.value.status == 422
    assert len(up.calls) == 1
    assert "mismatch" in h.results()


async def test_same_key_different_path_or_query_is_422() -> None:
    h = Harness(policy())
    handle = h.handler(Upstream(h.clock))
    await handle(make_call(h.clock))
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock, path="/v1/refunds"))
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock, query="expand=x"))


async def test_mismatch_while_in_flight() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, latency=1.0)
    handle = h.handler(up)
    first = asyncio.ensure_future(handle(make_call(h.clock, body=b"a")))
    await asyncio.sleep(0)
    with pytest.raises(ProxyError) as err:
        await handle(make_call(h.clock, body=b"b"))
    assert err.value.code == "idempotency_mismatch"
    assert (await first).status == 200


async def test_keys_are_scoped_by_credentials() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, auth="Bearer sk_a"))
    other = await handle(make_call(h.clock, auth="Bearer sk_b", body=b"different"))
    assert len(up.calls) == 2
    assert "Idempotent-Replayed" not in other.headers


async def test_generated_key_is_put_in_headers_and_kept() -> None:
    h = Harness(policy())
    seen: list[tuple[str | None, str | None]] = []

    async def inner(call: Call) -> Response:
        # a retry stage below would send this same call again
        for _ in range(2):
            seen.append((call.headers.get("Idempotency-Key"), call.idempotency_key))
        return Response(200, CIMultiDict(), b"ok")

    await h.handler(inner)(make_call(h.clock, key=None))
    assert seen[0][0] is not None and len(seen[0][0]) == 36
    assert seen[0] == seen[1]
    assert seen[0][0] == seen[0][1]
    assert "generated" in h.results()


async def test_no_generation_when_disabled() -> None:
    h = Harness(policy(generate=False))
    up = Upstream(h.clock)
    await h.handler(up)(make_call(h.clock, key=None))
    assert "Idempotency-Key" not in up.calls[0].headers
    assert up.calls[0].idempotency_key is None


async def test_generated_keys_do_not_replay() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, key=None))
    await handle(make_call(h.clock, key=None))
    assert len(up.calls) == 2
    assert up.calls[0].idempotency_key != up.calls[1].idempotency_key


async def test_app_key_is_forwarded_and_set_on_call() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    await h.handler(up)(make_call(h.clock, key="app-key"))
    assert up.calls[0].headers["Idempotency-Key"] == "app-key"
    assert up.calls[0].idempotency_key == "app-key"
    assert up.bodies[0] == b"amount=100"


async def test_paypal_header_name() -> None:
    h = Harness(policy(header="PayPal-Request-Id"))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, key="pp-1", header="PayPal-Request-Id"))
    again = await handle(make_call(h.clock, key="pp-1", header="PayPal-Request-Id"))
    assert len(up.calls) == 1
    assert again.headers["Idempotent-Replayed"] == "true"
    await handle(make_call(h.clock, key=None))
    assert up.calls[1].headers["PayPal-Request-Id"] == up.calls[1].idempotency_key


async def test_safe_methods_pass_through() -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, method="GET", key=None))
    await handle(make_call(h.clock, method="GET", key=None))
    assert len(up.calls) == 2
    assert "Idempotency-Key" not in up.calls[0].headers


@pytest.mark.parametrize("status", [500, 502, 503, 429])
async def test_incomplete_answers_are_not_stored(status: int) -> None:
    h = Harness(policy())
    up = Upstream(h.clock, answer=lambda call, n: Response(status if n == 1 else 200, CIMultiDict(), b"x"))
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    second = await handle(make_call(h.clock))
    assert first.status == status
    assert second.status == 200
    assert len(up.calls) == 2
    assert "Idempotent-Replayed" not in second.headers


async def test_client_errors_are_stored() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, answer=lambda call, n: Response(402, CIMultiDict(), b"card_declined"))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    again = await handle(make_call(h.clock))
    assert again.status == 402 and again.body == b"card_declined"
    assert len(up.calls) == 1


async def test_proxy_made_answers_are_not_stored() -> None:
    h = Harness(policy())

    def answer(call: Call, n: int) -> Response:
        if n == 1:
            return Response(400, CIMultiDict(), b"e", error_code="bad_request")
        return Response(200, CIMultiDict(), b"ok")

    up = Upstream(h.clock, answer=answer)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    assert (await handle(make_call(h.clock))).status == 200
    assert len(up.calls) == 2


async def test_connection_failure_releases_the_key() -> None:
    h = Harness(policy())
    calls = 0

    async def inner(call: Call) -> Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ProxyError("upstream_unreachable", "connection refused", detail="connect_error")
        return Response(200, CIMultiDict(), b"ok")

    handle = h.handler(inner)
    with pytest.raises(ProxyError):
        await handle(make_call(h.clock))
    assert (await handle(make_call(h.clock))).body == b"ok"
    assert calls == 2


async def test_joined_waiter_gets_the_owners_failure_and_a_later_call_sends_again() -> None:
    h = Harness(policy())
    calls = 0

    async def inner(call: Call) -> Response:
        nonlocal calls
        calls += 1
        await h.clock.sleep(0.3)
        if calls == 1:
            return Response(503, CIMultiDict({"Retry-After": "1"}), b"down")
        return Response(200, CIMultiDict(), b"ok")

    handle = h.handler(inner)
    a, b = await asyncio.gather(handle(make_call(h.clock)), handle(make_call(h.clock)))
    # The waiter joined the in-flight call: it gets a copy of its answer, never a send.
    assert (a.status, b.status) == (503, 503)
    assert b.body == b"down" and b.headers["Retry-After"] == "1" and b.headers["Idempotent-Replayed"] == "true"
    assert b.outcome is None and b.idempotency == "shared"
    assert calls == 1
    assert h.results() == ["joined", "shared"]
    # The 503 was not kept: a call that arrives after the release runs for real.
    c = await handle(make_call(h.clock))
    assert c.status == 200 and calls == 2


async def test_joined_waiter_gets_the_owners_error() -> None:
    h = Harness(policy())
    calls = 0

    async def inner(call: Call) -> Response:
        nonlocal calls
        calls += 1
        await h.clock.sleep(0.3)
        raise ProxyError("upstream_timeout", "too slow", detail="timeout")

    handle = h.handler(inner)
    results = await asyncio.gather(handle(make_call(h.clock)), handle(make_call(h.clock)), return_exceptions=True)
    # The owner gets its error; the timeout may have acted upstream (an ambiguous outcome,
    # recorded), so the waiter gets the same answer, replayed (contract 7.7), not a send.
    owner, waiter = results
    assert isinstance(owner, ProxyError) and owner.code == "upstream_timeout"
    assert isinstance(waiter, Response) and waiter.status == 504
    assert waiter.headers["X-Egressd-Error"] == "upstream_timeout" and waiter.headers["Idempotent-Replayed"] == "true"
    assert calls == 1
    # And so does a resend after it ended.
    again = await handle(make_call(h.clock))
    assert again.status == 504 and again.headers["Idempotent-Replayed"] == "true"
    assert calls == 1


async def test_joined_waiter_of_a_cancelled_owner_claims_again() -> None:
    clock = FakeClock(auto=False)
    h = Harness(policy(), clock)
    up = Upstream(clock, latency=1.0)
    handle = h.handler(up)
    owner = asyncio.ensure_future(handle(make_call(clock)))
    for _ in range(5):
        await asyncio.sleep(0)
    waiter = asyncio.ensure_future(handle(make_call(clock)))
    for _ in range(5):
        await asyncio.sleep(0)
    owner.cancel()
    for _ in range(300):
        clock.advance(0.01)
        await asyncio.sleep(0)
        if waiter.done():
            break
    answer = await waiter
    assert answer.status == 200 and len(up.calls) == 2


async def test_in_flight_wait_ends_at_deadline() -> None:
    clock = FakeClock(auto=False)
    h = Harness(policy(), clock)
    up = Upstream(clock, latency=100.0)
    handle = h.handler(up)
    first = asyncio.ensure_future(handle(make_call(clock, timeout=200)))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(handle(make_call(clock, timeout=1.0)))
    while not second.done():
        for _ in range(5):
            await asyncio.sleep(0)
        clock.advance(0.05)
    with pytest.raises(ProxyError) as err:
        second.result()
    assert err.value.code == "upstream_timeout"
    assert "still in flight" in err.value.message
    clock.advance(200)
    assert (await first).status == 200
    assert len(up.calls) == 1


async def test_replay_expires_after_replay_ttl() -> None:
    h = Harness(policy(replay_ttl=60))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    h.clock.advance(59)
    await handle(make_call(h.clock))
    assert len(up.calls) == 1
    h.clock.advance(2)
    await handle(make_call(h.clock))
    assert len(up.calls) == 2


async def test_replay_off_with_zero_ttl_still_sets_key() -> None:
    h = Harness(policy(replay_ttl=0))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock))
    await handle(make_call(h.clock))
    assert len(up.calls) == 2
    assert up.calls[0].idempotency_key == "k-1"


async def test_request_body_over_max_body_is_413() -> None:
    p = Policy(
        upstream="stripe",
        target="https://api.stripe.com",
        idempotency=Idempotency(),
        limits=Limits(max_body=10),
    )
    h = Harness(p)

    async def source() -> AsyncIterator[bytes]:
        yield b"0123456789"
        yield b"more"

    call = make_call(h.clock).replace(body=RequestBody(source=source(), max_body=10))
    up = Upstream(h.clock)
    with pytest.raises(ProxyError) as err:
        await h.handler(up)(call)
    assert err.value.code == "body_too_large"
    assert up.calls == []


@pytest.mark.parametrize("provider", ["stripe", "generic"])
async def test_answer_over_max_body_is_streamed_not_stored(provider: str) -> None:
    p = Policy(
        upstream="stripe",
        target="https://api.stripe.com",
        provider=provider,
        idempotency=Idempotency(),
        limits=Limits(max_body=100),
    )
    h = Harness(p)
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    def answer(call: Call, n: int) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"x" * 30

        return Response(200, CIMultiDict(), body=None, stream=stream(), release=release)

    up = Upstream(h.clock, answer=answer)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    assert first.stream is not None
    assert len(await first.read()) == 300
    assert released == [True]
    if provider == "stripe":
        # Stripe deduplicates on the key: the repeat goes upstream and Stripe answers it.
        await handle(make_call(h.clock))
        assert len(up.calls) == 2
        return
    # An upstream that does not deduplicate: the answer could not be recorded, so the
    # record stays in flight and a repeat is refused, never sent a second time.
    with pytest.raises(ProxyError) as info:
        await handle(make_call(h.clock, timeout=1.0))
    assert info.value.code == "upstream_timeout"
    assert len(up.calls) == 1


async def test_streamed_answer_within_limit_is_buffered_and_stored() -> None:
    h = Harness(policy())
    released: list[bool] = []

    async def release() -> None:
        released.append(True)

    def answer(call: Call, n: int) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b'{"id":'
            yield b'"ch_1"}'

        return Response(201, CIMultiDict({"Content-Length": "13"}), body=None, stream=stream(), release=release)

    up = Upstream(h.clock, answer=answer)
    handle = h.handler(up)
    first = await handle(make_call(h.clock))
    assert first.body == b'{"id":"ch_1"}' and first.stream is None
    assert released == [True]
    again = await handle(make_call(h.clock))
    assert again.status == 201 and again.body == b'{"id":"ch_1"}'


async def test_policy_auth_scopes_records() -> None:
    from pydantic import SecretStr

    p1 = Policy(
        upstream="stripe",
        target="https://api.stripe.com",
        idempotency=Idempotency(),
        auth=Auth(bearer=SecretStr("sk_one")),
    )
    h = Harness(p1)
    up = Upstream(h.clock)
    handle = h.handler(up)
    # the app's own Authorization does not matter when the policy injects auth
    await handle(make_call(h.clock, auth="Bearer a"))
    again = await handle(make_call(h.clock, auth="Bearer b"))
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert len(up.calls) == 1


# -- fingerprint window ---------------------------------------------------------------------


async def test_fingerprint_window_dedupes_keyless_identical_posts() -> None:
    h = Harness(policy(fingerprint_window=10))
    up = Upstream(h.clock)
    handle = h.handler(up)
    first = await handle(make_call(h.clock, key=None))
    second = await handle(make_call(h.clock, key=None))
    assert len(up.calls) == 1
    assert second.body == first.body
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "fingerprint_duplicate" in h.results()
    h.clock.advance(11)
    await handle(make_call(h.clock, key=None))
    assert len(up.calls) == 2


async def test_fingerprint_window_concurrent_duplicates_wait() -> None:
    h = Harness(policy(fingerprint_window=10))
    up = Upstream(h.clock, latency=0.2)
    handle = h.handler(up)
    answers = await asyncio.gather(*(handle(make_call(h.clock, key=None)) for _ in range(3)))
    assert len(up.calls) == 1
    assert {a.body for a in answers} == {b'{"n":1}'}


async def test_fingerprint_window_distinguishes_body_credentials_path() -> None:
    h = Harness(policy(fingerprint_window=10))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, key=None))
    await handle(make_call(h.clock, key=None, body=b"other"))
    await handle(make_call(h.clock, key=None, auth="Bearer sk_b"))
    await handle(make_call(h.clock, key=None, path="/v1/other"))
    assert len(up.calls) == 4


async def test_fingerprint_window_ignores_calls_with_app_key() -> None:
    h = Harness(policy(fingerprint_window=10, replay_ttl=0))
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, key="a"))
    await handle(make_call(h.clock, key="b"))
    assert len(up.calls) == 2


async def test_in_flight_claim_survives_the_entry_cap() -> None:
    h = Harness(policy(max_entries=2))
    up = Upstream(h.clock, latency=5)
    handle = h.handler(up)
    t1 = asyncio.ensure_future(handle(make_call(h.clock, key="K1")))
    await asyncio.sleep(0)
    t2 = asyncio.ensure_future(handle(make_call(h.clock, key="K2")))
    t3 = asyncio.ensure_future(handle(make_call(h.clock, key="K3")))
    await asyncio.sleep(0)
    t4 = asyncio.ensure_future(handle(make_call(h.clock, key="K1")))  # duplicate of in-flight K1
    answers = await asyncio.gather(t1, t2, t3, t4)
    keys = [c.headers["Idempotency-Key"] for c in up.calls]
    assert keys.count("K1") == 1 and len(keys) == 3
    assert answers[3].body == answers[0].body and answers[3].headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("method", ["PURGE", "post", "LOCK"])
async def test_methods_outside_the_idempotent_allow_list_are_guarded(method: str) -> None:
    h = Harness(policy())
    up = Upstream(h.clock)
    handle = h.handler(up)
    await handle(make_call(h.clock, method=method))
    again = await handle(make_call(h.clock, method=method))
    assert len(up.calls) == 1 and again.headers["Idempotent-Replayed"] == "true"


async def test_replayed_failover_answer_keeps_the_upstream_that_made_it() -> None:
    h = Harness(policy())
    up = Upstream(h.clock, answer=lambda call, n: Response(200, CIMultiDict(), b"x", upstream="paypal"))
    handle = h.handler(up)
    await handle(make_call(h.clock))
    again = await handle(make_call(h.clock))
    assert again.headers["Idempotent-Replayed"] == "true" and again.upstream == "paypal"
