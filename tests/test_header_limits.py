"""Head limits are operator settings, and both refusals name the limit (issue 13, item 9).

A request header line over `--max-request-header-size` (or more header fields than
`--max-request-headers`) gets 400 `bad_request` naming the limit and its flag; an upstream
answer with a header over `--max-response-header-size` (or a head over
`--max-response-head-size`) gets 502 `upstream_unreachable`, detail `header_too_large`,
naming the limit, never "a broken answer". Raising a limit lets the same exchange through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.listener import limit_reason
from proxy.model import AMBIGUOUS_KINDS
from proxy.server import EgressServer, Settings
from tests.conftest import Upstream, proxy_url, write_policies
from tests.egressd_process import Egressd

ROOT = Path(__file__).resolve().parent.parent
BIG = 9000  # bytes of one header line: over the 8190-byte defaults
StartProxy = Callable[..., Awaitable[EgressServer]]


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[StartProxy]:
    """egressd in process with any `Settings` field set."""
    servers: list[EgressServer] = []

    async def _start(url: str, **settings: Any) -> EgressServer:
        directory = write_policies(tmp_path / f"limits{len(servers)}", [{"upstream": "up", "target": url}])
        server = EgressServer(
            Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=1.0, **settings)
        )
        await server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.stop()


@pytest.fixture
async def upstream(run_app: Callable[[web.Application], Awaitable[Upstream]]) -> tuple[Upstream, list[str]]:
    """Echoes the size of X-Big back; `/big-answer` answers with a BIG-byte header."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.method + " " + request.path)
        if request.path.endswith("/big-answer"):
            return web.Response(text="ok", headers={"X-Answer": "a" * BIG})
        if request.path.endswith("/many-answer"):
            return web.Response(text="ok", headers={f"X-A{i}": "a" * 100 for i in range(60)})
        return web.Response(text=str(len(request.headers.get("X-Big", ""))))

    app = web.Application(handler_args={"max_field_size": 4 * BIG})
    app.router.add_route("*", "/{tail:.*}", handle)
    return await run_app(app), seen


async def call(server: EgressServer, path: str, *, method: str = "GET", **headers: str) -> tuple[int, str, str]:
    """(status, X-Egressd-Error, body) of one call; the client reads heads of any size."""
    async with (
        aiohttp.ClientSession(max_field_size=4 * BIG, max_line_size=4 * BIG) as session,
        session.request(method, proxy_url(server) + path, headers=headers) as resp,
    ):
        return resp.status, resp.headers.get("X-Egressd-Error", ""), await resp.text()


# -- the request side -------------------------------------------------------------------
async def test_a_request_header_over_the_limit_is_refused_naming_it(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    up, seen = upstream
    server = await proxy(up.url)
    secret = "s3cr3t" + "v" * (BIG - 6)
    status, code, body = await call(server, "/up/x", **{"X-Big": secret})
    assert (status, code) == (400, "bad_request")
    assert "request line or header longer than 8190 bytes (--max-request-header-size)" in body
    assert "s3cr3t" not in body
    assert seen == []


async def test_raising_the_request_header_limit_lets_it_through(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    up, seen = upstream
    server = await proxy(up.url, max_request_header_size=16384)
    assert await call(server, "/up/x", **{"X-Big": "v" * BIG}) == (200, "", str(BIG))
    assert seen == ["GET /x"]
    status, _, body = await call(server, "/up/x", **{"X-Big": "v" * 17000})
    assert status == 400 and "longer than 16384 bytes (--max-request-header-size)" in body


async def test_too_many_request_headers_names_the_limit(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    up, seen = upstream
    server = await proxy(up.url, max_request_headers=20)
    status, code, body = await call(server, "/up/x", **{f"X-H{i}": "v" for i in range(30)})
    assert (status, code) == (400, "bad_request")
    assert "more than 20 request headers (--max-request-headers)" in body
    assert seen == []
    assert (await call(server, "/up/x", **{f"X-H{i}": "v" for i in range(10)}))[0] == 200


def test_aiohttp_still_describes_its_limits_the_way_limit_reason_reads_them() -> None:
    """An aiohttp upgrade that rewords its limit errors fails here, not in production."""
    from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

    assert limit_reason(LineTooLong(b"X-Secret: abc...", 8190).message, max_headers=128) == (
        "request line or header longer than 8190 bytes (--max-request-header-size)"
    )
    too_many = BadHttpMessage("Too many headers received").message
    assert limit_reason(too_many, max_headers=7) == "more than 7 request headers (--max-request-headers)"
    assert limit_reason("Invalid header value char", max_headers=7) == "Invalid header value char"


# -- the response side ------------------------------------------------------------------
async def test_an_answer_header_over_the_limit_is_a_502_naming_it(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    up, _ = upstream
    server = await proxy(up.url)
    status, code, body = await call(server, "/up/big-answer")
    assert (status, code) == (502, "upstream_unreachable")
    assert "a header larger than 8190 bytes (--max-response-header-size)" in body
    assert "broken answer" not in body


async def test_raising_the_answer_header_limit_lets_it_through(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    up, _ = upstream
    server = await proxy(up.url, max_response_header_size=16384)
    async with (
        aiohttp.ClientSession(max_field_size=4 * BIG) as session,
        session.get(proxy_url(server) + "/up/big-answer") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Answer"] == "a" * BIG


async def test_an_answer_head_over_the_limit_names_it(proxy: StartProxy, upstream: tuple[Upstream, list[str]]) -> None:
    up, _ = upstream
    server = await proxy(up.url, max_response_head_size=4096)
    status, code, body = await call(server, "/up/many-answer")
    assert (status, code) == (502, "upstream_unreachable")
    assert "a head larger than 4096 bytes (--max-response-head-size)" in body
    assert (await call(server, "/up/x"))[0] == 200  # a small answer still passes


async def test_a_header_too_large_is_ambiguous_like_a_protocol_error(
    proxy: StartProxy, upstream: tuple[Upstream, list[str]]
) -> None:
    """The request was sent: an unsafe call is never resent after it."""
    assert "header_too_large" in AMBIGUOUS_KINDS
    up, seen = upstream
    server = await proxy(up.url)
    status, code, _ = await call(server, "/up/big-answer", method="POST")
    assert (status, code) == (502, "upstream_unreachable")
    assert seen == ["POST /big-answer"]


# -- the command line -------------------------------------------------------------------
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSD_")}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**clean, **(env or {})},
    )


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-request-header-size", "0"),
        ("--max-request-header-size", "-5"),
        ("--max-request-header-size", "8k"),
        ("--max-request-header-size", "99999999999"),
        ("--max-request-headers", "1.5"),
        ("--max-request-headers", "100000"),
        ("--max-response-header-size", ""),
        ("--max-response-head-size", "999999999"),
    ],
)
def test_bad_limit_values_are_one_line_errors(tmp_path: Path, flag: str, value: str) -> None:
    write_policies(tmp_path, [{"upstream": "up", "target": "http://127.0.0.1:9"}])
    result = run_cli("--policies", str(tmp_path), flag, value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"egressd: {flag} must be a whole number"), result.stderr


def test_a_bad_limit_from_the_environment_names_the_flag(tmp_path: Path) -> None:
    write_policies(tmp_path, [{"upstream": "up", "target": "http://127.0.0.1:9"}])
    result = run_cli("--policies", str(tmp_path), env={"EGRESSD_MAX_REQUEST_HEADERS": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip() == "egressd: --max-request-headers must be a whole number from 1 to 10000, not 'lots'"


async def test_the_flag_raises_the_limit_in_a_real_process(
    egressd_factory: Callable[..., Egressd], upstream: tuple[Upstream, list[str]]
) -> None:
    up, seen = upstream
    proc = egressd_factory([{"upstream": "up", "target": up.url}], args=["--max-request-header-size", "16384"])
    proc.start()
    headers = {"X-Big": "v" * BIG}
    async with aiohttp.ClientSession() as session, session.get(proc.url + "/up/x", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.text() == str(BIG)
    assert seen == ["GET /x"]
