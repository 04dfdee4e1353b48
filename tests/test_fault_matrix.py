"""The upstream fault matrix, through egressd, with the packaged fakes.

Each fault gives the contract's answer (status and `X-Egressd-Error`) within the call's
deadline, never a short 200 (an answer cut after its headers ends in an aborted
connection, not a clean end), and leaves no socket behind (open FDs counted before and
after a burst of the same fault). tests/test_transport_faults.py covers the same kinds on
a raw socket server; here they come from the fakes, plus DNS, refused and TLS failures.
"""

from __future__ import annotations

import asyncio
import gc
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fakes import FakeServer
from proxy.server import EgressServer
from tests.conftest import proxy_url

StartProxy = Callable[..., Awaitable[EgressServer]]
TIMEOUTS = {"connect": "1s", "attempt": "1s", "total": "2s"}
DEADLINE = 2.0
SLACK = 1.0  # scheduling, connection set-up, the test's own client


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Outcome:
    status: int
    code: str | None
    complete: bool  # the body was read to its end without an error
    elapsed: float


async def call(session: aiohttp.ClientSession, url: str) -> Outcome:
    began = time.monotonic()
    try:
        async with session.get(url) as resp:
            try:
                await resp.read()
                complete = True
            except aiohttp.ClientPayloadError:
                complete = False
            return Outcome(resp.status, resp.headers.get("X-Egressd-Error"), complete, time.monotonic() - began)
    except aiohttp.ServerDisconnectedError:
        return Outcome(0, None, False, time.monotonic() - began)


@dataclass(frozen=True)
class Case:
    fault: dict[str, Any] | None  # added to the echo fake; None: the target is broken instead
    path: str
    status: int
    code: str
    streamed: bool = False  # the cut comes after the headers: the app sees an aborted answer


BIG = 1_000_000  # over the transport's buffering threshold: the answer streams
CASES: dict[str, Case] = {
    "reset-before-headers": Case({"kind": "reset"}, "/x", 502, "upstream_unreachable"),
    "reset-mid-body-small": Case({"kind": "reset_mid_body"}, "/bytes/20000", 502, "upstream_unreachable"),
    "reset-mid-body-streamed": Case({"kind": "reset_mid_body"}, f"/bytes/{BIG}", 200, "", streamed=True),
    "truncated-small": Case({"kind": "truncate", "extra_bytes": 100}, "/bytes/20000", 502, "upstream_unreachable"),
    "truncated-streamed": Case({"kind": "truncate", "extra_bytes": 100}, f"/bytes/{BIG}", 200, "", streamed=True),
    "invalid-http": Case({"kind": "garbage"}, "/x", 502, "upstream_unreachable"),
    "drip-fed": Case({"kind": "drip", "chunk_size": 1, "interval": 0.2}, "/x", 504, "upstream_timeout"),
    "hang": Case({"kind": "hang", "seconds": 30}, "/x", 504, "upstream_timeout"),
    "slow-first-byte": Case({"kind": "delay", "seconds": 5, "phase": "before"}, "/x", 504, "upstream_timeout"),
}


@pytest.fixture
async def echo() -> AsyncIterator[FakeServer]:
    async with FakeServer("echo") as fake:
        yield fake


async def run_case(server: EgressServer, case: Case, repeat: int) -> list[Outcome]:
    async with aiohttp.ClientSession() as s:
        return [await call(s, proxy_url(server) + "/up" + case.path) for _ in range(repeat)]


def check(case: Case, outcomes: list[Outcome]) -> None:
    for out in outcomes:
        assert out.elapsed < DEADLINE + SLACK, out
        if case.streamed:
            # Headers were out before the cut: the only honest signal is an aborted body.
            assert out.status in (200, 0) and not out.complete, out
        else:
            assert (out.status, out.code) == (case.status, case.code), out
        assert not (out.status == 200 and out.complete), "a short 200"


async def settle_fds(baseline: int, slack: int = 3, within: float = 2.0) -> int:
    deadline = time.monotonic() + within
    while True:
        gc.collect()
        now = open_fds()
        if now <= baseline + slack or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("name", list(CASES))
async def test_upstream_fault(start_proxy: StartProxy, echo: FakeServer, name: str) -> None:
    case = CASES[name]
    server = await start_proxy([{"upstream": "up", "target": echo.url, "timeouts": TIMEOUTS}])
    assert case.fault is not None
    # A healthy call first, so pools and lazily created objects exist before the count.
    assert (await run_case(server, Case(None, "/warm", 200, ""), 1))[0].status == 200
    baseline = open_fds()
    echo.faults.add(dict(case.fault))
    repeat = 1 if case.code == "upstream_timeout" else 5
    check(case, await run_case(server, case, repeat))
    echo.faults.clear()
    after = await run_case(server, Case(None, "/after", 200, ""), 1)
    assert after[0].status == 200 and after[0].complete
    assert await settle_fds(baseline) <= baseline + 3


async def test_faults_with_retries_still_end_within_the_deadline(start_proxy: StartProxy, echo: FakeServer) -> None:
    """Retries of a hanging upstream share the total: the app still hears by the deadline."""
    server = await start_proxy(
        [{"upstream": "up", "target": echo.url, "timeouts": TIMEOUTS, "retry": {"attempts": 5, "on": ["timeout"]}}]
    )
    echo.faults.add({"kind": "hang", "seconds": 30})
    outcomes = await run_case(server, Case(None, "/x", 504, "upstream_timeout"), 1)
    check(Case(None, "/x", 504, "upstream_timeout"), outcomes)
    assert 1 <= len(echo.ledger.requests) <= 2  # 1 s attempts inside a 2 s total


# -- broken targets ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    yield cert, key


@pytest.fixture
async def https_upstream(self_signed: tuple[Path, Path]) -> AsyncIterator[tuple[str, list[str]]]:
    cert, key = self_signed
    hits: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    yield f"https://127.0.0.1:{port}", hits
    await runner.cleanup()


async def broken_target_case(start_proxy: StartProxy, target: str, repeat: int = 5, **extra: Any) -> None:
    server = await start_proxy([{"upstream": "up", "target": target, "timeouts": TIMEOUTS, **extra}])
    case = Case(None, "/x", 502, "upstream_unreachable")
    check(case, await run_case(server, case, 1))
    baseline = open_fds()
    check(case, await run_case(server, case, repeat))
    assert await settle_fds(baseline) <= baseline + 3


async def test_dns_failure(start_proxy: StartProxy) -> None:
    await broken_target_case(start_proxy, "http://upstream.egressd-test.invalid")


async def test_connection_refused(start_proxy: StartProxy, echo: FakeServer) -> None:
    url = echo.url
    await echo.stop()  # the port stays ours but nothing listens
    await broken_target_case(start_proxy, url)


async def test_tls_verification_failure(
    start_proxy: StartProxy, https_upstream: tuple[str, list[str]], self_signed: tuple[Path, Path]
) -> None:
    url, hits = https_upstream
    await broken_target_case(start_proxy, url)
    assert hits == []  # the handshake failed: no request was ever sent
    # The same server with its CA named: the failure above was the verification.
    server = await start_proxy([{"upstream": "up", "target": url, "tls": {"ca_file": str(self_signed[0])}}])
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server) + "/up/ok") as resp:
        assert resp.status == 200
    assert hits == ["/ok"]
