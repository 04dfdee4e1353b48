"""Exactly once under real faults (contract 7.2, 7.7): every case counts the side effects
at the fake after the fault, not only the answer the app saw.

In-process egressd (tests/conftest.py `start_proxy`) against the packaged fakes over
loopback; the official SDKs where one exists. Cases that need a real process (kill -9,
restart on the same data dir) are in tests/test_exactly_once_process.py.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe

from fakes import FakeServer
from proxy.server import EgressServer
from tests.conftest import proxy_url

stripe.enable_telemetry = False
CROSSWALK = {"pm_card_visa": "8TX02017P3456"}
MAIL = {
    "personalizations": [{"to": [{"email": "b@example.org"}]}],
    "from": {"email": "a@example.com"},
    "subject": "order 42",
    "content": [{"type": "text/plain", "value": "thanks"}],
}


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("stripe", "paypal", "sendgrid", "mailgun", "echo")}
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def paypal_policy(url: str) -> dict[str, Any]:
    return {
        "upstream": "paypal",
        "target": url,
        "provider": "paypal",
        "auth": {
            "oauth_client_credentials": {
                "token_url": url + "/v1/oauth2/token",
                "client_id": "client-id-123",
                "client_secret": "secret-456",
            }
        },
        "idempotency": {"header": "PayPal-Request-Id", "generate": False},
    }


# -- 1. failover after an attempt that may have landed ------------------------------------------


async def test_503_after_charging_then_circuit_open_never_charges_twice(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    """Stripe charges, then answers 503; egressd's own retries open the circuit and the next
    attempt meets `circuit_open`. The call as a whole may have charged: no failover."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    sf.faults.status(503, path="/v1/payment_intents", processed=True)
    stripe_doc = {
        "upstream": "stripe",
        "target": sf.url,
        "provider": "stripe",
        "timeouts": {"connect": "1s", "attempt": "2s", "total": "10s"},
        "retry": {"attempts": 3, "backoff": {"initial": "5ms", "max": "10ms"}},
        "circuit_breaker": {"window": "30s", "min_requests": 2, "failure_rate": 0.5, "open_for": "30s"},
        "idempotency": {"replay_ttl": "24h"},
        "failover": [{"to": "paypal", "on": ["circuit_open"], "crosswalk": {"payment_methods": CROSSWALK}}],
    }
    server = await start_proxy([stripe_doc, paypal_policy(pf.url)])
    sc = stripe.StripeClient(
        "sk_test_123", base_addresses={"api": proxy_url(server) + "/stripe"}, max_network_retries=0
    )

    def pay(n: int) -> tuple[str, str | None]:
        try:
            pi = sc.v1.payment_intents.create(
                params={"amount": 1000 + n, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True},
                options={"idempotency_key": f"order-{n}"},
            )
            return "paid:" + pi.id, None
        except stripe.StripeError as exc:
            headers = exc.headers or {}
            return f"error:{exc.http_status}", headers.get("X-Egressd-Failover")

    results = await asyncio.gather(*(asyncio.to_thread(pay, n) for n in range(30)))
    # Amounts are unique per order: an order charged at both providers shows up in both.
    at_stripe = [e.data["amount"] for e in sf.ledger.effects("payment_intent.created")]
    at_paypal = [round(float(e.data["amount"]["value"]) * 100) for e in pf.ledger.effects("order.created")]
    assert len(at_stripe) == len(set(at_stripe)) and len(at_paypal) == len(set(at_paypal))
    assert not set(at_stripe) & set(at_paypal), (results, sorted(at_stripe), sorted(at_paypal))
    assert len(at_stripe) + len(at_paypal) <= 30
    # Those sent to Stripe were refused failover; only calls that never reached it moved.
    refused = [r for r in results if r[1] is not None and r[1].startswith("refused")]
    assert len(refused) == len(at_stripe) and all(r[1].startswith("refused; reason=ambiguous") for r in refused), (
        results
    )
    assert sum(1 for r in results if r[0].startswith("paid:pi_ppf_")) == len(at_paypal)


async def test_circuit_open_without_any_attempt_still_fails_over(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    """The honesty rule only refuses what may have landed: a call that never reached Stripe
    (the circuit was already open when it arrived) fails over as before."""
    sf, pf = fakes["stripe"], fakes["paypal"]
    await sf.stop()
    stripe_doc = {
        "upstream": "stripe",
        "target": sf.url,
        "provider": "stripe",
        "retry": {"attempts": 1},
        "circuit_breaker": {"window": "30s", "min_requests": 1, "failure_rate": 0.5, "open_for": "30s"},
        "idempotency": {"replay_ttl": "24h"},
        "failover": [{"to": "paypal", "on": ["circuit_open"], "crosswalk": {"payment_methods": CROSSWALK}}],
    }
    server = await start_proxy([stripe_doc, paypal_policy(pf.url)])
    url = proxy_url(server) + "/stripe/v1/payment_intents"
    form = "amount=2000&currency=usd&payment_method=pm_card_visa&confirm=true"
    headers = {"Authorization": "Bearer sk_test_1", "Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=form, headers={**headers, "Idempotency-Key": "a"}) as r:
            assert r.status == 502  # connect error: opens the circuit, not failed over (not listed)
        async with http.post(url, data=form, headers={**headers, "Idempotency-Key": "b"}) as r:
            assert r.status == 200, await r.text()
            assert r.headers["X-Egressd-Failover"] == "used; from=stripe"
    assert pf.ledger.count("order.captured") == 1


# -- 2. the app times out and resends ------------------------------------------------------------


def mail_policy(name: str, url: str, idempotency: dict[str, Any]) -> dict[str, Any]:
    provider: Any = {"name": "mailgun", "domain": "mg.example.com"} if name == "mailgun" else name
    if name == "echo":
        provider = "generic"
    return {
        "upstream": name,
        "target": url,
        "provider": provider,
        "timeouts": {"connect": "1s", "attempt": "5s", "total": "8s"},
        "idempotency": idempotency,
    }


SEND_CASES = {
    "sendgrid-keyless": ("sendgrid", "/v3/mail/send", "mail.sent", {"fingerprint_window": "10m", "generate": False}),
    "sendgrid-app-key": ("sendgrid", "/v3/mail/send", "mail.sent", {"replay_ttl": "24h"}),
    "mailgun-keyless": (
        "mailgun",
        "/v3/mg.example.com/messages",
        "message.queued",
        {"fingerprint_window": "10m", "generate": False},
    ),
    "generic-app-key": ("echo", "/send", "echo.POST", {"replay_ttl": "24h"}),
}


def _send_request(name: str, n: int, key: str | None) -> tuple[dict[str, str], Any]:
    headers: dict[str, str] = {"Authorization": "Bearer SG.app-key"}
    if name == "mailgun":
        headers["Authorization"] = "Basic " + base64.b64encode(b"api:key-app").decode()
    if key is not None:
        headers["Idempotency-Key"] = key
    if name == "mailgun":
        return headers, aiohttp.FormData({"from": "a@example.com", "to": f"b{n}@example.org", "text": "x"})
    return {**headers, "Content-Type": "application/json"}, {**MAIL, "subject": f"order {n}"}


@pytest.mark.parametrize("case", list(SEND_CASES))
async def test_app_timeout_then_resend_sends_once(start_proxy: Any, fakes: dict[str, FakeServer], case: str) -> None:
    """The upstream performs the send, then answers 3 s late; the app gives up after 1 s and
    resends. The first call is owned by egressd to its end; the resend joins it."""
    name, path, effect, idem = SEND_CASES[case]
    fake = fakes[name]
    fake.faults.add(kind="delay", seconds=3.0, phase="after", path=path)
    server = await start_proxy([mail_policy(name, fake.url, idem)])
    url = proxy_url(server) + f"/{name}{path}"

    async def send(n: int) -> list[int]:
        key = f"k-{uuid.uuid4().hex}" if "key" in case else None
        statuses: list[int] = []
        for timeout in (1.0, 10.0):  # the app's first try times out; its resend waits longer
            headers, body = _send_request(name, n, key)
            kwargs: dict[str, Any] = {"json": body} if isinstance(body, dict) else {"data": body}
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
                    async with http.post(url, headers=headers, **kwargs) as r:
                        await r.read()
                        statuses.append(r.status)
                        assert r.headers.get("Idempotent-Replayed") == "true"
            except TimeoutError:
                statuses.append(0)
        return statuses

    results = await asyncio.gather(*(send(n) for n in range(3)))
    await asyncio.sleep(0.2)
    assert fake.ledger.count(effect) == 3, (results, fake.ledger.counts())
    assert all(r[0] == 0 and r[1] in (200, 202) for r in results), results
    # Every accepted call has its one count, the abandoned first tries included.
    samples = [
        line for line in server.metrics.render().decode().splitlines() if line.startswith("egressd_requests_total{")
    ]
    total = sum(float(line.rsplit(" ", 1)[1]) for line in samples if f'upstream="{name}"' in line)
    assert total == 6, samples


async def test_disconnect_before_sending_does_not_send(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    """A call still waiting in the rate-limit queue when the app leaves was never sent: it
    ends there (a 499 line), and nothing reaches the upstream for it."""
    echo = fakes["echo"]
    doc = mail_policy("echo", echo.url, {"replay_ttl": "24h"})
    doc["rate_limit"] = {"rate": "1/s", "burst": 1, "queue": {"max_wait": "5s", "max_size": 10}}
    server = await start_proxy([doc])
    url = proxy_url(server) + "/echo/send"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={}, headers={"Idempotency-Key": "first"}) as r:
            assert r.status == 200
        with pytest.raises(TimeoutError):
            async with http.post(
                url, json={}, headers={"Idempotency-Key": "second"}, timeout=aiohttp.ClientTimeout(total=0.3)
            ) as r:
                await r.read()
    await asyncio.sleep(1.5)
    assert echo.ledger.count("echo.POST") == 1
    samples = server.metrics.render().decode()
    assert 'egressd_requests_total{outcome="app_gone",status="499",upstream="echo"} 1.0' in samples or (
        'status="499"' in samples and 'outcome="app_gone"' in samples
    ), samples


# -- 3. an ambiguous 5xx to a keyless send, and the SDK's own resend ------------------------------


async def test_mailgun_sdk_resend_after_ambiguous_503_is_replayed(
    start_proxy: Any, fakes: dict[str, FakeServer]
) -> None:
    from mailgun.client import Client
    from mailgun.config import RetryPolicy

    mg = fakes["mailgun"]
    mg.faults.add(kind="status", status=503, processed=True, count=1, path="/v3/mg.example.com/messages")
    server = await start_proxy([mail_policy("mailgun", mg.url, {"fingerprint_window": "10m", "generate": False})])

    def send() -> Any:
        # The SDK's default policy resends a 503; a short base delay keeps the test quick.
        with Client(
            auth=("api", "key"),
            api_url=proxy_url(server) + "/mailgun",
            retry_policy=RetryPolicy(max_retries=2, base_delay=0.05, max_delay=0.1),
        ) as client:
            return client.messages.create(
                domain="mg.example.com", data={"from": "a@example.com", "to": "b@example.org", "text": "x"}
            )

    resp = await asyncio.to_thread(send)
    assert mg.ledger.count("message.queued") == 1  # accepted once; the resends were answered from the record
    assert resp.status_code == 503
    assert resp.headers.get("Idempotent-Replayed") == "true"


async def test_not_processed_answers_leave_the_resend_free(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    """A 429 (not processed) is not recorded: the resend goes upstream and is sent once."""
    sg = fakes["sendgrid"]
    sg.faults.add(kind="status", status=429, count=1, path="/v3/mail/send")
    server = await start_proxy([mail_policy("sendgrid", sg.url, {"fingerprint_window": "10m", "generate": False})])
    url = proxy_url(server) + "/sendgrid/v3/mail/send"
    async with aiohttp.ClientSession() as http:
        for expected in (429, 202):
            async with http.post(url, json=MAIL, headers={"Authorization": "Bearer SG.k"}) as r:
                assert r.status == expected
    assert sg.ledger.count("mail.sent") == 1


# -- 5. a reload that touches the idempotency block ----------------------------------------------


async def test_reloads_keep_every_record(start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Any) -> None:
    import yaml

    echo = fakes["echo"]
    docs = [mail_policy("echo", echo.url, {"replay_ttl": "10m", "max_entries": 10000})]
    server: EgressServer = await start_proxy(docs)
    url = proxy_url(server) + "/echo/send"
    keys = [f"r-{i}" for i in range(40)]
    policy_file = server.settings.policies / "policies.yaml"
    async with aiohttp.ClientSession() as http:
        for key in keys:
            async with http.post(url, json={"k": key}, headers={"Idempotency-Key": key}) as r:
                assert r.status == 200
        for round_ in range(20):
            docs[0]["idempotency"]["replay_ttl"] = "11m" if round_ % 2 == 0 else "10m"
            docs[0]["idempotency"]["max_entries"] = 10000 + round_
            policy_file.write_text(yaml.safe_dump_all(docs))
            assert await server.reload("test")
            for key in keys[round_ * 2 : round_ * 2 + 2]:
                async with http.post(url, json={"k": key}, headers={"Idempotency-Key": key}) as r:
                    assert r.status == 200 and r.headers.get("Idempotent-Replayed") == "true"
    assert echo.ledger.count("echo.POST") == len(keys)
