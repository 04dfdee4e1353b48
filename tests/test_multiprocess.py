"""Several `egressd run --redis` processes with one policy: one budget, one circuit, one ledger.

Real processes, a real redis-server (tests/redis_server.py) and a fake upstream in this
process (fakes) whose ledger shows what actually arrived.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fakes.server import FakeServer
from tests.redis_server import EgressProcess, RedisServer, egress_fleet

RATE = 50.0  # calls per second, shared by the whole fleet
CALLS = 200  # 4 s of traffic at RATE


def _policies(directory: Path, target: str) -> Path:
    docs: list[dict[str, Any]] = [
        {
            "upstream": "limited",
            "target": target,
            "timeouts": {"total": "60s"},
            "rate_limit": {
                "rate": f"{RATE:g}/s",
                "burst": 1,
                "shared": True,
                "queue": {"max_wait": "30s", "max_size": 10000},
            },
        },
        {
            "upstream": "flaky",
            "target": target,
            "circuit_breaker": {
                "window": "30s",
                "min_requests": 4,
                "failure_rate": 0.5,
                "open_for": "30s",
                "half_open_requests": 1,
            },
        },
        {"upstream": "pay", "target": target, "idempotency": {"replay_ttl": "1h"}},
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


@pytest.fixture
async def fake() -> Any:
    async with FakeServer("echo") as server:
        yield server


def _fleet(
    count: int, tmp_path: Path, fake: FakeServer, redis: RedisServer
) -> AbstractContextManager[list[EgressProcess]]:
    policies = _policies(tmp_path / "policies", fake.url)
    # A generous time budget: these tests are about sharing, and a busy CI box must not push
    # replicas onto their local fallback (tests/test_redis_backend.py covers the budget).
    url = redis.url + "?budget_ms=1000"
    return egress_fleet(count, policies, redis_url=url, prefix=f"mp-{uuid.uuid4().hex[:8]}:", log_dir=tmp_path)


@pytest.mark.parametrize("replicas", [2, 4])
async def test_shared_rate_holds_across_replicas(
    replicas: int, tmp_path: Path, fake: FakeServer, redis_server: RedisServer
) -> None:
    with _fleet(replicas, tmp_path, fake, redis_server) as fleet:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one(i: int) -> int:
                async with http.get(f"{fleet[i % replicas].url}/limited/rl/{i}") as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(i) for i in range(CALLS)))
    assert statuses == [200] * CALLS, [p.log() for p in fleet]
    arrivals = sorted(r.t for r in fake.ledger.requests_to("/rl/"))
    assert len(arrivals) == CALLS
    observed = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert observed == pytest.approx(RATE, rel=0.05), observed


async def test_circuit_opened_through_one_replica_is_open_on_another(
    tmp_path: Path, fake: FakeServer, redis_server: RedisServer
) -> None:
    with _fleet(2, tmp_path, fake, redis_server) as (a, b):
        async with aiohttp.ClientSession() as http:
            for _ in range(4):
                async with http.get(f"{a.url}/flaky/status/500") as r:
                    assert r.status == 500
            before = len(fake.ledger.requests)
            async with http.get(f"{b.url}/flaky/status/200") as r:
                assert r.status == 503
                assert r.headers["X-Egressd-Error"] == "circuit_open"
            assert len(fake.ledger.requests) == before  # failed fast, never sent


async def test_idempotent_repeat_on_another_replica_is_replayed(
    tmp_path: Path, fake: FakeServer, redis_server: RedisServer
) -> None:
    key = uuid.uuid4().hex
    with _fleet(2, tmp_path, fake, redis_server) as (a, b):
        async with aiohttp.ClientSession() as http:
            headers = {"Idempotency-Key": key}
            async with http.post(f"{a.url}/pay/charges", json={"amount": 100}, headers=headers) as r:
                assert r.status == 200
                first = await r.read()
                assert "Idempotent-Replayed" not in r.headers
            async with http.post(f"{b.url}/pay/charges", json={"amount": 100}, headers=headers) as r:
                assert r.status == 200
                assert r.headers["Idempotent-Replayed"] == "true"
                assert await r.read() == first
    assert fake.ledger.count("echo.POST", key=key) == 1
    assert len(fake.ledger.requests_to("/charges")) == 1
