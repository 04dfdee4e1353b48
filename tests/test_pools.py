"""Warm upstream pools (issue 16): warm-up, idle expiry, early close, reload, back-off,
`--ready-when-warm`, TLS resumption, the DNS cache, and what /status and /metrics say.

Connections are counted at the upstream (a small TCP server that speaks just enough
HTTP/1.1), never inferred from egressd's own figures alone. No assertion is about time:
waits are bounded polls for a state ("until the fake has seen 2 connections").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import ClientSession

from proxy import _http1
from proxy.config.schema import Policy
from proxy.server import EgressServer, Settings
from tests.conftest import proxy_url, write_policies

# (reader, writer, request head, index of the request on its connection) -> keep serving?
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes, int], Awaitable[bool]]


class Fake:
    """A keep-alive HTTP/1.1 upstream that counts what it accepts and receives."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0  # connections accepted
        self.open = 0  # connections open now
        self.closed_by_peer = 0  # connections the client (egressd) closed first
        # (method and path, index of the request on its connection, connection number from 1)
        self.requests: list[tuple[str, int, int]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.closing = False

    def on_warm_connection(self, before: int) -> bool:
        """The last request went out on a connection the fake had accepted before the call
        (`before`: `accepted` then) as that connection's first request: a warm one."""
        _, n, number = self.requests[-1]
        return n == 0 and number <= before

    def close_all(self) -> None:
        """Close every connection from the upstream's side (an early idle timeout: FIN)."""
        self.closing = True
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    def methods(self, method: str) -> int:
        return sum(1 for line, _, _ in self.requests if line.startswith(method + " "))


def ok_answer(extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n" + extra + b"\r\nok"


async def serve_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
    writer.write(ok_answer())
    await writer.drain()
    return True


async def rst(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


@contextlib.asynccontextmanager
async def fake_upstream(script: Script = serve_ok, *, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Fake]:
    fake = Fake()
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fake.accepted += 1
        number = fake.accepted
        fake.open += 1
        writers.append(writer)
        fake.writers.append(writer)
        n = 0
        peer_closed = True
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break  # the client closed the connection
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        await reader.readexactly(int(line.split(b":")[1]))
                fake.requests.append((head.split(b"\r\n", 1)[0].rsplit(b" ", 1)[0].decode(), n, number))
                if not await script(reader, writer, head, n):
                    peer_closed = False
                    break
                n += 1
        except (ConnectionError, ssl.SSLError, asyncio.CancelledError):
            peer_closed = False
        finally:
            fake.open -= 1
            fake.closed_by_peer += peer_closed and not fake.closing
            with contextlib.suppress(Exception):
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll `check` until it holds (a bound, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


def policy(port: int, name: str = "api", **extra: Any) -> dict[str, Any]:
    return {"upstream": name, "target": f"http://127.0.0.1:{port}", **extra}


def pool_of(server: EgressServer, name: str = "api") -> _http1.HTTP1Pool:
    rt = server.runtime.get(name)
    assert rt is not None
    return rt.transport.pool()


async def call(
    server: EgressServer, method: str = "GET", path: str = "/api/x", **kw: Any
) -> tuple[int, dict[str, str]]:
    async with ClientSession() as session:
        async with session.request(method, proxy_url(server) + path, **kw) as response:
            await response.read()
            return response.status, dict(response.headers)


async def status(server: EgressServer) -> dict[str, Any]:
    async with ClientSession() as session:
        async with session.get(proxy_url(server, "admin") + "/status.json") as response:
            data: dict[str, Any] = await response.json()
            return data


async def metrics(server: EgressServer) -> str:
    async with ClientSession() as session:
        async with session.get(proxy_url(server, "admin") + "/metrics") as response:
            return await response.text()


# ---- the policy block --------------------------------------------------------------------


def test_pool_block_defaults_keep_the_old_behaviour_and_bad_values_are_refused() -> None:
    plain = Policy(upstream="a", target="https://api.example.com")
    assert (plain.pool.max_idle, plain.pool.idle_timeout, plain.pool.min_warm) == (None, 30.0, 0)
    ok = Policy.model_validate(
        {"upstream": "a", "target": "https://x.example", "pool": {"min_warm": 2, "max_idle": 4, "idle_timeout": "5s"}},
        context={"source": "yaml"},
    )
    assert (ok.pool.min_warm, ok.pool.max_idle, ok.pool.idle_timeout) == (2, 4, 5.0)
    with pytest.raises(ValueError, match="must not be more than max_idle"):
        Policy.model_validate({"upstream": "a", "target": "https://x.example", "pool": {"min_warm": 3, "max_idle": 2}})
    with pytest.raises(ValueError, match=r"limits\.max_concurrency"):
        Policy.model_validate(
            {"upstream": "a", "target": "https://x.example", "limits": {"max_concurrency": 1}, "pool": {"min_warm": 2}}
        )
    with pytest.raises(ValueError):
        Policy.model_validate({"upstream": "a", "target": "https://x.example", "pool": {"min_wram": 1}})


def test_keep_alive_timeout_hint() -> None:
    assert _http1.keep_alive_timeout("timeout=5, max=100") == 5.0
    assert _http1.keep_alive_timeout("max=100, Timeout=2.5") == 2.5
    assert _http1.keep_alive_timeout("max=100") is None
    assert _http1.keep_alive_timeout("timeout=soon") is None
    assert _http1.keep_alive_timeout(None) is None


# ---- warm-up -----------------------------------------------------------------------------


async def test_min_warm_connections_are_up_before_the_first_call(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port, pool={"min_warm": 2})])
        await until(lambda: fake.accepted == 2 and pool_of(server).idle == 2, "2 warm connections")
        assert fake.requests == []  # warming sends nothing: no request the operator did not ask for
        for _ in range(3):
            before = fake.accepted
            assert (await call(server))[0] == 200
            assert fake.requests[-1][2] <= before  # on a connection made before the call
        assert fake.accepted == 2  # every call went out on a warm connection; none connected
        up = (await status(server))["upstreams"]["api"]
        pool = up["pool"]
        assert pool["min_warm"] == 2 and pool["open"] == 2 and pool["idle"] == 2 and pool["warm"] == 2
        assert pool["handshakes"] == 2 and pool["handshakes_warm"] == 2 and pool["handshakes_1m"] == 2
        assert up["overhead_p50_ms"] is not None and up["overhead_p50_ms"] <= up["p50_ms"]
        text = await metrics(server)
        assert 'egressd_pool_connections{state="idle",upstream="api"} 2.0' in text
        assert 'egressd_pool_connections{state="in_use",upstream="api"} 0.0' in text
        assert 'egressd_pool_handshakes_total{upstream="api"} 2.0' in text
        assert 'egressd_overhead_seconds_count{upstream="api"} 3.0' in text


async def test_a_call_on_a_warm_connection_does_not_make_the_pool_connect(start_proxy: Any) -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        await release.wait()
        return await serve_ok(reader, writer, head, n)

    async with fake_upstream(slow) as fake:
        server = await start_proxy([policy(fake.port, pool={"min_warm": 1})])
        await until(lambda: fake.accepted == 1, "the warm connection")
        pending = asyncio.ensure_future(call(server))
        await until(lambda: len(fake.requests) == 1, "the call at the upstream")
        await asyncio.sleep(0.2)
        # min_warm counts connections open, in use or not: a handshake now would only compete
        # with the call for the loop, so none is made while it runs.
        assert fake.accepted == 1 and pool_of(server).stats()["in_use"] == 1
        release.set()
        assert (await pending)[0] == 200
        assert fake.accepted == 1 and pool_of(server).idle == 1


async def test_no_warm_up_without_min_warm(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port)])
        assert (await call(server))[0] == 200
        assert fake.accepted == 1  # the call's own connection, opened on its path as before
        assert (await status(server))["upstreams"]["api"]["pool"]["warm"] == 0


# ---- expiry and the upstream's keep-alive -------------------------------------------------


async def test_idle_expiry_closes_a_warm_connection_and_replaces_it(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port, pool={"min_warm": 1, "idle_timeout": "300ms"})])
        await until(lambda: fake.accepted == 1, "the warm connection")
        # Past idle_timeout egressd closes it (the upstream never does here) and a new one
        # takes its place: the pool never stays without its warm connection.
        await until(lambda: fake.closed_by_peer >= 1 and fake.accepted >= 2, "the first closed and replaced")
        await until(lambda: fake.open == 1 and pool_of(server).idle == 1, "one warm connection again")
        before = fake.accepted
        assert (await call(server))[0] == 200
        assert fake.on_warm_connection(before)


async def test_idle_expiry_without_min_warm_closes_and_does_not_reconnect(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port, pool={"idle_timeout": "200ms", "max_idle": 1})])
        assert (await call(server))[0] == 200
        await until(lambda: fake.closed_by_peer == 1 and pool_of(server).size == 0, "the idle connection closed")
        assert fake.accepted == 1


async def test_max_idle_zero_keeps_no_connection(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port, pool={"max_idle": 0})])
        for _ in range(2):
            assert (await call(server))[0] == 200
        assert fake.accepted == 2 and pool_of(server).size == 0


async def test_the_upstreams_keep_alive_timeout_is_respected(start_proxy: Any) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        writer.write(ok_answer(b"Keep-Alive: timeout=1, max=100\r\n"))
        await writer.drain()
        return True

    async with fake_upstream(short) as fake:
        # The policy would keep it 30 s; the upstream says 1 s: egressd closes it first.
        server = await start_proxy([policy(fake.port)])
        assert (await call(server))[0] == 200
        conn = pool_of(server)._idle[0]
        assert conn.peer_idle == 1.0 and conn.expires_at - conn.idle_since < 1.0
        await until(lambda: fake.closed_by_peer == 1, "egressd closing before the upstream's timeout")


# ---- the upstream closing or resetting --------------------------------------------------


async def test_upstream_closing_idle_warm_connections_gets_them_replaced(start_proxy: Any) -> None:
    async with fake_upstream() as fake:
        server = await start_proxy([policy(fake.port, pool={"min_warm": 2})])
        await until(lambda: fake.accepted == 2 and pool_of(server).idle == 2, "2 warm connections")
        # The upstream closes its idle connections early (but not at once, which would count
        # as a failed warm-up: see the back-off tests).
        await asyncio.sleep(_http1.WARM_PROVEN + 0.1)
        fake.close_all()
        fake.closing = False
        await until(lambda: fake.accepted == 4 and pool_of(server).idle == 2, "2 new warm connections")
        assert (await call(server))[0] == 200
        assert fake.on_warm_connection(4)
        assert pool_of(server).stats()["warm_failures"] == 0  # they had lived: no back-off


def reset_reused(kind: str = "reset") -> Script:
    """Answer the first request of each connection; meet any later one with a reset (or a
    bare close) after reading it, before one answer byte."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        if n == 0:
            return await serve_ok(reader, writer, head, n)
        if kind == "reset":
            await rst(writer)
        return False

    return script


@pytest.mark.parametrize("kind", ["reset", "close"])
async def test_a_get_on_a_reused_connection_that_is_reset_goes_out_again_on_a_new_one(
    start_proxy: Any, kind: str
) -> None:
    async with fake_upstream(reset_reused(kind)) as fake:
        server = await start_proxy([policy(fake.port)])  # no retry block: nothing else resends
        assert (await call(server))[0] == 200
        status_code, headers = await call(server)
        assert status_code == 200
        assert headers["X-Egressd-Attempts"] == "1"  # one attempt as the retry policy counts
        assert fake.methods("GET") == 3 and fake.accepted == 2  # the reset one, then a fresh connection
        assert [(n, number) for _, n, number in fake.requests] == [(0, 1), (1, 1), (0, 2)]
        assert 'egressd_upstream_attempts_total{result="stale_connection",upstream="api"} 1.0' in await metrics(server)


@pytest.mark.parametrize("kind", ["reset", "close"])
@pytest.mark.parametrize("retry", [None, {"attempts": 3, "on": ["reset", 502, "connect_error"]}])
async def test_a_post_on_a_reused_connection_that_is_reset_is_never_resent(
    start_proxy: Any, kind: str, retry: dict[str, Any] | None
) -> None:
    async with fake_upstream(reset_reused(kind)) as fake:
        extra = {"retry": retry} if retry else {}
        server = await start_proxy([policy(fake.port, **extra)])
        assert (await call(server))[0] == 200  # the connection is now a kept one
        status_code, headers = await call(server, "POST", "/api/charges", data=b'{"amount": 1}')
        assert status_code == 502
        assert headers["X-Egressd-Error"] == "upstream_unreachable"
        await asyncio.sleep(0.1)  # nothing is sent after the answer either
        assert fake.methods("POST") == 1  # counted at the upstream: it arrived once, never again
        assert "stale_connection" not in await metrics(server)


async def test_warm_connections_to_a_reused_connection_resetting_upstream_serve_gets(start_proxy: Any) -> None:
    async with fake_upstream(reset_reused()) as fake:
        server = await start_proxy([policy(fake.port, pool={"min_warm": 1})])
        await until(lambda: fake.accepted == 1, "the warm connection")
        for _ in range(4):  # each call resets its connection after one use: every GET still succeeds
            assert (await call(server))[0] == 200
        assert fake.methods("GET") >= 4


# ---- back-off ----------------------------------------------------------------------------


async def test_an_upstream_that_resets_new_connections_is_not_reconnected_in_a_loop(
    start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        return False

    accepted = 0

    async def accept_and_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await rst(writer)

    srv = await asyncio.start_server(accept_and_reset, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.WARNING, logger="egressd.transport"):
            server = await start_proxy([policy(port, pool={"min_warm": 2})])
            await asyncio.sleep(1.5)
        # Back-off doubles from 0.25 s (each wait drawn from its upper half): a handful of
        # tries in 1.5 s, where a loop would make thousands.
        assert 2 <= accepted <= 12
        stats = pool_of(server).stats()
        assert stats["warm_failures"] >= 2 and stats["idle"] == 0
        warnings = [r for r in caplog.records if "cannot keep warm connections" in r.getMessage()]
        assert 1 <= len(warnings) <= 2  # the first failure of the run, not one line per try
    finally:
        srv.close()


async def test_a_refusing_upstream_is_retried_with_back_off(start_proxy: Any) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = await start_proxy([policy(port, pool={"min_warm": 1})])
    await asyncio.sleep(1.5)
    stats = pool_of(server).stats()
    assert 1 <= stats["warm_failures"] <= 6
    assert stats["backoff_seconds"] > 0
    assert (await status(server))["upstreams"]["api"]["pool"]["backoff_seconds"] > 0
    # A call still goes out on its own path (and fails as before: connect_error, provably unsent).
    status_code, headers = await call(server)
    assert status_code == 502 and headers["X-Egressd-Error"] == "upstream_unreachable"


# ---- reload ------------------------------------------------------------------------------


async def test_reload_warms_a_new_upstream_and_closes_a_removed_one(start_proxy: Any) -> None:
    async with fake_upstream() as old, fake_upstream() as new:
        server = await start_proxy([policy(old.port, "old", pool={"min_warm": 1})])
        await until(lambda: old.accepted == 1 and old.open == 1, "old's warm connection")
        write_policies(server.settings.policies, [policy(new.port, "new", pool={"min_warm": 2})])
        assert await server.reload()
        await until(lambda: new.accepted == 2 and new.open == 2, "new's warm connections")
        await until(lambda: old.open == 0 and old.closed_by_peer == 1, "old's connection closed by egressd")
        assert old.accepted == 1  # and not re-warmed


async def test_reload_keeps_an_unchanged_pool_and_rewarms_a_changed_one(start_proxy: Any) -> None:
    async with fake_upstream() as a, fake_upstream() as b:
        server = await start_proxy(
            [policy(a.port, "a", pool={"min_warm": 1}), policy(b.port, "b", pool={"min_warm": 1})]
        )
        await until(lambda: a.accepted == 1 and b.accepted == 1, "both warm")
        write_policies(
            server.settings.policies,
            [policy(a.port, "a", pool={"min_warm": 1}), policy(b.port, "b", pool={"min_warm": 2})],
        )
        assert await server.reload()
        await until(lambda: b.open == 2 and pool_of(server, "b").idle == 2, "b's new pool warm")
        assert a.accepted == 1 and a.open == 1  # a's pool (same settings) was kept as it was
        assert b.accepted == 3  # b's old connection was closed, two new ones opened


# ---- --ready-when-warm -------------------------------------------------------------------


async def start_server(tmp_path: Path, docs: list[dict[str, Any]], **settings: Any) -> EgressServer:
    directory = write_policies(tmp_path / "policies", docs)
    server = EgressServer(
        Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=1.0, **settings)
    )
    await server.start()
    return server


async def readyz(server: EgressServer) -> int:
    async with ClientSession() as session:
        async with session.get(proxy_url(server, "admin") + "/readyz") as response:
            return response.status


async def test_ready_when_warm_waits_for_the_warm_connections(tmp_path: Path) -> None:
    async with fake_upstream() as fake:
        server = await start_server(tmp_path, [policy(fake.port, pool={"min_warm": 2})], ready_when_warm=True)
        try:
            seen: list[tuple[int, int]] = []
            for _ in range(2000):  # poll /readyz; each answer is noted with the connections made by then
                code = await readyz(server)
                seen.append((code, fake.accepted))
                if code == 200:
                    break
            assert seen[-1][0] == 200
            # Whenever /readyz said 200, both warm connections were already up.
            assert all(accepted >= 2 for code, accepted in seen if code == 200)
            assert pool_of(server).idle >= 2
        finally:
            await server.stop()


async def test_ready_when_warm_gives_up_after_warm_wait_for_a_dead_upstream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An upstream that accepts TCP and never answers the TLS handshake: never warm.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    doc = {
        "upstream": "dead",
        "target": f"https://127.0.0.1:{port}",
        "timeouts": {"connect": "200ms"},
        "pool": {"min_warm": 1},
    }
    try:
        with caplog.at_level(logging.WARNING, logger="egressd"):
            server = await start_server(tmp_path, [doc], ready_when_warm=True, warm_wait=0.5)
            try:
                assert await readyz(server) == 503
                await until(lambda: server.ready, "ready after --warm-wait")
                assert await readyz(server) == 200
            finally:
                await server.stop()
        late = [r for r in caplog.records if "ready without every warm connection" in r.getMessage()]
        assert late and getattr(late[0], "upstreams", None) == ["dead"]
    finally:
        srv.close()


async def test_without_ready_when_warm_ready_comes_at_once(tmp_path: Path) -> None:
    async with fake_upstream() as fake:
        server = await start_server(tmp_path, [policy(fake.port, pool={"min_warm": 1})])
        try:
            assert server.ready
        finally:
            await server.stop()


def test_ready_when_warm_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy import cli

    args = cli._parser().parse_args(["run", "--ready-when-warm", "--warm-wait", "3"])
    assert args.ready_when_warm is True and args.warm_wait == "3"
    assert cli._parser().parse_args(["run"]).ready_when_warm is False
    monkeypatch.setenv("EGRESSD_READY_WHEN_WARM", "true")
    assert cli._parser().parse_args(["run"]).ready_when_warm is True


# ---- TLS sessions and DNS -----------------------------------------------------------------


def tls_pair(*, tickets: bool = True) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    if not tickets:
        server_ctx.options |= ssl.OP_NO_TICKET
        server_ctx.num_tickets = 0
    client_ctx = _http1.client_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


async def get(pool: _http1.HTTP1Pool, **kw: Any) -> int:
    resp = await pool.request("GET", "/x", [], total_timeout=5, **kw)
    await resp.read()
    return resp.status


async def test_new_connections_resume_the_tls_session() -> None:
    server_ctx, client_ctx = tls_pair()
    async with fake_upstream(ssl_context=server_ctx) as fake:
        pool = _http1.HTTP1Pool("127.0.0.1", fake.port, ssl_context=client_ctx, keepalive=0.05)
        try:
            assert await get(pool) == 200
            await until(lambda: pool.size == 0, "the first connection expired")
            assert await get(pool) == 200  # a new connection: it resumes the first one's session
            assert fake.accepted == 2 and pool.handshakes == 2 and pool.resumed == 1
        finally:
            await pool.close()


async def test_a_server_without_tickets_gets_full_handshakes() -> None:
    server_ctx, client_ctx = tls_pair(tickets=False)
    async with fake_upstream(ssl_context=server_ctx) as fake:
        pool = _http1.HTTP1Pool("127.0.0.1", fake.port, ssl_context=client_ctx, keepalive=0.05)
        try:
            for _ in range(2):
                assert await get(pool) == 200
                await until(lambda: pool.size == 0, "the connection expired")
            assert fake.accepted == 2 and pool.resumed == 0  # refused resumption is no failure
        finally:
            await pool.close()


async def test_host_names_resolve_through_a_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: Any, port: Any, **kw: Any) -> Any:
        lookups.append(str(host))
        return await real("127.0.0.1", port, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    cache = _http1.DNSCache(ttl=0.2)
    async with fake_upstream() as fake:
        pool = _http1.HTTP1Pool("egressd-test.invalid", fake.port, dns=cache, keepalive=0.01)
        try:
            for _ in range(3):
                assert await get(pool) == 200
                await until(lambda: pool.size == 0, "the connection expired")
            assert fake.accepted == 3 and lookups == ["egressd-test.invalid"]  # one lookup within the TTL
            await asyncio.sleep(0.25)
            assert await get(pool) == 200
            assert len(lookups) == 2  # looked up again once the TTL passed
        finally:
            await pool.close()


async def test_stale_resend_is_asked_for_by_the_caller_only() -> None:
    async with fake_upstream(reset_reused()) as fake:
        pool = _http1.HTTP1Pool("127.0.0.1", fake.port)
        try:
            assert await get(pool) == 200
            assert await get(pool, resend_stale=True) == 200  # a reused connection reset: new one
            assert pool.stale_resends == 1 and fake.accepted == 2
            with pytest.raises(_http1.ResetError, match="reused idle connection") as info:
                await get(pool)  # the default: nothing is resent
            assert info.value.stale and fake.accepted == 2 and len(fake.requests) == 4
        finally:
            await pool.close()


async def test_yaml_policy_with_pool_block_loads(tmp_path: Path) -> None:
    from proxy.config.loader import load_policy_dir

    text = yaml.safe_dump(
        {"upstream": "a", "target": "https://x.example", "pool": {"max_idle": 8, "idle_timeout": "45s", "min_warm": 2}}
    )
    (tmp_path / "a.yaml").write_text(text)
    result = load_policy_dir(str(tmp_path))
    assert result.ok and result.policy_set is not None
    (p,) = result.policy_set.policies
    assert (p.pool.max_idle, p.pool.idle_timeout, p.pool.min_warm) == (8, 45.0, 2)


async def test_tls_warm_pool_through_egressd(tmp_path: Path, start_proxy: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async with fake_upstream(ssl_context=server_ctx) as fake:
        doc = {
            "upstream": "api",
            "target": f"https://127.0.0.1:{fake.port}",
            "tls": {"ca_file": str(ca_file)},
            "pool": {"min_warm": 2, "idle_timeout": "1s"},
        }
        server = await start_proxy([doc])
        await until(lambda: pool_of(server).idle == 2, "2 warm TLS connections")
        assert (await call(server))[0] == 200
        assert fake.on_warm_connection(2)
        # Replacements (here: after idle_timeout) resume the TLS session the first ones got.
        await until(lambda: pool_of(server).stats()["handshakes"] >= 4, "replacements")
        assert pool_of(server).stats()["resumed"] >= 1


# ---- egressd's own latency ----------------------------------------------------------------


async def test_overhead_leaves_out_the_upstream_and_the_policys_waits(start_proxy: Any) -> None:
    from proxy.events import CallFinished

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, n: int) -> bool:
        await asyncio.sleep(0.3)  # the upstream takes its time
        return await serve_ok(reader, writer, head, n)

    async with fake_upstream(slow) as fake:
        doc = policy(fake.port, rate_limit={"rate": "2/s", "burst": 1, "queue": {"max_wait": "5s"}})
        server = await start_proxy([doc])
        finished: list[CallFinished] = []
        server.events.subscribe(lambda e: finished.append(e) if isinstance(e, CallFinished) else None)
        results = await asyncio.gather(call(server), call(server))  # the second waits in the queue
        assert [code for code, _ in results] == [200, 200]
        assert len(finished) == 2
        for event in finished:
            assert event.overhead is not None
            # 0.3 s upstream (and up to 0.5 s queue) per call; what is left is egressd's own
            # work, a small part of it (a bound on the accounting, not a speed target).
            assert event.duration >= 0.3 and event.overhead < event.duration / 2
        html = await _status_page(server)
        assert "connections open / idle / warm" in html and "egressd&#x27;s own p50 / p99" in html


async def _status_page(server: EgressServer) -> str:
    async with ClientSession() as session:
        async with session.get(proxy_url(server, "admin") + "/status") as response:
            return await response.text()


async def test_dns_lookups_are_shared_and_failures_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    gate = asyncio.Event()
    fail = [True]

    async def fake_getaddrinfo(host: Any, port: Any, **kw: Any) -> Any:
        calls.append(str(host))
        await gate.wait()
        if fail[0]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)  # no real DNS: loopback only
    cache = _http1.DNSCache()
    first = [asyncio.ensure_future(cache.resolve(loop, "api.example.test", 443)) for _ in range(3)]
    await asyncio.sleep(0)
    gate.set()
    for task in first:
        with pytest.raises(OSError):
            await task
    assert calls == ["api.example.test"]  # three callers, one lookup
    fail[0] = False
    assert await cache.resolve(loop, "api.example.test", 443) == [(socket.AF_INET, "127.0.0.1")]
    assert len(calls) == 2  # the failure was not kept
