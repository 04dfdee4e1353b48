"""The core path: routing, header hygiene, streaming, refusals, upstream failures, admin."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import proxy_url


class Recorder:
    """An upstream that records what reached it and answers in configurable ways."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/big/{n}", self.big)
        app.router.add_route("POST", "/upload", self.upload)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        record = {
            "method": request.method,
            "path": request.raw_path,
            "headers": dict(request.headers),
            "body": body.decode(errors="replace"),
        }
        self.seen.append(record)
        return web.json_response(record, headers={"Connection": "keep-alive", "X-Upstream": "yes"})

    async def upload(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        self.seen.append({"method": "POST", "path": "/upload", "headers": dict(request.headers)})
        return web.json_response({"received": size, "sha256": digest.hexdigest()})

    async def big(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = n
        await resp.prepare(request)
        chunk = b"x" * 65536
        left = n
        while left > 0:
            part = chunk[: min(left, len(chunk))]
            await resp.write(part)
            left -= len(part)
        await resp.write_eof()
        return resp


@pytest.fixture
async def recorder(run_app: Any) -> tuple[Recorder, str]:
    rec = Recorder()
    up = await run_app(rec.app())
    return rec, up.url


async def test_forwards_path_query_body_and_sets_headers(recorder: Any, start_proxy: Any) -> None:
    _, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url + "/base"}])
    async with aiohttp.ClientSession() as s:
        async with s.post(
            proxy_url(server) + "/echo/v1/things?a=1&b=%20x",
            data=b"hello",
            headers={
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "secret-hop",
                "Keep-Alive": "timeout=5",
                "X-Keep": "1",
                "X-Request-Id": "req-abc",
            },
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
            assert resp.headers["X-Egressd-Upstream"] == "echo"
            assert resp.headers["X-Egressd-Attempts"] == "1"
            assert resp.headers["X-Request-Id"] == "req-abc"
            assert resp.headers["X-Upstream"] == "yes"
    assert body["path"] == "/base/v1/things?a=1&b=%20x"
    assert body["body"] == "hello"
    sent = {k.lower(): v for k, v in body["headers"].items()}
    assert sent["host"] == url.removeprefix("http://")
    assert "x-hop" not in sent and "keep-alive" not in sent
    assert sent["x-keep"] == "1"
    assert sent["x-request-id"] == "req-abc"


async def test_request_id_generated_when_absent(recorder: Any, start_proxy: Any) -> None:
    rec, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url}])
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/echo/x") as resp:
        rid = resp.headers["X-Request-Id"]
        assert len(rid) >= 16
    assert {k.lower(): v for k, v in rec.seen[0]["headers"].items()}["x-request-id"] == rid


async def test_auth_injection_and_header_rules(recorder: Any, start_proxy: Any, monkeypatch: Any) -> None:
    rec, url = recorder
    monkeypatch.setenv("EG_TEST_KEY", "sk_live_injected")
    server = await start_proxy(
        [
            {
                "upstream": "bear",
                "target": url,
                "auth": {"bearer": "${env:EG_TEST_KEY}"},
                "headers": {"add": {"X-Team": "payments"}, "remove": ["X-Internal-Debug"]},
            },
            {"upstream": "basic", "target": url, "auth": {"basic": {"username": "api", "password": "pw"}}},
            {"upstream": "hdr", "target": url, "auth": {"header": {"name": "X-Api-Key", "value": "k1"}}},
        ]
    )
    async with aiohttp.ClientSession() as s:
        for name in ("bear", "basic", "hdr"):
            async with s.get(
                proxy_url(server) + f"/{name}/x",
                headers={"Authorization": "Bearer from-app", "X-Internal-Debug": "1", "X-Api-Key": "app"},
            ) as resp:
                assert resp.status == 200
    seen = [{k.lower(): v for k, v in r["headers"].items()} for r in rec.seen]
    assert seen[0]["authorization"] == "Bearer sk_live_injected"
    assert seen[0]["x-team"] == "payments" and "x-internal-debug" not in seen[0]
    assert seen[1]["authorization"] == "Basic " + base64.b64encode(b"api:pw").decode()
    assert seen[2]["x-api-key"] == "k1" and "authorization" not in seen[2]


@pytest.mark.parametrize(
    "raw",
    [
        "/echo/../other/x",
        "/echo/%2e%2e/other",
        "/echo/%2E%2E/other",
        "/echo/.%2e/other",
        "/echo/%252e%252e/other",
        "/echo/a%2f..%2fb",
        "/echo/a\\..\\b",
        "/echo/a%5c..",
        "/echo/./x",
        "/echo//x",
        "/nope/x",
        "/ECHO/x",
    ],
)
async def test_hostile_paths_never_forwarded(recorder: Any, start_proxy: Any, raw: str) -> None:
    rec, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url}, {"upstream": "other", "target": url}])
    host, port = server.addresses["main"]
    status, headers = await raw_request(host, port, f"GET {raw} HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 404), (raw, status)
    assert headers.get("x-egressd-error") in ("bad_request", "unknown_upstream")
    assert rec.seen == []


async def test_absolute_form_and_connect_refused(recorder: Any, start_proxy: Any) -> None:
    rec, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url}])
    host, port = server.addresses["main"]
    for line in (
        f"GET {url}/echo/x HTTP/1.1",
        "GET http://example.com/echo/x HTTP/1.1",
        "CONNECT example.com:443 HTTP/1.1",
    ):
        status, _ = await raw_request(host, port, f"{line}\r\nHost: example.com\r\n\r\n")
        assert status in (400, 404), line
    assert rec.seen == []
    # the server is still healthy
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/echo/ok") as resp:
        assert resp.status == 200


async def raw_request(host: str, port: int, text: str) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(text.encode("latin-1"))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def test_max_body_by_length_and_by_stream(recorder: Any, start_proxy: Any) -> None:
    rec, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url, "limits": {"max_body": "1KiB"}}])
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy_url(server) + "/echo/x", data=b"a" * 2048) as resp:
            assert resp.status == 413
            assert resp.headers["X-Egressd-Error"] == "body_too_large"

        async def gen() -> Any:
            for _ in range(100):
                yield b"b" * 1024

        try:
            async with s.post(proxy_url(server) + "/echo/upload", data=gen()) as resp:
                assert resp.status == 413
        except aiohttp.ClientError:
            pass  # the proxy may close the connection while the client is still sending
    assert all(r["path"] != "/upload" for r in rec.seen)
    assert not any(r["method"] == "POST" for r in rec.seen)


async def test_streams_large_upload_and_download(recorder: Any, start_proxy: Any) -> None:
    _, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url, "limits": {"max_body": "200MiB"}}])
    size = 30 * 1024 * 1024
    digest = hashlib.sha256()

    async def gen() -> Any:
        block = bytes(range(256)) * 256
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    async with aiohttp.ClientSession() as s:
        async with s.post(proxy_url(server) + "/echo/upload", data=gen()) as resp:
            assert resp.status == 200
            got = await resp.json()
        assert got == {"received": size, "sha256": digest.hexdigest()}
        async with s.get(proxy_url(server) + f"/echo/big/{size}") as resp:
            assert resp.status == 200
            n = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                n += len(chunk)
        assert n == size


async def test_dedicated_listen_port(recorder: Any, start_proxy: Any) -> None:
    _, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url, "listen": "127.0.0.1:0"}])
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server, "upstream:echo") + "/v1/x?q=1") as resp:
        assert resp.status == 200
        assert (await resp.json())["path"] == "/v1/x?q=1"


async def test_admin_endpoints(recorder: Any, start_proxy: Any) -> None:
    _, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url}])
    admin = proxy_url(server, "admin")
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(server) + "/echo/x?api_key=sk_secret_1") as resp:
            assert resp.status == 200
        async with s.get(admin + "/healthz") as resp:
            assert resp.status == 200
        async with s.get(admin + "/readyz") as resp:
            assert resp.status == 200
        async with s.get(admin + "/metrics") as resp:
            text = await resp.text()
        for name in (
            "egressd_requests_total",
            "egressd_request_duration_seconds_bucket",
            "egressd_upstream_attempts_total",
            "egressd_circuit_state",
            "egressd_config_reloads_total",
        ):
            assert name in text, name
        assert 'egressd_requests_total{outcome="success",status="200",upstream="echo"} 1.0' in text
        assert "sk_secret_1" not in text
        async with s.get(admin + "/status.json") as resp:
            data = await resp.json()
        assert data["upstreams"]["echo"]["calls_5m"] == 1
        async with s.get(admin + "/status") as resp:
            page = await resp.text()
        assert "echo" in page and "sk_secret_1" not in page


async def test_unknown_upstream_does_not_create_metric_labels(start_proxy: Any, recorder: Any) -> None:
    _, url = recorder
    server = await start_proxy([{"upstream": "echo", "target": url}])
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(server) + "/attacker-chosen-name/x") as resp:
            assert resp.status == 404
            assert json.loads(await resp.text())["error"]["code"] == "unknown_upstream"
        async with s.get(proxy_url(server, "admin") + "/metrics") as resp:
            assert "attacker-chosen-name" not in await resp.text()
