"""Sharp edges a new user meets with plain clients (issue 13): upstream redirects and
`Expect: 100-continue`, over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web

from proxy.routing import rewrite_location
from proxy.server import EgressServer
from tests.conftest import Upstream, proxy_url

StartProxy = Callable[..., Awaitable[EgressServer]]
ROOT_POLICIES = Path(__file__).resolve().parent.parent / "policies"
RunApp = Callable[[web.Application], Awaitable[Upstream]]


# -- redirects (contract 7.4, 7.7) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "target", "prefixed", "bare"),
    [
        ("/target", "https://api.example.com", "/up/target", "/target"),
        ("/v2/x?y=1#f", "https://api.example.com/v2", "/up/x?y=1#f", "/x?y=1#f"),
        ("https://api.example.com/v2/x", "https://api.example.com/v2", "/up/x", "/x"),
        ("https://API.EXAMPLE.com:443/v2/x", "https://api.example.com/v2", "/up/x", "/x"),
        # not the target: passed unchanged
        ("https://evil.example/v2/x", "https://api.example.com/v2", None, None),
        ("http://api.example.com/v2/x", "https://api.example.com/v2", None, None),
        ("https://api.example.com:8443/v2/x", "https://api.example.com/v2", None, None),
        ("https://api.example.com/v3/x", "https://api.example.com/v2", None, None),
        ("/v22/x", "https://api.example.com/v2", None, None),
        ("//evil.example/x", "https://api.example.com", None, None),
        ("next", "https://api.example.com", None, None),
    ],
)
def test_rewrite_location(location: str, target: str, prefixed: str | None, bare: str | None) -> None:
    assert rewrite_location(location, target, "up") == (prefixed or location)
    assert rewrite_location(location, target, None) == (bare or location)


async def _redirecting_upstream(run_app: RunApp) -> Upstream:
    async def redirect(request: web.Request) -> web.Response:
        where = request.query["to"].replace("SELF", f"http://127.0.0.1:{request.url.port}")
        return web.Response(status=302, headers={"Location": where})

    async def landed(request: web.Request) -> web.Response:
        return web.json_response({"landed": request.path})

    app = web.Application()
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/{tail:.*}", landed)
    return await run_app(app)


async def test_redirects_point_through_egressd(start_proxy: StartProxy, run_app: RunApp) -> None:
    up = await _redirecting_upstream(run_app)
    server = await start_proxy([{"upstream": "up", "target": up.url}])
    base = proxy_url(server) + "/up"
    async with aiohttp.ClientSession() as http:
        for to, expected in (
            ("/target", "/up/target"),
            ("SELF/target?a=1", "/up/target?a=1"),
            ("https://elsewhere.example/x", "https://elsewhere.example/x"),
        ):
            async with http.get(base + "/redirect", params={"to": to}, allow_redirects=False) as r:
                assert r.status == 302  # passed back, never followed by egressd
                assert r.headers["Location"] == expected

    # `requests` follows a relative Location: it now lands on the upstream through egressd.
    def follow() -> tuple[int, Any, list[str]]:
        resp = requests.get(base + "/redirect", params={"to": "/target"}, timeout=5)
        return resp.status_code, resp.json(), [h.headers["Location"] for h in resp.history]

    status, body, hops = await asyncio.to_thread(follow)
    assert status == 200 and body == {"landed": "/target"}
    assert hops == ["/up/target"]


async def test_redirects_on_a_policy_listen_port_have_no_prefix(start_proxy: StartProxy, run_app: RunApp) -> None:
    up = await _redirecting_upstream(run_app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = await start_proxy([{"upstream": "up", "target": up.url, "listen": f"127.0.0.1:{port}"}])
    host, bound = server.addresses["upstream:up"]
    async with aiohttp.ClientSession() as http:
        url = f"http://{host}:{bound}/redirect"
        async with http.get(url, params={"to": "SELF/deep/x"}, allow_redirects=False) as r:
            assert r.headers["Location"] == "/deep/x"


# -- Expect: 100-continue (contract 7.3, 7.7) ----------------------------------------------


async def _raw_expect(url: str, path: str, body: bytes, *, wait_for_continue: float = 0.5) -> tuple[bytes, bytes]:
    """Send a head with `Expect: 100-continue`, wait for the interim answer (as curl does,
    up to `wait_for_continue`), then the body; return (what came before the body was sent,
    the final answer)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    writer.write(head)
    await writer.drain()
    early = b""
    try:
        early = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), wait_for_continue)
    except TimeoutError:
        pass
    if early.startswith(b"HTTP/1.1 100"):
        writer.write(body)
        await writer.drain()
        final = await asyncio.wait_for(reader.read(65536), 5)
    else:
        final = early + await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return early, final


async def test_expect_100_continue_is_answered_at_once(start_proxy: StartProxy, run_app: RunApp) -> None:
    received: list[int] = []

    async def sink(request: web.Request) -> web.Response:
        received.append(len(await request.read()))
        return web.json_response({"n": received[-1]})

    app = web.Application(client_max_size=2**23)
    app.router.add_post("/sink", sink)
    up = await run_app(app)
    server = await start_proxy([{"upstream": "up", "target": up.url}])
    body = b"x" * (2 * 1024 * 1024)
    began = time.monotonic()
    early, final = await _raw_expect(proxy_url(server), "/up/sink", body)
    elapsed = time.monotonic() - began
    assert early.startswith(b"HTTP/1.1 100 Continue"), early
    assert final.startswith(b"HTTP/1.1 200"), final[:200]
    assert received == [len(body)]
    assert elapsed < 5


async def test_expect_100_continue_gets_the_final_error_instead(start_proxy: StartProxy, run_app: RunApp) -> None:
    async def sink(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/sink", sink)
    up = await run_app(app)
    server = await start_proxy([{"upstream": "up", "target": up.url, "limits": {"max_body": "1KiB"}}])
    for path, status in (("/nosuch/sink", b"404"), ("/up/sink", b"413")):
        early, final = await _raw_expect(proxy_url(server), path, b"y" * 4096)
        assert early.startswith(b"HTTP/1.1 " + status), early  # no 100: the final answer at once
        assert b"connection: close" in final.lower() or b"Connection: close" in early, (early, final)


# -- HEAD keeps Content-Length (contract 7.3) ----------------------------------------------


async def test_head_keeps_the_upstreams_content_length(start_proxy: StartProxy, run_app: RunApp) -> None:
    async def doc(request: web.Request) -> web.Response:
        return web.Response(body=b"z" * 1234, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/doc", doc)  # aiohttp answers HEAD for a GET route, without the body
    up = await run_app(app)
    server = await start_proxy([{"upstream": "up", "target": up.url}])
    async with aiohttp.ClientSession() as http:
        async with http.head(proxy_url(server) + "/up/doc") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == "1234"
            assert await r.read() == b""
        async with http.get(proxy_url(server) + "/up/doc") as r:
            assert len(await r.read()) == 1234


# -- Stripe file uploads through their own upstream (issue 13 item 12) ---------------------


async def test_stripe_file_upload_through_the_files_upstream(start_proxy: StartProxy) -> None:
    """files.stripe.com is another base URL: the shipped example policy has a
    `stripe-files` upstream, and the SDK's `files` base address points at it."""
    import io

    import stripe

    from fakes import FakeServer
    from proxy.config.loader import load_policy_dir

    secrets = {"PAYPAL_CLIENT_ID": "id", "PAYPAL_CLIENT_SECRET": "secret", "MAILGUN_API_KEY": "key"}
    shipped = load_policy_dir(ROOT_POLICIES, environ=secrets)
    assert shipped.ok and shipped.policy_set is not None
    files = next(p for p in shipped.policy_set.policies if p.upstream == "stripe-files")
    assert files.target == "https://files.stripe.com" and files.limits.max_body == 32 * 1024 * 1024

    async with FakeServer("stripe") as sf:
        text = (ROOT_POLICIES / "stripe.yaml").read_text()
        text = text.replace("https://api.stripe.com", sf.url).replace("https://files.stripe.com", sf.url)
        # The example's failover names the paypal upstream: give it one (never used here),
        # with auth of its own, as a failover target needs.
        docs = text + f"\n---\nupstream: paypal\ntarget: {sf.url}\nprovider: paypal\nauth: {{bearer: unused}}\n"
        server = await start_proxy(docs)
        base = proxy_url(server)
        client = stripe.StripeClient(
            "sk_test_1",
            base_addresses={"api": base + "/stripe", "files": base + "/stripe-files"},
            max_network_retries=0,
        )
        upload = await asyncio.to_thread(
            client.v1.files.create,
            params={"purpose": "dispute_evidence", "file": io.BytesIO(b"%PDF-1.4 evidence")},
        )
    assert upload.id.startswith("file_") and upload.size == len(b"%PDF-1.4 evidence")
    assert [e.data["purpose"] for e in sf.ledger.effects("file.created")] == ["dispute_evidence"]
