"""The status page (`/status`, `/status.json`): its data after real traffic, its headers,
no secret anywhere on the admin listener, and the page as Debian's headless chromium
renders it at phone and desktop width."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes import FakeServer
from proxy.server import EgressServer
from tests.conftest import proxy_url
from tests.missing import missing

CARD = "4242424242424242"
CARD_SPACED = "4242 4242 4242 4242"
APP_KEY = "sk_live_PLANTEDappKey9f8e7d6c5b4a"
QUERY_KEY = "qk_PLANTEDqueryKey0123456789"
ENV_TOKEN = "envtok_PLANTEDbearer_5e5e5e5e5e"
PAYPAL_SECRET = "pp_PLANTEDclientSecret_77"
REQUEST_ID = "reqPLANTEDid424242"
SECRETS = (CARD, CARD_SPACED, APP_KEY, QUERY_KEY, ENV_TOKEN, PAYPAL_SECRET, REQUEST_ID, "PLANTED")
BROWSER_TIMEOUT = 25.0
CSP_START = "default-src 'none'; style-src 'unsafe-inline'"


@dataclass
class Scene:
    server: EgressServer
    admin: str
    version: str


@pytest.fixture
async def fakes() -> AsyncIterator[dict[str, FakeServer]]:
    servers = {name: FakeServer(name) for name in ("stripe", "paypal", "echo")}
    for s in servers.values():
        await s.start()
    yield servers
    for s in servers.values():
        await s.stop()


def _policies(fakes: dict[str, FakeServer]) -> list[dict[str, Any]]:
    return [
        {
            "upstream": "stripe",
            "target": fakes["stripe"].url,
            "provider": "stripe",
            "timeouts": {"connect": "1s", "attempt": "2s", "total": "5s"},
            "retry": {"attempts": 2, "backoff": {"initial": "5ms", "max": "10ms"}},
            "idempotency": {"replay_ttl": "1h"},
            "circuit_breaker": {"window": "30s", "min_requests": 3, "failure_rate": 0.5, "open_for": "60s"},
            "failover": [
                {
                    "to": "paypal",
                    "on": ["circuit_open", "exhausted", 503],
                    "crosswalk": {"payment_methods": {"pm_card_visa": "8TX02017P3456"}},
                }
            ],
        },
        {
            "upstream": "paypal",
            "target": fakes["paypal"].url,
            "provider": "paypal",
            "auth": {
                "oauth_client_credentials": {
                    "token_url": fakes["paypal"].url + "/v1/oauth2/token",
                    "client_id": "client-id-123",
                    "client_secret": PAYPAL_SECRET,
                }
            },
            "idempotency": {"header": "PayPal-Request-Id", "generate": False},
            "circuit_breaker": {"window": "30s", "min_requests": 20},
        },
        {
            "upstream": "mail",
            "target": fakes["echo"].url,
            "auth": {"bearer": "${env:STATUS_TEST_TOKEN}"},
            "rate_limit": {"rate": "1/s", "burst": 1},
        },
    ]


async def _scene(start_proxy: Any, fakes: dict[str, FakeServer]) -> Scene:
    """egressd with three upstreams after traffic carrying planted secrets: Stripe down
    (circuit opens, failovers used and refused), a rate-limited call, a failed reload."""
    fakes["stripe"].faults.outage(120)
    server = await start_proxy(_policies(fakes))
    version = str(server.runtime.version)
    base = proxy_url(server)
    secret_headers = {"Authorization": f"Bearer {APP_KEY}", "X-Request-Id": REQUEST_ID}
    async with aiohttp.ClientSession() as http:
        for i in range(5):
            pm = "pm_card_visa" if i % 2 == 0 else "pm_card_mastercard"
            form = {
                "amount": "2000",
                "currency": "usd",
                "payment_method": pm,
                "confirm": "true",
                "description": f"card {CARD} / {CARD_SPACED}",
            }
            async with http.post(
                f"{base}/stripe/v1/payment_intents?api_key={QUERY_KEY}", data=form, headers=secret_headers
            ) as r:
                await r.read()
        statuses = []
        for _ in range(3):
            async with http.post(
                f"{base}/mail/v3/mail/send?api_key={QUERY_KEY}",
                json={"card": CARD, "to": "a@example.com"},
                headers=secret_headers,
            ) as r:
                statuses.append(r.status)
        assert 429 in statuses and 200 in statuses, statuses
    # The upstream saw the env token (so it really was in play) ...
    assert any(ENV_TOKEN in (req.header("Authorization") or "") for req in fakes["echo"].ledger.requests)
    # ... and a rejected reload names its problem on the page.
    (server.settings.policies / "zz-broken.yaml").write_text(
        "upstream: broken\ntarget: nope\nauth:\n  bearer: ${env:STATUS_TEST_TOKEN}\n"
    )
    assert not await server.reload("test")
    return Scene(server, proxy_url(server, "admin"), version)


async def _get(url: str) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, dict(r.headers), await r.text()


async def test_status_json_and_page(
    start_proxy: Any, fakes: dict[str, FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATUS_TEST_TOKEN", ENV_TOKEN)
    scene = await _scene(start_proxy, fakes)
    status, headers, text = await _get(scene.admin + "/status.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(text)
    assert data["policy_version"] == scene.version
    assert data["last_reload"]["result"] == "failure"
    assert any("broken" in p for p in data["last_reload"]["problems"])
    assert data["state_backend"]["name"] == "memory" and data["state_backend"]["health"] == "ok"
    stripe = data["upstreams"]["stripe"]
    assert stripe["circuit"] == "open"
    assert stripe["calls_5m"] == 5 and stripe["p50_ms"] is not None and stripe["p99_ms"] >= stripe["p50_ms"]
    assert stripe["retries"] >= 1
    tally = stripe["failovers"]["paypal"]
    assert tally["used"] >= 1 and tally["refused"] >= 1
    assert tally["reasons"].get("no_crosswalk_entry", 0) >= 1
    assert stripe["last_errors"] and {"time", "code", "status"} <= set(stripe["last_errors"][0])
    assert stripe["rate_limit"] is None and stripe["circuit_breaker"]["min_requests"] == 3
    mail = data["upstreams"]["mail"]
    assert mail["circuit"] == "none"
    assert mail["rate_limit"]["rejected"] >= 1 and mail["rate_limit"]["rate_per_second"] == 1.0
    assert mail["rate_limit"]["queue_depth"] == 0
    assert any(e["code"] == "rate_limited" and e["status"] == 429 for e in mail["last_errors"])
    assert data["upstreams"]["paypal"]["target"] == fakes["paypal"].url

    status, headers, page = await _get(scene.admin + "/status")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["Content-Security-Policy"].startswith(CSP_START)
    assert "script-src" not in headers["Content-Security-Policy"] and "<script" not in page
    assert 'http-equiv="refresh"' in page and 'name="viewport"' in page
    for external in ("http://", "https://", "//"):
        assert f'src="{external}' not in page and f"href='{external}" not in page and f'href="{external}' not in page
    assert "circuit open" in page and scene.version in page and "no_crosswalk_entry" in page


async def test_no_secret_reaches_the_admin_listener(
    start_proxy: Any, fakes: dict[str, FakeServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATUS_TEST_TOKEN", ENV_TOKEN)
    scene = await _scene(start_proxy, fakes)
    for path in ("/status", "/status.json", "/metrics"):
        status, headers, text = await _get(scene.admin + path)
        assert status == 200, path
        blob = text + json.dumps(headers)
        for secret in SECRETS:
            assert secret not in blob, (path, secret)


# -- the page in a real browser -------------------------------------------------------------
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    missing(
        "the status page test needs Debian's headless `chromium` on PATH: add `chromium` to the apt-get "
        "line of .ci/run (locally: apt-get install -y chromium)"
    )


async def _browser(binary: str, profile: Path, width: int, *args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={width},900",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BROWSER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"chromium did not finish within {BROWSER_TIMEOUT} s: {args}")
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def _screenshot_dir(default: Path) -> Path:
    """EGRESSD_SCREENSHOT_DIR keeps the screenshots for a look (CI can upload them)."""
    shots = Path(os.environ.get("EGRESSD_SCREENSHOT_DIR") or default)
    shots.mkdir(parents=True, exist_ok=True)
    return shots


def _check_png(path: Path, width: int) -> None:
    assert path.exists(), f"chromium wrote no screenshot at {path}"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert struct.unpack(">II", data[16:24]) == (width, 900), struct.unpack(">II", data[16:24])
    # a blank or error page compresses to a few KB; the status page is well above that
    assert len(data) > 10_000, f"{path} is only {len(data)} bytes"


async def test_status_page_in_headless_chromium(
    start_proxy: Any, fakes: dict[str, FakeServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    binary = _chromium()
    monkeypatch.setenv("STATUS_TEST_TOKEN", ENV_TOKEN)
    scene = await _scene(start_proxy, fakes)
    url = scene.admin + "/status"
    shots = _screenshot_dir(tmp_path)

    dom = (await _browser(binary, tmp_path / "profile-dom", 375, "--dump-dom", url)).decode()
    expected = ("egressd status", "stripe", "paypal", "mail", "circuit open", "circuit closed", "circuit none")
    for text in (*expected, scene.version):
        assert text in dom, text
    assert "failed" in dom and "broken" in dom  # the rejected reload and its problem
    assert "no_crosswalk_entry" in dom and "rate_limited" in dom
    for secret in SECRETS:
        assert secret not in dom, secret

    for width in (375, 1280):
        shot = shots / f"status-{width}.png"
        await _browser(binary, tmp_path / f"profile-{width}", width, f"--screenshot={shot}", url)
        _check_png(shot, width)
