"""The outbox (contract 7.6, docs/outbox.md): sends kept durably, answered in the
provider's shape, delivered later through the upstream's pipeline, at most once.

Every test counts the side effects at the fakes (`mail.sent`, `message.queued`), not only
the answers the app saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sendgrid import SendGridAPIClient

from fakes import FakeServer
from proxy.outbox.store import Entry, MemoryOutbox
from proxy.server import EgressServer
from proxy.state.factory import open_data_dir
from tests.conftest import proxy_url

MAIL: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "ann@example.org"}]}],
    "from": {"email": "shop@example.com"},
    "subject": "Your order",
    "content": [{"type": "text/plain", "value": "Thanks"}],
    "custom_args": {"order_id": "42"},
}


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("sendgrid", "mailgun")}
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def sendgrid_policy(url: str, **outbox: Any) -> dict[str, Any]:
    return {
        "upstream": "sendgrid",
        "target": url,
        "provider": "sendgrid",
        "retry": {"attempts": 1},
        "outbox": {"probe_after": "200ms", **outbox},
    }


def mailgun_policy(url: str, **outbox: Any) -> dict[str, Any]:
    return {
        "upstream": "mailgun",
        "target": url,
        "provider": {"name": "mailgun", "domain": "mg.example.com"},
        "retry": {"attempts": 1},
        "outbox": {"probe_after": "200ms", **outbox},
    }


async def eventually(check: Callable[[], Awaitable[bool] | bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def sdk_send(server: EgressServer, mail: dict[str, Any] | None = None) -> Any:
    client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
    return client.client.mail.send.post(request_body=mail or MAIL)


async def data_dir_server(start_proxy: Any, tmp_path: Path, docs: list[dict[str, Any]]) -> EgressServer:
    state = open_data_dir(tmp_path / "data")
    state.start()
    server: EgressServer = await start_proxy(docs, state=state)
    return server


# -- accept, answer, deliver ---------------------------------------------------------------------


async def test_always_answers_like_sendgrid_and_delivers_once(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url, when="always")])
    resp = await asyncio.to_thread(sdk_send, server)
    assert resp.status_code == 202
    outbox_id = resp.headers["X-Message-Id"]
    assert resp.headers["X-Egressd-Outbox"] == f"queued; id={outbox_id}"
    await eventually(lambda: sg.ledger.count("mail.sent") == 1)
    sent = sg.ledger.effects("mail.sent")[0]
    # The send carries egressd's id beside the app's own custom_args (SendGrid's events keep them).
    assert sent.data["custom_args"] == {"order_id": "42", "egressd_outbox_id": outbox_id}
    entry = await server.outbox_store.get(outbox_id)
    assert entry is not None
    await eventually(lambda: server.outbox_store.get(outbox_id))
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    entry = await server.outbox_store.get(outbox_id)
    assert entry is not None and entry.provider_id == sent.object_id and entry.body == b""
    await asyncio.sleep(0.3)
    assert sg.ledger.count("mail.sent") == 1


async def _state(server: EgressServer, outbox_id: str, state: str) -> bool:
    entry = await server.outbox_store.get(outbox_id)
    return entry is not None and entry.state == state


async def test_mailgun_answer_shape_and_user_variable(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    """With the official Mailgun SDK, a multipart send with an attachment: the SDK reads
    the kept send's answer as Mailgun's own, and the delivered send carries the tag."""
    from mailgun.client import Client
    from mailgun.config import RetryPolicy

    mg = fakes["mailgun"]
    server = await data_dir_server(start_proxy, tmp_path, [mailgun_policy(mg.url, when="always")])

    def send() -> Any:
        with Client(
            auth=("api", "key-app"), api_url=proxy_url(server) + "/mailgun", retry_policy=RetryPolicy(max_retries=0)
        ) as client:
            return client.messages.create(
                domain="mg.example.com",
                data={"from": "shop@mg.example.com", "to": ["ann@example.org"], "subject": "Hi", "text": "Hello"},
                files=[("attachment", ("receipt.pdf", b"%PDF receipt", "application/pdf"))],
            )

    resp = await asyncio.to_thread(send)
    assert resp.status_code == 200
    outbox_id = resp.headers["X-Egressd-Outbox"].split("id=")[1]
    assert resp.json() == {"id": f"<{outbox_id}@mg.example.com>", "message": "Queued. Thank you."}
    await eventually(lambda: mg.ledger.count("message.queued") == 1)
    fields = mg.ledger.effects("message.queued")[0].data["fields"]
    assert fields["v:egressd_outbox_id"] == [outbox_id]
    assert fields["attachment"][0]["filename"] == "receipt.pdf"  # the multipart body intact


async def test_on_failure_sends_at_once_when_the_provider_is_up(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url)])
    resp = await asyncio.to_thread(sdk_send, server)
    assert resp.status_code == 202
    assert "X-Egressd-Outbox" not in resp.headers
    assert resp.headers["X-Message-Id"] == sg.ledger.effects("mail.sent")[0].object_id  # SendGrid's own id
    assert await server.outbox_store.list() == []


async def test_on_failure_keeps_a_send_the_provider_never_saw(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    url = sg.url
    await sg.stop()  # connection refused: provably not sent
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(url)])
    resp = await asyncio.to_thread(sdk_send, server)
    assert resp.status_code == 202
    outbox_id = resp.headers["X-Message-Id"]
    assert resp.headers["X-Egressd-Outbox"] == f"queued; id={outbox_id}"
    assert sg.ledger.count("mail.sent") == 0
    # SendGrid comes back on the same port: the worker delivers it (backoff 1 s, 2 s...).
    port = int(url.rsplit(":", 1)[1])
    restarted = FakeServer("sendgrid", port=port)
    await restarted.start()
    try:
        await eventually(lambda: restarted.ledger.count("mail.sent") == 1, within=15)
        await eventually(lambda: _state(server, outbox_id, "delivered"))
        assert server.outbox.counts[("sendgrid", "delivered")] == 1
        await server.outbox.maintain(time.time())
        metrics = server.metrics.render().decode()
        assert 'egressd_outbox_deliveries_total{result="delivered",upstream="sendgrid"} 1.0' in metrics
        assert 'egressd_outbox_entries{upstream="sendgrid"} 0.0' in metrics
        status = await server.status_data()
        assert status["upstreams"]["sendgrid"]["outbox"]["deliveries"]["delivered"] == 1
        assert status["outbox"]["store"] == "sqlite"
    finally:
        await restarted.stop()


async def test_on_failure_never_keeps_a_send_that_may_have_arrived(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    sg.faults.add(kind="status", status=503, path="/v3/mail/send", processed=True, count=1)
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url)])
    with pytest.raises(Exception) as caught:
        await asyncio.to_thread(sdk_send, server)
    assert getattr(caught.value, "status_code", None) == 503
    assert await server.outbox_store.list() == []
    await asyncio.sleep(0.5)
    assert sg.ledger.count("mail.sent") == 1  # sent once, by the app's own call, never again


async def test_the_rate_limit_paces_a_burst_instead_of_refusing_it(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    policy = sendgrid_policy(sg.url, when="always")
    policy["rate_limit"] = {"rate": "50/s", "burst": 1, "queue": {"max_wait": "1s"}}
    server = await data_dir_server(start_proxy, tmp_path, [policy])
    url = proxy_url(server) + "/sendgrid/v3/mail/send"
    headers = {"Authorization": "Bearer SG.app-key", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> int:
            mail = {**MAIL, "custom_args": {"n": str(i)}}
            async with session.post(url, data=json.dumps(mail), headers=headers) as resp:
                return resp.status

        started = time.monotonic()
        statuses = await asyncio.gather(*(one(i) for i in range(60)))
        accepted_in = time.monotonic() - started
    assert statuses == [202] * 60
    await eventually(lambda: sg.ledger.count("mail.sent") == 60, within=15)
    spread = time.monotonic() - started
    assert accepted_in < spread  # accepted at once, delivered at the provider's pace
    assert sg.ledger.count("mail.sent") == 60
    assert {e.data["custom_args"]["n"] for e in sg.ledger.effects("mail.sent")} == {str(i) for i in range(60)}
    assert server.outbox.counts.get(("sendgrid", "dead"), 0) == 0


# -- ambiguity: asked, never resent blindly ------------------------------------------------------


async def test_an_ambiguous_delivery_is_probed_and_not_sent_twice(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    # SendGrid takes the send, then the answer is a 503: ambiguous.
    sg.faults.add(kind="status", status=503, path="/v3/mail/send", processed=True, count=1)
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url, when="always")])
    resp = await asyncio.to_thread(sdk_send, server)
    outbox_id = resp.headers["X-Message-Id"]
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    assert sg.ledger.count("mail.sent") == 1
    assert sg.ledger.requests_to("/v3/messages", "GET"), "the worker asked the Email Activity API"
    entry = await server.outbox_store.get(outbox_id)
    assert entry is not None and entry.provider_id == sg.ledger.effects("mail.sent")[0].object_id


async def test_a_probe_that_finds_nothing_sends_it_again_once(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    mg = fakes["mailgun"]
    # A reset before the side effect: the send was written, Mailgun never took it.
    mg.faults.add(kind="reset", path="/v3/mg.example.com/messages", count=1)
    server = await data_dir_server(start_proxy, tmp_path, [mailgun_policy(mg.url, when="always")])
    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy_url(server) + "/mailgun/v3/mg.example.com/messages",
            data={"from": "shop@example.com", "to": "ann@example.org", "subject": "Hi", "text": "Hello"},
            headers={"Authorization": aiohttp.encode_basic_auth("api", "key-app")},
        ) as resp:
            outbox_id = resp.headers["X-Egressd-Outbox"].split("id=")[1]
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    assert mg.ledger.count("message.queued") == 1
    assert mg.ledger.requests_to("/v3/mg.example.com/events", "GET")


async def test_without_a_way_to_ask_an_ambiguous_send_waits_for_the_operator(
    start_proxy: Any, run_app: Any, tmp_path: Path
) -> None:
    from fakes.echo import make_echo_app  # a generic API: nothing to ask

    sent: list[bytes] = []
    app = make_echo_app()

    async def record(request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        sent.append(await request.read())
        return aiohttp.web.Response(status=502 if len(sent) == 1 else 200, text="{}")

    app.router.add_post("/jobs", record)
    upstream = await run_app(app)
    policy = {"upstream": "jobs", "target": upstream.url, "retry": {"attempts": 1}, "outbox": {"when": "always"}}
    server = await data_dir_server(start_proxy, tmp_path, [policy])
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(server) + "/jobs/jobs", data=b'{"n":1}') as resp:
            assert resp.status == 202
            outbox_id = (await resp.json())["outbox_id"]
        await eventually(lambda: _state(server, outbox_id, "ambiguous"))
        await asyncio.sleep(0.5)
        assert len(sent) == 1  # never resent on its own
        admin = proxy_url(server, "admin")
        async with session.post(f"{admin}/outbox/{outbox_id}/retry") as resp:
            assert resp.status == 403  # the header a browser cannot send across sites
        async with session.post(f"{admin}/outbox/{outbox_id}/retry", headers={"X-Egressd-Admin": "outbox"}) as resp:
            assert resp.status == 200
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    assert len(sent) == 2


# -- bad input and bounds ------------------------------------------------------------------------


async def test_a_full_outbox_refuses_and_stores_nothing(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    url = sg.url
    await sg.stop()
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(url, when="always", max_entries=2)])
    statuses = []
    for _ in range(3):
        try:
            statuses.append((await asyncio.to_thread(sdk_send, server)).status_code)
        except Exception as exc:
            statuses.append(getattr(exc, "status_code", 0))
            refused = exc
    assert statuses == [202, 202, 503]
    assert refused.headers["X-Egressd-Error"] == "outbox_full"  # type: ignore[attr-defined]
    assert int(refused.headers["Retry-After"]) > 0  # type: ignore[attr-defined]
    assert len(await server.outbox_store.list()) == 2


async def test_an_oversized_send_is_refused_before_it_is_stored(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    policy = sendgrid_policy(sg.url, when="always")
    policy["limits"] = {"max_body": "1KiB"}
    server = await data_dir_server(start_proxy, tmp_path, [policy])
    big = {**MAIL, "content": [{"type": "text/plain", "value": "x" * 4000}]}
    with pytest.raises(Exception) as caught:
        await asyncio.to_thread(sdk_send, server, big)
    assert getattr(caught.value, "status_code", None) == 413
    assert await server.outbox_store.list() == []


async def test_check_refuses_an_outbox_on_a_payment_provider(tmp_path: Path) -> None:
    from proxy.config.loader import load_policy_dir
    from tests.conftest import write_policies

    docs = [{"upstream": "stripe", "target": "https://api.stripe.com", "provider": "stripe", "outbox": {}}]
    result = load_policy_dir(write_policies(tmp_path / "p", docs))
    assert result.policy_set is None
    assert any("outbox is not allowed for provider stripe" in p.message for p in result.errors)


async def test_a_corrupt_entry_is_moved_aside_and_the_others_go_out(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    url = sg.url
    await sg.stop()
    state = open_data_dir(tmp_path / "data")
    server = await start_proxy([sendgrid_policy(url, when="always")], state=state)
    ids = [(await asyncio.to_thread(sdk_send, server)).headers["X-Message-Id"] for _ in range(2)]
    # A third row that cannot be read (written as another version or a broken disk might),
    # copied from a real one: never decoded, so no delivery in flight can race with it.
    ids.insert(1, "eo_corrupt")
    state._db.execute(
        "INSERT INTO outbox SELECT 'eo_corrupt', upstream, 'queued', due, created, expires, updated, 0, '',"
        " method, path, query, 'not json', body, '', '', '', '', shape FROM outbox WHERE id = ?",
        (ids[0],),
    )
    restarted = FakeServer("sendgrid", port=int(url.rsplit(":", 1)[1]))
    await restarted.start()
    try:
        await eventually(lambda: restarted.ledger.count("mail.sent") == 2, within=15)
        row = state._db.execute("SELECT state FROM outbox WHERE id = ?", (ids[1],)).fetchone()
        assert row == ("corrupt",)
        await asyncio.sleep(0.3)
        assert restarted.ledger.count("mail.sent") == 2
    finally:
        await restarted.stop()


async def test_memory_store_semantics() -> None:
    store = MemoryOutbox()
    entry = Entry("eo_1", "up", "POST", "/", "", [], b"x", created=0.0, expires=100.0)
    await store.add(entry, max_entries=1)
    claimed = await store.claim("up", 1.0, 10)
    assert [e.id for e in claimed] == ["eo_1"]
    assert await store.claim("up", 1.0, 10) == []  # held: nobody takes it twice
    assert await store.drop("eo_1") is None  # not while a worker holds it


def test_the_shipped_commented_outbox_blocks_load_when_uncommented(tmp_path: Path) -> None:
    import re

    from proxy.config.loader import load_policy_dir

    examples = Path(__file__).resolve().parent.parent / "policies"
    uncommented = 0
    for f in examples.glob("*.yaml"):
        text, n = re.subn(
            r"^# outbox:\n((?:#   .*\n)+)",
            lambda m: "outbox:\n" + re.sub(r"^#", "", m.group(1), flags=re.M),
            f.read_text(),
            flags=re.M,
        )
        uncommented += n
        (tmp_path / f.name).write_text(text)
    assert uncommented == 2  # sendgrid.yaml and mailgun.yaml
    env = {"PAYPAL_CLIENT_ID": "a", "PAYPAL_CLIENT_SECRET": "b", "MAILGUN_API_KEY": "c"}
    result = load_policy_dir(tmp_path, environ=env)
    assert result.policy_set is not None, [str(p) for p in result.problems]
    kept = {p.upstream: p.outbox for p in result.policy_set.policies if p.outbox is not None}
    assert set(kept) == {"sendgrid", "mailgun"} and all(o.when == "on_failure" for o in kept.values())


async def test_a_bug_in_one_delivery_puts_the_send_back_and_the_worker_goes_on(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from plugins.sendgrid import SendGridPlugin

    sg = fakes["sendgrid"]
    real = SendGridPlugin.outbox_tag
    calls = []

    def flaky(self: SendGridPlugin, request: Any, outbox_id: str) -> Any:
        calls.append(outbox_id)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(self, request, outbox_id)

    monkeypatch.setattr(SendGridPlugin, "outbox_tag", flaky)
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url, when="always")])
    outbox_id = (await asyncio.to_thread(sdk_send, server)).headers["X-Message-Id"]
    await eventually(lambda: _state(server, outbox_id, "delivered"), within=15)
    assert sg.ledger.count("mail.sent") == 1 and server.outbox.errors == 1


async def test_a_failed_over_call_is_not_kept_by_the_fallbacks_outbox(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    sg_url = sg.url
    await sg.stop()  # SendGrid refuses connections: the call fails over to Mailgun
    mg.faults.add(kind="status", status=429, path="/v3/", count=100)  # and Mailgun refuses it, unsent
    primary = {
        "upstream": "sendgrid",
        "target": sg_url,
        "provider": "sendgrid",
        "retry": {"attempts": 1},
        "failover": [{"to": "mailgun", "on": ["connect_error"]}],
    }
    fallback = mailgun_policy(mg.url)
    fallback["auth"] = {"basic": {"username": "api", "password": "key-proxy"}}
    server = await data_dir_server(start_proxy, tmp_path, [primary, fallback])
    with pytest.raises(Exception) as caught:
        await asyncio.to_thread(sdk_send, server)
    assert getattr(caught.value, "status_code", None) == 429  # Mailgun's answer, translated; not "accepted"
    assert await server.outbox_store.list() == []


async def test_a_kept_send_fails_over_to_mailgun_with_its_tag(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    sg_url = sg.url
    await sg.stop()  # SendGrid down: connection refused, provably not sent
    primary = sendgrid_policy(sg_url, when="always")
    primary["failover"] = [{"to": "mailgun", "on": ["connect_error", "circuit_open"]}]
    fallback = {
        "upstream": "mailgun",
        "target": mg.url,
        "provider": {"name": "mailgun", "domain": "mg.example.com"},
        "auth": {"basic": {"username": "api", "password": "key-proxy"}},
    }
    server = await data_dir_server(start_proxy, tmp_path, [primary, fallback])
    outbox_id = (await asyncio.to_thread(sdk_send, server)).headers["X-Message-Id"]
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    assert mg.ledger.count("message.queued") == 1
    queued = mg.ledger.effects("message.queued")[0]
    # custom_args become Mailgun user variables: the tag keeps its name after the failover.
    assert queued.data["fields"]["v:egressd_outbox_id"] == [outbox_id]
    entry = await server.outbox_store.get(outbox_id)
    assert entry is not None and (entry.delivered_via, entry.provider_id) == ("mailgun", queued.object_id.strip("<>"))
    assert server.outbox.counts[("sendgrid", "failed_over")] == 1


@pytest.mark.parametrize("processed", [True, False])
async def test_keep_in_doubt_answers_accepted_and_asks_before_a_resend(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path, processed: bool
) -> None:
    """`on_failure` with `keep_in_doubt`: SendGrid answers the app's own call 503 (having
    taken the send, or not); the app gets 202, and the send is delivered exactly once:
    found by the probe, or resent after the probe found nothing."""
    sg = fakes["sendgrid"]
    sg.faults.add(kind="status", status=503, path="/v3/mail/send", processed=processed, count=1)
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url, keep_in_doubt=True)])
    resp = await asyncio.to_thread(sdk_send, server)
    assert resp.status_code == 202
    outbox_id = resp.headers["X-Message-Id"]
    entry = await server.outbox_store.get(outbox_id)
    assert entry is not None and entry.state == "doubt" and entry.last_error == "HTTP 503 on the app's own call"
    await eventually(lambda: _state(server, outbox_id, "delivered"))
    # Tagged from the first send on (the fake reads the body only of sends it processes).
    read = [r for r in sg.ledger.requests_to("/v3/mail/send", "POST") if r.body]
    assert [json.loads(r.body or b"")["custom_args"]["egressd_outbox_id"] for r in read] == [outbox_id]
    await asyncio.sleep(0.3)
    assert sg.ledger.count("mail.sent") == 1
    assert len(sg.ledger.requests_to("/v3/mail/send", "POST")) == (1 if processed else 2)


async def test_keep_in_doubt_leaves_a_4xx_to_the_app(
    start_proxy: Any, fakes: dict[str, FakeServer], tmp_path: Path
) -> None:
    sg = fakes["sendgrid"]
    server = await data_dir_server(start_proxy, tmp_path, [sendgrid_policy(sg.url, keep_in_doubt=True)])
    bad = {**MAIL, "personalizations": [{"to": [{"email": "not-an-address"}]}]}
    with pytest.raises(Exception) as caught:
        await asyncio.to_thread(sdk_send, server, bad)
    assert getattr(caught.value, "status_code", None) == 400
    assert await server.outbox_store.list() == []
