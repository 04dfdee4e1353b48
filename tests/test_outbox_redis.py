"""The outbox with `--redis`, end to end: two egressd replicas on one Redis and a fake
SendGrid. Every send is counted where it matters, at the provider (`mail.sent` in the
fake's ledger): delivered once, whichever replica accepted it, and once when the replica
holding it dies mid-delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from fakes import FakeServer
from proxy.outbox.redis_store import RedisOutbox
from proxy.server import EgressServer
from proxy.state.resilient import ResilientState, open_shared_state
from tests.conftest import proxy_url
from tests.redis_server import RedisServer

MAIL: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "ann@example.org"}]}],
    "from": {"email": "shop@example.com"},
    "subject": "Your order",
    "content": [{"type": "text/plain", "value": "Thanks"}],
}


@pytest.fixture
async def sendgrid() -> AsyncIterator[FakeServer]:
    fake = FakeServer("sendgrid")
    await fake.start()
    yield fake
    await fake.stop()


def policy(url: str, **extra: Any) -> dict[str, Any]:
    outbox = {"when": "always", "probe_after": "1500ms", **extra.pop("outbox", {})}
    return {
        "upstream": "sendgrid",
        "target": url,
        "provider": "sendgrid",
        "retry": {"attempts": 1},
        "outbox": outbox,
        **extra,
    }


@pytest.fixture
async def replica(
    redis_server: RedisServer, start_proxy: Callable[..., Awaitable[EgressServer]]
) -> Callable[..., Awaitable[EgressServer]]:
    """Start an egressd replica on the shared Redis (as `egressd run --redis` builds it)."""
    prefix = f"obx-{uuid.uuid4().hex[:8]}:"

    async def start(docs: list[dict[str, Any]]) -> EgressServer:
        state = open_shared_state(redis_server.url, prefix=prefix)
        assert await state.connect()
        server = await start_proxy(docs, state=state)
        assert isinstance(server.outbox_store, RedisOutbox) and server.outbox_store.name == "redis"
        assert server.outbox_store.instance == state.primary.replica_id
        return server

    return start


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def send(session: aiohttp.ClientSession, server: EgressServer, n: int) -> str:
    """One send through `server`; returns its outbox id (the answer is SendGrid's 202)."""
    mail = {**MAIL, "custom_args": {"n": str(n)}}
    async with session.post(
        proxy_url(server) + "/sendgrid/v3/mail/send",
        data=json.dumps(mail),
        headers={"Authorization": "Bearer SG.app-key", "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 202, await resp.text()
        outbox_id = resp.headers["X-Message-Id"]
        assert resp.headers["X-Egressd-Outbox"] == f"queued; id={outbox_id}"
        return outbox_id


def sent_per_n(fake: FakeServer) -> Counter[str]:
    return Counter(str(e.data["custom_args"]["n"]) for e in fake.ledger.effects("mail.sent"))


async def states(server: EgressServer) -> Counter[str]:
    return Counter(e.state for e in await server.outbox_store.list(limit=1000))


async def kill_abruptly(server: EgressServer) -> None:
    """The replica stops as under kill -9, as far as the others can tell: its worker and
    deliveries are cancelled where they are (nothing finished, nothing released) and its
    heartbeat stops (its last one is aged past OWNER_DEAD_AFTER)."""
    state = server.state
    assert isinstance(state, ResilientState)
    state._closed = True  # no probe loop (heartbeats) from here on
    if state._probe is not None:
        state._probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await state._probe
        state._probe = None
    await server.outbox.stop()  # cancels the deliveries in flight: no finish, no release
    client = state.primary.client
    secs, micros = await client.time()
    await client.zadd(f"{state.primary.prefix}replicas", {state.primary.replica_id: secs + micros / 1e6 - 60})


async def test_two_replicas_deliver_every_send_once(
    replica: Callable[..., Awaitable[EgressServer]], sendgrid: FakeServer
) -> None:
    a = await replica([policy(sendgrid.url)])
    b = await replica([policy(sendgrid.url)])
    async with aiohttp.ClientSession() as session:
        ids = await asyncio.gather(*(send(session, a if n < 40 else b, n) for n in range(50)))
    assert len(set(ids)) == 50
    await eventually(lambda: sendgrid.ledger.count("mail.sent") >= 50)
    await eventually(lambda: _all_delivered(a, 50))
    await asyncio.sleep(1.0)  # nothing more goes out (both workers keep running)
    assert sendgrid.ledger.count("mail.sent") == 50
    assert sent_per_n(sendgrid) == Counter({str(n): 1 for n in range(50)})
    # Each delivery was made by one replica, and both see every entry (one shared outbox).
    delivered = a.outbox.counts.get(("sendgrid", "delivered"), 0) + b.outbox.counts.get(("sendgrid", "delivered"), 0)
    assert delivered == 50
    assert await states(b) == Counter({"delivered": 50})
    by_id = {e.id: e for e in await b.outbox_store.list(limit=100)}
    provider_ids = {e.object_id for e in sendgrid.ledger.effects("mail.sent")}
    assert {by_id[i].provider_id for i in ids} == provider_ids


async def _all_delivered(server: EgressServer, n: int) -> bool:
    return (await states(server)).get("delivered", 0) == n


async def test_a_dead_replicas_held_sends_are_finished_by_another(
    replica: Callable[..., Awaitable[EgressServer]], sendgrid: FakeServer
) -> None:
    # The provider takes a send at once and answers a second later. Replica A paces its
    # deliveries (1/s), so when it dies it holds sends SendGrid already has but whose
    # answer A never got (sending), and sends waiting in its rate-limit queue (claimed,
    # never written).
    sendgrid.faults.add(kind="delay", seconds=1.0, phase="after", path="/v3/mail/send", method="POST")
    paced = policy(
        sendgrid.url,
        rate_limit={"rate": "1/s", "burst": 1, "queue": {"max_wait": "60s"}},
        outbox={"concurrency": 4},
    )
    a = await replica([paced])
    async with aiohttp.ClientSession() as session:
        ids = [await send(session, a, n) for n in range(12)]

    async def holds_both() -> bool:
        held = await states(a)
        return held.get("sending", 0) >= 1 and held.get("claimed", 0) >= 1

    await eventually(holds_both, within=10)
    await kill_abruptly(a)
    held = await states(a)
    assert held["sending"] >= 1 and held["claimed"] >= 1
    taken = sendgrid.ledger.count("mail.sent")
    assert taken >= 1  # SendGrid has a send whose answer A never got

    # Replica B (not paced) takes A's sends back: claimed -> queued and sent; sending ->
    # in doubt, then SendGrid's Email Activity API is asked before anything is resent.
    b = await replica([policy(sendgrid.url)])
    await eventually(lambda: _all_delivered(b, 12), within=30)
    await asyncio.sleep(1.0)
    assert sent_per_n(sendgrid) == Counter({str(n): 1 for n in range(12)})
    assert sendgrid.ledger.count("mail.sent") == 12
    assert sendgrid.ledger.requests_to("/v3/messages", "GET"), "B asked about the sends A was writing"
    entries = {e.id: e for e in await b.outbox_store.list(limit=100)}
    assert set(entries) == set(ids)
    assert all(e.owner == "" and e.body == b"" for e in entries.values())
    # Every one counted delivered once, by the replica that settled it (a send A was
    # writing when it died is counted by B, whose probe found it at the provider).
    delivered = a.outbox.counts.get(("sendgrid", "delivered"), 0) + b.outbox.counts.get(("sendgrid", "delivered"), 0)
    assert delivered == 12
