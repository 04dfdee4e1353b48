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
