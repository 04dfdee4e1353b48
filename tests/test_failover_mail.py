"""End-to-end failover SendGrid <-> Mailgun with the official SDKs, egressd and the fakes."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient

from fakes import FakeServer
from tests.conftest import proxy_url


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("sendgrid", "mailgun")}
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def policies(sg_url: str, mg_url: str, *, reverse: bool = False, **rule: Any) -> list[dict[str, Any]]:
    sg: dict[str, Any] = {"upstream": "sendgrid", "target": sg_url, "provider": "sendgrid", "retry": {"attempts": 1}}
    mg: dict[str, Any] = {
        "upstream": "mailgun",
        "target": mg_url,
        "provider": {"name": "mailgun", "domain": "mg.example.com"},
        "retry": {"attempts": 1},
    }
    fo = {"on": ["circuit_open", "connect_error", 503], **rule}
    if reverse:
        mg["failover"] = [{"to": "sendgrid", **fo}]
        sg["auth"] = {"bearer": "SG.proxy-key"}
    else:
        sg["failover"] = [{"to": "mailgun", **fo}]
        mg["auth"] = {"basic": {"username": "api", "password": "key-proxy"}}
    return [sg, mg]


MAIL: dict[str, Any] = {
    "personalizations": [{"to": [{"email": "ann@example.org", "name": "Ann"}], "cc": [{"email": "cc@example.org"}]}],
    "from": {"email": "shop@example.com", "name": "Shop, Inc."},
    "reply_to": {"email": "help@example.com"},
    "subject": "Your order #42",
    "content": [{"type": "text/plain", "value": "Thanks"}, {"type": "text/html", "value": "<p>Thanks</p>"}],
    "attachments": [
        {
            "content": base64.b64encode(b"%PDF-1.4 receipt").decode(),
            "filename": "receipt.pdf",
            "type": "application/pdf",
            "disposition": "attachment",
        },
        {
            "content": base64.b64encode(b"\x89PNG logo").decode(),
            "filename": "logo.png",
            "type": "image/png",
            "disposition": "inline",
            "content_id": "logo",
        },
    ],
    "categories": ["receipts"],
    "custom_args": {"order_id": "42"},
    "headers": {"X-Order": "42"},
}


async def test_sendgrid_down_fails_over_to_mailgun(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    await sg.stop()  # SendGrid down: connection refused, provably not sent
    server = await start_proxy(policies(sg.url, mg.url))
    client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
    resp = await asyncio.to_thread(client.client.mail.send.post, request_body=MAIL)
    assert resp.status_code == 202
    assert resp.headers["X-Egressd-Upstream"] == "mailgun"
    assert resp.headers["X-Egressd-Failover"] == "used; from=sendgrid"
    assert mg.ledger.count("message.queued") == 1
    effect = mg.ledger.effects("message.queued")[0]
    assert resp.headers["X-Message-Id"] == effect.object_id.strip("<>")
    fields = effect.data["fields"]
    assert fields["from"] == ['"Shop, Inc." <shop@example.com>']
    assert fields["to"] == ["Ann <ann@example.org>"] and fields["cc"] == ["cc@example.org"]
    assert fields["subject"] == ["Your order #42"] and fields["text"] == ["Thanks"]
    assert fields["o:tag"] == ["receipts"] and fields["v:order_id"] == ["42"] and fields["h:X-Order"] == ["42"]
    assert fields["h:Reply-To"] == ["help@example.com"]
    assert fields["attachment"][0]["filename"] == "receipt.pdf"
    assert fields["inline"][0]["filename"] == "logo"
    req = mg.ledger.requests_to("/v3/mg.example.com/messages")[0]
    assert req.header(
        "Content-Type",
    ).startswith("multipart/form-data")
    assert req.header("Authorization") == "Basic " + base64.b64encode(b"api:key-proxy").decode()


@pytest.mark.parametrize(
    ("extra", "reason", "detail"),
    [
        ({"asm": {"group_id": 1}}, "lossy", "asm"),
        ({"batch_id": "b1"}, "lossy", "batch_id"),
        ({"categories": ["a", "b", "c", "d"]}, "lossy", "categories"),
        ({"asm": {"group_id": 1}, "mail_settings": {"footer": {"enable": True}}}, "lossy", "asm,mail_settings.footer"),
        ({"template_id": "d-123"}, "no_crosswalk_entry", "template_id"),
        (
            {"attachments": [{"content": "not base64!", "filename": "a.txt"}]},
            "unmappable_field",
            "attachments.0.content",
        ),
    ],
)
async def test_mail_refusals_say_why(
    start_proxy: Any, fakes: dict[str, FakeServer], extra: dict[str, Any], reason: str, detail: str
) -> None:
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    await sg.stop()  # SendGrid down: connection refused, provably not sent
    server = await start_proxy(policies(sg.url, mg.url))
    client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
    with pytest.raises(HTTPError) as info:
        await asyncio.to_thread(client.client.mail.send.post, request_body={**MAIL, **extra})
    assert info.value.status_code == 502  # SendGrid's own error shape: upstream_unreachable
    assert info.value.headers["X-Egressd-Failover"] == f"refused; reason={reason}; detail={detail}"
    message = info.value.to_dict["errors"][0]["message"]
    assert message.endswith(f"failover to mailgun refused: {reason} ({detail.replace(',', ', ')})")
    assert "d-123" not in message and "ann@example.org" not in message
    assert mg.ledger.count("message.queued") == 0


async def test_template_crosswalk(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    await sg.stop()  # SendGrid down: connection refused, provably not sent
    server = await start_proxy(policies(sg.url, mg.url, crosswalk={"templates": {"d-123": "welcome"}}))
    body = {k: v for k, v in MAIL.items() if k not in ("content",)}
    body["template_id"] = "d-123"
    body["personalizations"] = [{"to": [{"email": "ann@example.org"}], "dynamic_template_data": {"first": "Ann"}}]
    client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
    resp = await asyncio.to_thread(client.client.mail.send.post, request_body=body)
    assert resp.status_code == 202
    fields = mg.ledger.effects("message.queued")[0].data["fields"]
    assert fields["template"] == ["welcome"] and fields["t:variables"] == ['{"first":"Ann"}']


async def test_mailgun_down_fails_over_to_sendgrid(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    from mailgun.client import Client
    from mailgun.config import RetryPolicy

    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    await mg.stop()  # Mailgun down: connection refused, provably not sent
    server = await start_proxy(policies(sg.url, mg.url, reverse=True))

    def send() -> Any:
        with Client(
            auth=("api", "key-app"), api_url=proxy_url(server) + "/mailgun", retry_policy=RetryPolicy(max_retries=0)
        ) as client:
            return client.messages.create(
                domain="mg.example.com",
                data={
                    "from": "Shop <shop@mg.example.com>",
                    "to": ["ann@example.org", "Bob <bob@example.org>"],
                    "subject": "Hi",
                    "text": "Thanks",
                    "html": "<p>Thanks</p>",
                    "o:tag": "receipts",
                    "h:X-Custom": "order-42",
                    "v:order_id": "42",
                    "h:Reply-To": "help@example.com",
                    "o:testmode": "no",
                },
                files=[("attachment", ("receipt.pdf", b"%PDF receipt", "application/pdf"))],
            )

    resp = await asyncio.to_thread(send)
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Egressd-Failover"] == "used; from=mailgun"
    body = resp.json()
    assert body["message"] == "Queued. Thank you." and body["id"].startswith("<")
    assert sg.ledger.count("mail.sent") == 1
    sent = sg.ledger.requests_to("/v3/mail/send")[-1].json()
    assert sent["personalizations"][0]["to"] == [
        {"email": "ann@example.org"},
        {"email": "bob@example.org", "name": "Bob"},
    ]
    assert sent["categories"] == ["receipts"] and sent["custom_args"] == {"order_id": "42"}
    assert sent["headers"] == {"X-Custom": "order-42"} and sent["reply_to"] == {"email": "help@example.com"}
    assert sent["attachments"][0]["filename"] == "receipt.pdf"
    assert base64.b64decode(sent["attachments"][0]["content"]) == b"%PDF receipt"
    assert body["id"] == "<" + sg.ledger.effects("mail.sent")[0].object_id + ">"


async def test_mailgun_lossy_refusal(start_proxy: Any, fakes: dict[str, FakeServer]) -> None:
    import aiohttp

    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    await mg.stop()  # Mailgun down: connection refused, provably not sent
    server = await start_proxy(policies(sg.url, mg.url, reverse=True))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy_url(server) + "/mailgun/v3/mg.example.com/messages",
            data={"from": "a@example.com", "to": "b@example.org", "text": "x", "o:dkim": "yes"},
            headers={"Authorization": "Basic " + base64.b64encode(b"api:key-app").decode()},
        ) as resp:
            assert resp.status == 502
            assert resp.headers["X-Egressd-Failover"] == "refused; reason=lossy; detail=o:dkim"
            body = await resp.json()
            assert body["message"].endswith("failover to sendgrid refused: lossy (o:dkim)")
    assert sg.ledger.count("mail.sent") == 0


@pytest.mark.parametrize("processed", [True, False])
async def test_sendgrid_5xx_is_ambiguous_and_never_fails_over(
    start_proxy: Any, fakes: dict[str, FakeServer], processed: bool
) -> None:
    """SendGrid has no idempotency key and no way to ask: a 503 to a send may have
    followed the send, so it is not repeated at Mailgun (the mail would go out twice)."""
    sg, mg = fakes["sendgrid"], fakes["mailgun"]
    sg.faults.status(503, path="/v3/mail/send", processed=processed)
    server = await start_proxy(policies(sg.url, mg.url))
    client = SendGridAPIClient("SG.app-key", host=proxy_url(server) + "/sendgrid")
    with pytest.raises(HTTPError) as info:
        await asyncio.to_thread(client.client.mail.send.post, request_body=MAIL)
    assert info.value.status_code == 503
    assert info.value.headers["X-Egressd-Failover"] == "refused; reason=ambiguous; detail=503"
    # the primary's own answer: its body stays SendGrid's, only the header says why
    assert "failover" not in str(info.value.to_dict)
    assert mg.ledger.count("message.queued") == 0
