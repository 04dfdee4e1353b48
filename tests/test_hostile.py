"""Hostile requests: none reaches an upstream, each gets one answer, egressd stays healthy.

Counted at the upstream (the echo fake's ledger), on raw sockets so that nothing between
the test and egressd normalises the bytes. tests/test_core.py has the basic traversal and
absolute-form cases; these are the rest of the campaign's list (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fakes import FakeServer
from proxy.config.loader import load_policy_dir
from proxy.listener import MAX_HEADER_FIELD, MAX_HEADERS
from proxy.server import EgressServer, Settings
from tests.conftest import proxy_url, write_policies

StartProxy = Callable[..., Awaitable[EgressServer]]


@pytest.fixture
async def echo() -> AsyncIterator[FakeServer]:
    async with FakeServer("echo") as fake:
        yield fake


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[EgressServer]]]:
    """Like `start_proxy`, with any `Settings` field (header_timeout) settable."""
    servers: list[EgressServer] = []

    async def _start(docs: list[dict[str, Any]], **settings: Any) -> EgressServer:
        directory = write_policies(tmp_path / f"guarded{len(servers)}", docs)
        server = EgressServer(
            Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=1.0, **settings)
        )
        await server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.stop()


def policies(url: str) -> list[dict[str, Any]]:
    return [
        {"upstream": "echo", "target": url, "limits": {"max_body": "1KiB"}},
        {"upstream": "other", "target": url},
    ]


async def exchange(server: EgressServer, data: bytes, *, wait: float = 3.0) -> bytes:
    """Send raw bytes; return everything egressd sends back until it closes (or `wait` s)."""
    host, port = server.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
            got = answers(out)
            if got and got[-1][1].get("connection", "").lower() == "close":
                break  # egressd said it closes; it may linger reading an unwanted body first
        return out
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def answers(raw: bytes) -> list[tuple[int, dict[str, str]]]:
    """Every HTTP answer in a byte stream: (status, lower-cased headers)."""
    found: list[tuple[int, dict[str, str]]] = []
    rest = raw
    while rest.startswith(b"HTTP/"):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        found.append((int(lines[0].split()[1]), headers))
        rest = rest[int(headers.get("content-length", "0")) :]
    return found


async def still_healthy(server: EgressServer, echo: FakeServer) -> None:
    before = len(echo.ledger.requests)
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/other/ok") as resp:
        assert resp.status == 200
        await resp.read()
    assert len(echo.ledger.requests) == before + 1


def _head(first: str, *headers: str, body: bytes = b"", close: bool = True) -> bytes:
    extra = ["Connection: close"] if close else []
    return ("\r\n".join([first, "Host: x", *extra, *headers]) + "\r\n\r\n").encode("latin-1") + body


SMUGGLED = b"GET /other/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"

# (id, raw request, allowed statuses, X-Egressd-Error)
CASES: list[tuple[str, bytes, set[int], str]] = [
    # path traversal beyond tests/test_core.py
    ("semicolon-dots", _head("GET /echo/..;/other/x HTTP/1.1"), {400}, "bad_request"),
    ("encoded-semicolon-dots", _head("GET /echo/%2e%2e;x/other HTTP/1.1"), {400}, "bad_request"),
    ("triple-encoded", _head("GET /echo/%25252e%25252e/other HTTP/1.1"), {400}, "bad_request"),
    ("overlong-utf8-dot", _head("GET /echo/%c0%ae%c0%ae/other HTTP/1.1"), {400}, "bad_request"),
    ("fullwidth-dots", _head("GET /echo/%ef%bc%8e%ef%bc%8e/other HTTP/1.1"), {400}, "bad_request"),
    ("bad-percent", _head("GET /echo/%zz/x HTTP/1.1"), {400}, "bad_request"),
    ("encoded-backslash-dots", _head("GET /echo/..%5cother HTTP/1.1"), {400}, "bad_request"),
    ("trailing-dotdot", _head("GET /echo/x/.. HTTP/1.1"), {400}, "bad_request"),
    ("leading-double-slash", _head("GET //echo/x HTTP/1.1"), {400, 404}, "bad_request"),
    ("encoded-nul", _head("GET /echo/a%00b HTTP/1.1"), {400}, "bad_request"),
    ("encoded-crlf", _head("GET /echo/a%0d%0aX-Evil:%201 HTTP/1.1"), {400}, "bad_request"),
    ("fragment", _head("GET /echo/x#frag HTTP/1.1"), {400}, "bad_request"),
    # targets and methods
    ("absolute-form-https", _head("GET https://api.stripe.com/v1/charges HTTP/1.1"), {400}, "bad_request"),
    ("authority-form", _head("CONNECT 127.0.0.1:22 HTTP/1.1"), {400}, "bad_request"),
    ("asterisk-form", _head("OPTIONS * HTTP/1.1"), {400}, "bad_request"),
    ("trace", _head("TRACE /echo/x HTTP/1.1", "Authorization: Bearer sk_live_x"), {405}, "method_not_allowed"),
    ("http09", b"GET /echo/x\r\n\r\n", {400}, "bad_request"),
    ("unknown-version", _head("GET /echo/x HTTP/1.7"), {400}, "bad_request"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400}, "bad_request"),
    # framing: request smuggling
    (
        "cl-and-te",
        _head("POST /echo/x HTTP/1.1", "Content-Length: 4", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        {400},
        "bad_request",
    ),
    (
        "te-and-cl",
        _head("POST /echo/x HTTP/1.1", "Transfer-Encoding: chunked", "Content-Length: 4", body=b"0\r\n\r\n" + SMUGGLED),
        {400},
        "bad_request",
    ),
    (
        "duplicate-cl",
        _head("POST /echo/x HTTP/1.1", "Content-Length: 5", "Content-Length: 6", body=b"hello!"),
        {400},
        "bad_request",
    ),
    (
        "duplicate-cl-equal",
        _head("POST /echo/x HTTP/1.1", "Content-Length: 5", "Content-Length: 5", body=b"hello"),
        {400},
        "bad_request",
    ),
    ("cl-list", _head("POST /echo/x HTTP/1.1", "Content-Length: 5, 5", body=b"hello"), {400}, "bad_request"),
    ("cl-plus", _head("POST /echo/x HTTP/1.1", "Content-Length: +5", body=b"hello"), {400}, "bad_request"),
    (
        "cl-space-before-colon",
        _head("POST /echo/x HTTP/1.1", "Content-Length : 5", body=b"hello"),
        {400},
        "bad_request",
    ),
    (
        "te-not-last-chunked",
        _head("POST /echo/x HTTP/1.1", "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
        {400},
        "bad_request",
    ),
    (
        "te-obfuscated",
        _head("POST /echo/x HTTP/1.1", "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
        {400},
        "bad_request",
    ),
    (
        "te-in-http10",
        _head("POST /echo/x HTTP/1.0", "Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED),
        {400},
        "bad_request",
    ),
    (
        "bad-chunk-size",
        _head("POST /echo/x HTTP/1.1", "Transfer-Encoding: chunked", body=b"5x\r\nhello\r\n0\r\n\r\n"),
        {400},
        "bad_request",
    ),
    ("obs-fold", _head("GET /echo/x HTTP/1.1", "X-A: a", " folded"), {400}, "bad_request"),
    ("bare-lf", b"GET /echo/x HTTP/1.1\nHost: x\n\n", {400}, "bad_request"),
    ("bare-cr-in-value", _head("GET /echo/x HTTP/1.1", "X-A: a\rX-B: b"), {400}, "bad_request"),
    # header bytes
    ("nul-in-value", _head("GET /echo/x HTTP/1.1", "X-A: a\x00b"), {400}, "bad_request"),
    ("bad-utf8-in-value", _head("GET /echo/x HTTP/1.1", "X-A: \xff\xfe\xc0"), {400}, "bad_request"),
    ("space-in-name", _head("GET /echo/x HTTP/1.1", "X A: b"), {400}, "bad_request"),
    ("8bit-in-name", _head("GET /echo/x HTTP/1.1", "X-\xe9: b"), {400}, "bad_request"),
    ("8bit-in-target", _head("GET /echo/\xc3\xa9 HTTP/1.1"), {400}, "bad_request"),
    # limits
    (
        "too-many-headers",
        _head("GET /echo/x HTTP/1.1", *(f"X-{i}: v" for i in range(MAX_HEADERS + 1))),
        {400},
        "bad_request",
    ),
    ("header-too-long", _head("GET /echo/x HTTP/1.1", "X-Big: " + "a" * (MAX_HEADER_FIELD + 1)), {400}, "bad_request"),
    ("request-line-too-long", _head("GET /echo/" + "a" * 9000 + " HTTP/1.1"), {400}, "bad_request"),
    ("declared-body-too-large", _head("POST /echo/x HTTP/1.1", "Content-Length: 10000000000"), {413}, "body_too_large"),
    (
        "chunked-body-too-large",
        _head("POST /echo/x HTTP/1.1", "Transfer-Encoding: chunked", body=b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n"),
        {413},
        "body_too_large",
    ),
]


@pytest.mark.parametrize(("raw", "statuses", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_request_is_refused_and_never_forwarded(
    guarded: StartProxy, echo: FakeServer, raw: bytes, statuses: set[int], code: str
) -> None:
    server = await guarded(policies(echo.url))
    got = answers(await exchange(server, raw, wait=2.0))
    assert len(got) == 1, got  # exactly one answer: nothing smuggled behind it
    status, headers = got[0]
    assert status in statuses
    assert headers.get("x-egressd-error") == code
    if code == "body_too_large" and b"chunked" in raw:
        # A streamed body is cut at the limit: the upstream sees an aborted request that it
        # never answers, and nothing happens there (contract section 2).
        assert all(r.status is None for r in echo.ledger.requests)
        assert echo.ledger.side_effects == []
    else:
        assert echo.ledger.requests == []
    await still_healthy(server, echo)


async def test_trace_names_the_allowed_methods(guarded: StartProxy, echo: FakeServer) -> None:
    server = await guarded(policies(echo.url))
    async with aiohttp.ClientSession() as s, s.request("TRACE", proxy_url(server) + "/other/x") as resp:
        assert resp.status == 405
        assert resp.headers["X-Egressd-Error"] == "method_not_allowed"
        assert "GET" in resp.headers["Allow"] and "TRACE" not in resp.headers["Allow"]
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert echo.ledger.requests == []


async def test_limits_are_inclusive(guarded: StartProxy, echo: FakeServer) -> None:
    """Exactly at the documented limits the request goes through."""
    server = await guarded(policies(echo.url))
    headers = {f"X-H{i}": "v" for i in range(MAX_HEADERS - 2)}  # plus Host and Connection
    headers["X-H0"] = "a" * (MAX_HEADER_FIELD - len("X-H0: "))
    raw = _head("GET /other/limits HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()))
    got = answers(await exchange(server, raw))
    assert [status for status, _ in got] == [200]
    assert len(echo.ledger.requests) == 1


async def test_parser_refusal_does_not_echo_or_log_header_bytes(
    guarded: StartProxy, echo: FakeServer, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """aiohttp's own 400 quotes the offending header line back and logs it with a traceback."""
    server = await guarded(policies(echo.url))
    secret = "sk_live_PLANTED0123456789"
    raw = _head("GET /echo/x HTTP/1.1", f"Authorization: Bearer {secret}\x00", close=False)
    with caplog.at_level("DEBUG"):
        out = await exchange(server, raw)
    assert answers(out)[0][0] == 400
    assert secret.encode() not in out
    assert secret not in caplog.text
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    assert "Traceback" not in caplog.text


async def test_compressed_body_is_forwarded_as_sent(guarded: StartProxy, echo: FakeServer) -> None:
    """The proxy listener must not inflate a gzip body and forward it under the app's header."""
    server = await guarded(policies(echo.url))
    plain = b'{"hello": "world"}' * 10
    body = gzip.compress(plain)
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy_url(server) + "/other/x",
            data=body,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 200
        seen = await resp.json()
    # The fake inflates what it gets: it got valid gzip, the bytes the app sent.
    assert seen["body_len"] == len(plain)
    assert seen["body_sha256"] == hashlib.sha256(plain).hexdigest()


# -- slow headers (slowloris) ---------------------------------------------------------------


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


async def test_slow_request_head_is_cut_off(guarded: StartProxy, echo: FakeServer) -> None:
    server = await guarded(policies(echo.url), header_timeout=0.5)
    host, port = server.addresses["main"]
    began = time.monotonic()

    async def dribble() -> float:
        reader, writer = await asyncio.open_connection(host, port)
        head = b"GET /other/x HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        try:
            for byte in head:
                writer.write(bytes([byte]))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if await _closed_within(reader, 0.1):
                    return time.monotonic() - began
            raise AssertionError("the slow head was never cut off")
        finally:
            writer.close()

    async def silent() -> float:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert await _closed_within(reader, 3.0)
            return time.monotonic() - began
        finally:
            writer.close()

    dribbled, idle = await asyncio.gather(dribble(), silent())
    assert 0.4 <= dribbled < 1.5
    assert 0.4 <= idle < 1.5
    assert echo.ledger.requests == []
    await still_healthy(server, echo)


async def test_slow_next_head_on_a_kept_alive_connection_is_cut_off(guarded: StartProxy, echo: FakeServer) -> None:
    server = await guarded(policies(echo.url), header_timeout=0.5)
    host, port = server.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /other/first HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.7)  # an idle kept-alive connection is not cut by the head timer
        writer.write(b"GET /other/second HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        await writer.drain()
        began = time.monotonic()
        # The rest of the first answer may still be buffered; then the connection ends.
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 3)
            if not chunk:
                break
        assert time.monotonic() - began < 1.5
    finally:
        writer.close()
    assert [r.path for r in echo.ledger.requests] == ["/first"]


async def test_slow_body_is_not_cut_by_the_head_timer(guarded: StartProxy, echo: FakeServer) -> None:
    server = await guarded([{"upstream": "other", "target": echo.url}], header_timeout=0.3)
    host, port = server.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /other/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        for _ in range(10):
            await writer.drain()
            await asyncio.sleep(0.1)  # one second in all: three times the head timeout
            writer.write(b"z")
        await writer.drain()
        out = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert b'"received": 10' in out


async def test_head_timer_off_with_zero(guarded: StartProxy, echo: FakeServer) -> None:
    server = await guarded(policies(echo.url), header_timeout=0)
    host, port = server.addresses["main"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        assert not await _closed_within(reader, 0.3)
    finally:
        writer.close()


# -- CRLF and friends through policy values ----------------------------------------------

CRLF = "v\r\nX-Evil: 1"
POLICY_INJECTIONS: list[tuple[str, dict[str, Any]]] = [
    ("headers.add value", {"headers": {"add": {"X-Team": CRLF}}}),
    ("headers.add value LF", {"headers": {"add": {"X-Team": "v\nX-Evil: 1"}}}),
    ("headers.add value NUL", {"headers": {"add": {"X-Team": "v\x00"}}}),
    ("headers.add name", {"headers": {"add": {"X-Team\r\nX-Evil": "v"}}}),
    ("headers.add name colon", {"headers": {"add": {"X-Team:": "v"}}}),
    ("headers.remove name", {"headers": {"remove": ["X\r\nEvil"]}}),
    ("auth.header name", {"auth": {"header": {"name": "X-Key\r\nX-Evil", "value": "v"}}}),
    ("auth.header value", {"auth": {"header": {"name": "X-Key", "value": CRLF}}}),
    ("auth.bearer", {"auth": {"bearer": CRLF}}),
    ("auth.bearer from env", {"auth": {"bearer": "${env:EGRESSD_TEST_EVIL}"}}),
    ("auth.basic username", {"auth": {"basic": {"username": "a\r\nb", "password": "p"}}}),
    ("auth.basic password", {"auth": {"basic": {"username": "a", "password": CRLF}}}),
    ("target", {"target": "http://a.example/x\r\nX-Evil: 1"}),
    ("target userinfo", {"target": "http://user:pw@a.example/"}),
    (
        "oauth token_url",
        {
            "auth": {
                "oauth_client_credentials": {
                    "token_url": "http://a.example/t\r\n",
                    "client_id": "c",
                    "client_secret": "s",
                }
            }
        },
    ),
    ("idempotency.header", {"idempotency": {"header": "Idem\r\nX-Evil"}}),
    ("provider setting", {"provider": {"name": "mailgun", "domain": "mg.example.com\r\nX-Evil: 1"}}),
    (
        "crosswalk id",
        {"failover": [{"to": "b", "on": ["exhausted"], "crosswalk": {"payment_methods": {"pm_x": "a\r\nb"}}}]},
    ),
]


@pytest.mark.parametrize("extra", [c[1] for c in POLICY_INJECTIONS], ids=[c[0] for c in POLICY_INJECTIONS])
def test_policy_values_cannot_inject_into_requests(tmp_path: Path, extra: dict[str, Any]) -> None:
    docs = [{"upstream": "a", "target": "http://a.example", **extra}, {"upstream": "b", "target": "http://b.example"}]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(docs))
    result = load_policy_dir(tmp_path, secrets="strict", environ={"EGRESSD_TEST_EVIL": CRLF})
    assert not result.ok and result.policy_set is None
    text = "\n".join(str(p) for p in result.problems)
    assert "X-Evil: 1" not in text or "auth" not in text  # a secret's value is never echoed
