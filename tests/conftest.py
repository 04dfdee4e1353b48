"""Shared fixtures: a real egressd server on loopback and real upstream servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from proxy.server import EgressServer, Settings

# The official SDKs honour HTTP_PROXY; tests talk to loopback only.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


class Upstream:
    """A running aiohttp app on 127.0.0.1:<free port>."""

    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port
        self.url = f"http://127.0.0.1:{port}"


async def start_app(app: web.Application) -> Upstream:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return Upstream(runner, port)


@pytest.fixture
async def run_app() -> AsyncIterator[Callable[[web.Application], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def _run(app: web.Application) -> Upstream:
        up = await start_app(app)
        started.append(up)
        return up

    yield _run
    for up in reversed(started):
        await up.runner.cleanup()


def write_policies(directory: Path, docs: list[dict[str, Any]] | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    text = docs if isinstance(docs, str) else yaml.safe_dump_all(docs, sort_keys=False)
    (directory / "policies.yaml").write_text(text)
    return directory


@pytest.fixture
async def start_proxy(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[EgressServer]]]:
    servers: list[EgressServer] = []

    async def _start(docs: list[dict[str, Any]] | str, **kwargs: Any) -> EgressServer:
        directory = write_policies(tmp_path / f"policies{len(servers)}", docs)
        settings = Settings(
            policies=directory,
            listen=("127.0.0.1", 0),
            admin=("127.0.0.1", 0),
            drain=kwargs.pop("drain", 2.0),
            watch_interval=kwargs.pop("watch_interval", 0.2),
        )
        server = EgressServer(settings, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield _start
    for server in servers:
        await server.stop()


def proxy_url(server: EgressServer, key: str = "main") -> str:
    host, port = server.addresses[key]
    return f"http://{host}:{port}"


# ==== Redis (issue 4): real redis-server fixtures and the backend-parameterised factory ====
# Owned by the shared-state work; kept in one block so other edits above do not collide.
# `state_backend_factory` serves tests/test_state_limits.py and tests/test_state_records.py.

from collections.abc import Iterator  # noqa: E402

from proxy.clock import Clock  # noqa: E402
from proxy.state.base import StateBackend  # noqa: E402
from tests.egressd_process import egressd_factory  # noqa: E402, F401  (a fixture for every module)
from tests.redis_server import RedisCluster, RedisServer, running_cluster, running_redis  # noqa: E402


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the session (tests isolate themselves with a unique prefix)."""
    with running_redis() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster for the session, started on first use."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["memory", "sqlite", "redis", "redis-cluster"])
async def state_backend_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Callable[[Clock], StateBackend]]:
    import uuid

    from proxy.state.memory import MemoryState
    from proxy.state.redis import RedisState
    from proxy.state.sqlite import SQLiteState

    if request.param == "memory":
        yield lambda clock: MemoryState(clock)
        return
    if request.param == "sqlite":
        opened: list[SQLiteState] = []

        def sqlite_factory(clock: Clock) -> StateBackend:
            # A data dir per test; a second state in the same test shares it (two processes).
            state = SQLiteState(tmp_path / "data", clock)
            opened.append(state)
            return state

        (tmp_path / "data").mkdir()
        yield sqlite_factory
        for opened_state in opened:
            await opened_state.close()
        return
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    url = request.getfixturevalue(fixture).url
    made: list[RedisState] = []

    def factory(clock: Clock) -> StateBackend:
        state = RedisState(url, prefix=f"test-{uuid.uuid4().hex[:8]}:", clock=clock)
        made.append(state)
        return state

    yield factory
    for state in made:
        await state.close()
