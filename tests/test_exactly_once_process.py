"""Exactly once across restarts and replicas, with real processes and a real Redis.

* kill -9 and restart on the same `--data-dir`: completed records are replayed, records
  cut off in flight are in doubt (502 `in_doubt`, not sent) unless the upstream
  deduplicates on the key, and the failover routing ledger still routes a refund;
* two replicas on one Redis under a burst of simultaneous identical calls: one send each;
* Redis paused past the claim budget, and Redis restarted empty mid-flight.

The fakes run in the test's event loop and count what reached them.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe

from fakes import FakeServer
from proxy.events import EventBus
from proxy.state.resilient import open_shared_state
from tests.conftest import proxy_url
from tests.egressd_process import Egressd
from tests.redis_server import RedisServer, require_redis

stripe.enable_telemetry = False
CROSSWALK = {"pm_card_visa": "8TX02017P3456"}
MAIL = {
    "personalizations": [{"to": [{"email": "b@example.org"}]}],
    "from": {"email": "a@example.com"},
    "subject": "order 42",
    "content": [{"type": "text/plain", "value": "thanks"}],
}


def sendgrid_doc(url: str, **idem: Any) -> dict[str, Any]:
    return {
        "upstream": "sendgrid",
        "target": url,
        "provider": "sendgrid",
        "timeouts": {"connect": "1s", "attempt": "20s", "total": "30s"},
        "idempotency": {"fingerprint_window": "10m", "replay_ttl": "24h", "generate": False, **idem},
    }


async def post(
    url: str, *, json: Any = None, data: Any = None, headers: dict[str, str] | None = None, wait: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=wait)) as http:
        async with http.post(url, json=json, data=data, headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.read()


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- kill -9 and restart on the same data dir ------------------------------------------------------


async def test_kill9_restart_replays_completed_and_refuses_in_doubt(
    egressd_factory: Callable[..., Egressd], tmp_path: Path
) -> None:
    async with FakeServer("sendgrid") as sg:
        proc = egressd_factory([sendgrid_doc(sg.url)], data_dir=tmp_path / "data")
        await asyncio.to_thread(proc.start)
        url = proc.url + "/sendgrid/v3/mail/send"
        auth = {"Authorization": "Bearer SG.k"}
        # Completed before the kill: a keyed and a keyless send.
        assert (await post(url, json=MAIL, headers={**auth, "Idempotency-Key": "done-1"}))[0] == 202
        keyless = {**MAIL, "subject": "keyless"}
        assert (await post(url, json=keyless, headers=auth))[0] == 202
        # Cut off by the kill: the upstream took the send and answers late.
        sg.faults.add(kind="delay", seconds=5.0, phase="after", path="/v3/mail/send")
        cut_keyed = asyncio.ensure_future(post(url, json={**MAIL, "subject": "cut"},
                                               headers={**auth, "Idempotency-Key": "cut-1"}))  # fmt: skip
        cut_keyless = asyncio.ensure_future(post(url, json={**MAIL, "subject": "cut-keyless"}, headers=auth))
        await wait_for(lambda: sg.ledger.count("mail.sent") == 4)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        for task in (cut_keyed, cut_keyless):
            with pytest.raises(aiohttp.ClientError):
                await task
        sg.faults.clear()
        await asyncio.to_thread(proc.start)
        sent = sg.ledger.count("mail.sent")
        status, headers, _ = await post(url, json=MAIL, headers={**auth, "Idempotency-Key": "done-1"})
        assert status == 202 and headers["Idempotent-Replayed"] == "true"
        status, headers, _ = await post(url, json=keyless, headers=auth)
        assert status == 202 and headers["Idempotent-Replayed"] == "true"
        for body, extra in (({**MAIL, "subject": "cut"}, {"Idempotency-Key": "cut-1"}),
                            ({**MAIL, "subject": "cut-keyless"}, {})):  # fmt: skip
            status, headers, _ = await post(url, json=body, headers={**auth, **extra})
            assert status == 502, headers
            assert headers["X-Egressd-Error"] == "upstream_unreachable"
            assert headers["X-Egressd-Error-Detail"] == "in_doubt"
        assert sg.ledger.count("mail.sent") == sent == 4


async def test_kill9_with_redis_resend_is_in_doubt(
    egressd_factory: Callable[..., Egressd], own_redis: RedisServer
) -> None:
    """With --redis the record lives in Redis: a replica killed mid-call stops sending
    heartbeats, and a resend through the restarted one is answered in_doubt, not sent."""
    async with FakeServer("sendgrid") as sg:
        proc = egressd_factory([sendgrid_doc(sg.url)], redis_url=own_redis.url)
        await asyncio.to_thread(proc.start)
        url = proc.url + "/sendgrid/v3/mail/send"
        auth = {"Authorization": "Bearer SG.k", "Idempotency-Key": "redis-cut-1"}
        sg.faults.add(kind="delay", seconds=5.0, phase="after", path="/v3/mail/send")
        cut = asyncio.ensure_future(post(url, json=MAIL, headers=auth))
        await wait_for(lambda: sg.ledger.count("mail.sent") == 1)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        with pytest.raises(aiohttp.ClientError):
            await cut
        sg.faults.clear()
        await asyncio.to_thread(proc.start)
        status, headers, _ = await post(url, json=MAIL, headers=auth, wait=25)
        assert status == 502, headers
        assert headers["X-Egressd-Error-Detail"] == "in_doubt"
        assert sg.ledger.count("mail.sent") == 1


async def test_kill9_restart_stripe_resend_goes_out_with_the_same_key(
    egressd_factory: Callable[..., Egressd], tmp_path: Path
) -> None:
    """Stripe deduplicates on the key it receives: an in-doubt record is taken over, the
    resend goes upstream with the same key, and Stripe answers it without a second charge."""
    async with FakeServer("stripe") as sf:
        doc = {
            "upstream": "stripe",
            "target": sf.url,
            "provider": "stripe",
            "timeouts": {"connect": "1s", "attempt": "20s", "total": "30s"},
            "idempotency": {"replay_ttl": "24h"},
        }
        proc = egressd_factory([doc], data_dir=tmp_path / "data")
        await asyncio.to_thread(proc.start)
        sc = stripe.StripeClient("sk_test_1", base_addresses={"api": proc.url + "/stripe"}, max_network_retries=0)
        params = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
        sf.faults.add(kind="delay", seconds=5.0, phase="after", path="/v1/payment_intents")
        first = asyncio.ensure_future(
            asyncio.to_thread(sc.v1.payment_intents.create, params=params, options={"idempotency_key": "ord-1"})
        )
        await wait_for(lambda: sf.ledger.count("payment_intent.created") == 1)
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        with pytest.raises(stripe.StripeError):
            await first
        sf.faults.clear()
        await asyncio.to_thread(proc.start)
        pi = await asyncio.to_thread(sc.v1.payment_intents.create, params=params, options={"idempotency_key": "ord-1"})
        assert pi.status == "succeeded"
        assert sf.ledger.count("payment_intent.created") == 1


async def test_kill9_restart_keeps_the_failover_ledger(egressd_factory: Callable[..., Egressd], tmp_path: Path) -> None:
    """A payment failed over to PayPal is refunded through PayPal after kill -9 and restart."""
    async with FakeServer("stripe") as sf, FakeServer("paypal") as pf:
        await sf.stop()  # Stripe down: connection refused, provably not processed
        stripe_doc = {
            "upstream": "stripe",
            "target": sf.url,
            "provider": "stripe",
            "retry": {"attempts": 1},
            "idempotency": {"replay_ttl": "24h"},
            "failover": [{"to": "paypal", "on": ["connect_error"], "crosswalk": {"payment_methods": CROSSWALK}}],
        }
        paypal_doc = {
            "upstream": "paypal",
            "target": pf.url,
            "provider": "paypal",
            "auth": {
                "oauth_client_credentials": {
                    "token_url": pf.url + "/v1/oauth2/token",
                    "client_id": "id",
                    "client_secret": "secret",
                }
            },
            "idempotency": {"header": "PayPal-Request-Id", "generate": False},
        }
        proc = egressd_factory([stripe_doc, paypal_doc], data_dir=tmp_path / "data")
        await asyncio.to_thread(proc.start)
        sc = stripe.StripeClient("sk_test_1", base_addresses={"api": proc.url + "/stripe"}, max_network_retries=0)
        pi = await asyncio.to_thread(
            sc.v1.payment_intents.create,
            params={"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
        )
        assert pi.id.startswith("pi_ppf_")
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        await sf.start()  # Stripe is back, and knows nothing of pi_ppf_...
        await asyncio.to_thread(proc.start)
        refund = await asyncio.to_thread(sc.v1.refunds.create, params={"payment_intent": pi.id, "amount": 500})
        assert refund.status == "succeeded"
        assert pf.ledger.count("refund.created") == 1
        assert not sf.ledger.requests_to("/v1/refunds")


# -- two replicas on one Redis ---------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Path) -> Any:
    require_redis()
    server = RedisServer()
    server.start()
    yield server
    server.cleanup()


async def _replica(start_proxy: Any, redis_url: str, prefix: str, docs: list[dict[str, Any]]) -> Any:
    bus = EventBus()
    state = open_shared_state(redis_url, prefix=prefix, events=bus)
    return await start_proxy(docs, state=state, events=bus)


async def test_two_replicas_burst_one_send_per_pair(start_proxy: Any, own_redis: RedisServer) -> None:
    prefix = f"eo-{uuid.uuid4().hex[:6]}:"
    async with FakeServer("sendgrid") as sg:
        docs = [sendgrid_doc(sg.url)]
        a = await _replica(start_proxy, own_redis.url, prefix, docs)
        b = await _replica(start_proxy, own_redis.url, prefix, docs)
        auth = {"Authorization": "Bearer SG.k"}
        connector = aiohttp.TCPConnector(limit=400)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(server: Any, body: Any, headers: dict[str, str]) -> int:
                async with http.post(proxy_url(server) + "/sendgrid/v3/mail/send", json=body, headers=headers) as r:
                    await r.read()
                    return r.status

            pairs = []
            for i in range(200):
                keyed = i % 2 == 0
                body = {**MAIL, "subject": f"pair {i}"}
                headers = {**auth, "Idempotency-Key": f"pair-{i}"} if keyed else auth
                pairs += [one(a, body, headers), one(b, body, headers)]
            statuses = await asyncio.gather(*pairs)
        sent = sg.ledger.effects("mail.sent")
        subjects = [e.data.get("subject") for e in sent]
        assert len(sent) == len(set(subjects)), "a pair was sent twice"
        assert all(s in (202, 503) for s in statuses), Counter(statuses)
        assert len(sent) == sum(1 for i in range(200) if 202 in statuses[2 * i : 2 * i + 2])


async def test_redis_paused_refuses_claims_and_sends_nothing_twice(start_proxy: Any, own_redis: RedisServer) -> None:
    prefix = f"eo-{uuid.uuid4().hex[:6]}:"
    async with FakeServer("sendgrid") as sg:
        docs = [sendgrid_doc(sg.url)]
        a = await _replica(start_proxy, own_redis.url, prefix, docs)
        b = await _replica(start_proxy, own_redis.url, prefix, docs)
        auth = {"Authorization": "Bearer SG.k", "Idempotency-Key": "paused-1"}
        url_a = proxy_url(a) + "/sendgrid/v3/mail/send"
        url_b = proxy_url(b) + "/sendgrid/v3/mail/send"
        own_redis.suspend()
        try:
            results = await asyncio.gather(post(url_a, json=MAIL, headers=auth, wait=15),
                                           post(url_b, json=MAIL, headers=auth, wait=15))  # fmt: skip
            status_json = await _status(a)
        finally:
            own_redis.resume()
        assert sg.ledger.count("mail.sent") == 0
        for status, headers, _ in results:
            assert status == 503 and headers["X-Egressd-Error"] == "state_unavailable"
            assert "Retry-After" in headers
        assert status_json["state_backend"]["health"].startswith("degraded")
        # Once Redis answers again, the resend is claimed by one replica and sent once.
        await asyncio.sleep(1.0)
        again = await asyncio.gather(post(url_a, json=MAIL, headers=auth), post(url_b, json=MAIL, headers=auth))
        assert sorted(r[0] for r in again) == [202, 202]
        assert sg.ledger.count("mail.sent") == 1


async def test_redis_restarted_empty_mid_flight_keeps_the_record(start_proxy: Any, own_redis: RedisServer) -> None:
    """Redis loses everything while a send is in flight: the completion is written anyway,
    so a repeat on the other replica is replayed, not sent."""
    prefix = f"eo-{uuid.uuid4().hex[:6]}:"
    async with FakeServer("sendgrid") as sg:
        docs = [sendgrid_doc(sg.url)]
        a = await _replica(start_proxy, own_redis.url, prefix, docs)
        b = await _replica(start_proxy, own_redis.url, prefix, docs)
        auth = {"Authorization": "Bearer SG.k", "Idempotency-Key": "empty-1"}
        sg.faults.add(kind="delay", seconds=1.0, phase="after", path="/v3/mail/send")
        first = asyncio.ensure_future(post(proxy_url(a) + "/sendgrid/v3/mail/send", json=MAIL, headers=auth))
        await wait_for(lambda: sg.ledger.count("mail.sent") == 1)
        own_redis.restart()  # no persistence: comes back empty
        assert (await first)[0] == 202
        await asyncio.sleep(1.0)
        status, headers, _ = await post(proxy_url(b) + "/sendgrid/v3/mail/send", json=MAIL, headers=auth)
        assert status == 202 and headers["Idempotent-Replayed"] == "true"
        assert sg.ledger.count("mail.sent") == 1


async def _status(server: Any) -> dict[str, Any]:
    result: dict[str, Any] = await server.status_data()
    return result
