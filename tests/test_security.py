"""Security properties (docs/security.md): the admin listener stays on loopback unless told
otherwise (and then warns), TLS verification is on by default, and planted secrets never
appear in any output egressd produces: log lines, /metrics, /status, /status.json, error
bodies and headers.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from fakes import FakeServer
from proxy.cli import _parser
from proxy.config.schema import Tls
from proxy.observe.logs import configure_logging
from proxy.server import EgressServer, Settings
from tests.conftest import proxy_url, write_policies

INJECTED = "sk_live_PLANTEDinjectedKey4f1c"
HEADER_KEY = "key-PLANTEDheaderValue9a7e"
APP_KEY = "sk_live_PLANTEDappSentKeyb2d0"
OAUTH_SECRET = "PLANTEDoauthClientSecret77a1"
QUERY_SECRET = "PLANTEDquerySecret31e5"
RELOAD_SECRET = "sk_live_PLANTEDreloadSecret0c9d"
CARDS = ("4242424242424242", "4000 0566 5566 5556", "5555-5555-5555-4444")


def test_admin_binds_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EGRESSD_ADMIN", "EGRESSD_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    args = _parser().parse_args(["run"])
    assert args.admin == "127.0.0.1:9901" and args.listen == "127.0.0.1:8080"
    defaults = Settings(policies=Path("."))
    assert defaults.admin[0] == "127.0.0.1" and defaults.listen[0] == "127.0.0.1"


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
async def test_admin_on_a_public_address_warns_loudly(
    tmp_path: Path, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    directory = write_policies(tmp_path / "p", [{"upstream": "a", "target": "http://127.0.0.1:1"}])
    server = EgressServer(Settings(policies=directory, listen=("127.0.0.1", 0), admin=(host, 0)))
    egressd = logging.getLogger("egressd")
    egressd.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="egressd"):
            await server.start()
    finally:
        egressd.removeHandler(caplog.handler)
        await server.stop()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "admin listener" in r.getMessage()]
    assert warnings, caplog.text
    assert "reachable from outside" in warnings[0].getMessage()


async def test_admin_on_loopback_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = write_policies(tmp_path / "p", [{"upstream": "a", "target": "http://127.0.0.1:1"}])
    server = EgressServer(Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0)))
    egressd = logging.getLogger("egressd")
    egressd.addHandler(caplog.handler)
    try:
        await server.start()
    finally:
        egressd.removeHandler(caplog.handler)
        await server.stop()
    assert not [r for r in caplog.records if "admin listener" in r.getMessage()]


def test_tls_verification_is_on_by_default() -> None:
    # Behaviour is covered by tests/test_fault_matrix.py::test_tls_verification_failure
    # (a self-signed upstream is refused with no `tls:` block at all).
    assert Tls().verify is True


@pytest.fixture
def all_logs() -> Iterator[io.StringIO]:
    """Route egressd's logs (access log included) into a buffer, at debug level."""
    logger = logging.getLogger("egressd")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    lifecycle = logging.getLogger("egressd.lifecycle").level
    buffer = io.StringIO()
    configure_logging("json", "debug", stream=buffer)
    try:
        yield buffer
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        logging.getLogger("egressd.lifecycle").setLevel(lifecycle)


async def test_planted_secrets_never_appear_in_any_output(
    tmp_path: Path,
    all_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EGRESSD_SEC_INJECTED", INJECTED)
    monkeypatch.setenv("EGRESSD_SEC_OAUTH", OAUTH_SECRET)
    key_file = tmp_path / "header-key"
    key_file.write_text(HEADER_KEY + "\n")
    outputs: list[str] = []
    async with FakeServer("echo") as echo, FakeServer("paypal", clients={"cid": OAUTH_SECRET}) as paypal:
        docs: list[dict[str, Any]] = [
            {"upstream": "bearer", "target": echo.url, "auth": {"bearer": "${env:EGRESSD_SEC_INJECTED}"},
             "retry": {"attempts": 2}, "cache": {"ttl": "10s"}, "idempotency": {"replay_ttl": "1h"}},
            {"upstream": "header", "target": echo.url,
             "auth": {"header": {"name": "X-Api-Key", "value": f"${{file:{key_file}}}"}}},
            {"upstream": "paypal", "target": paypal.url, "provider": "paypal",
             "auth": {"oauth_client_credentials": {"token_url": paypal.url + "/v1/oauth2/token", "client_id": "cid",
                                                   "client_secret": "${env:EGRESSD_SEC_OAUTH}"}}},
            {"upstream": "badauth", "target": paypal.url, "provider": "paypal",
             "auth": {"oauth_client_credentials": {"token_url": paypal.url + "/v1/oauth2/token", "client_id": "cid",
                                                   "client_secret": "${env:EGRESSD_SEC_INJECTED}"}}},
            {"upstream": "down", "target": "http://127.0.0.1:1", "auth": {"bearer": "${env:EGRESSD_SEC_INJECTED}"},
             "timeouts": {"connect": "1s", "attempt": "1s", "total": "1s"}},
        ]  # fmt: skip
        directory = write_policies(tmp_path / "policies", docs)
        server = EgressServer(Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0)))
        with caplog.at_level(logging.DEBUG):
            await server.start()
            try:
                base, admin = proxy_url(server), proxy_url(server, "admin")
                app_headers = {"Authorization": f"Bearer {APP_KEY}", "X-Card": CARDS[0]}
                async with aiohttp.ClientSession() as s:

                    async def get(url: str, method: str = "GET", **kwargs: Any) -> None:
                        async with s.request(method, url, **kwargs) as resp:
                            text = await resp.text(errors="replace")
                            # An upstream's own answer is the upstream's business (the echo
                            # fake shows what it received); answers egressd made are scanned.
                            if "X-Egressd-Error" in resp.headers or url.startswith(admin):
                                outputs.append(text + "\n" + repr(dict(resp.headers)))

                    for card in CARDS:
                        await get(f"{base}/bearer/v1/cards/{card.replace(' ', '')}?number={card}", headers=app_headers)
                    await get(f"{base}/bearer/x?api_key={QUERY_SECRET}&token={QUERY_SECRET}&card={CARDS[1]}")
                    await get(f"{base}/bearer/pay", "POST", data={"card[number]": CARDS[0], "key": INJECTED},
                              headers={**app_headers, "Idempotency-Key": "k1"})  # fmt: skip
                    await get(f"{base}/header/x", headers=app_headers)
                    await get(f"{base}/paypal/v2/checkout/orders/NOPE", headers=app_headers)
                    await get(f"{base}/badauth/v2/checkout/orders/NOPE")  # token refused: an egressd error
                    await get(f"{base}/down/x", headers=app_headers)  # refused: an egressd error
                    await get(f"{base}/nope/x", headers=app_headers)  # unknown upstream
                    await get(f"{base}/bearer/%2e%2e/x?card={CARDS[0]}", headers=app_headers)  # refused target
                    # A reload whose secret is bad: the problem is logged and shown on /status.
                    monkeypatch.setenv("EGRESSD_SEC_RELOAD", RELOAD_SECRET + "\r\nX-Evil: 1")
                    (directory / "policies.yaml").write_text(
                        yaml.safe_dump_all([*docs, {"upstream": "reload", "target": echo.url,
                                                    "auth": {"bearer": "${env:EGRESSD_SEC_RELOAD}"}}])
                    )  # fmt: skip
                    assert not await server.reload(reason="test")
                    for path in ("/metrics", "/status", "/status.json", "/healthz", "/readyz"):
                        await get(admin + path)
            finally:
                await server.stop()
                server.access_log.flush()
        seen_upstream = [r.header("Authorization") for r in echo.ledger.requests]
        tokens = {
            (r.header("Authorization") or "").removeprefix("Bearer ")
            for r in paypal.ledger.requests
            if (r.header("Authorization") or "").startswith("Bearer ")
        }
    # The planted secrets did go where they belong, so their absence below means something.
    assert f"Bearer {INJECTED}" in seen_upstream
    assert any(r.header("X-Api-Key") == HEADER_KEY for r in echo.ledger.requests)
    assert tokens and all(len(t) > 20 for t in tokens)
    captured = capfd.readouterr()
    everything = {
        "egressd logs": all_logs.getvalue(),
        "other logs": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "error answers and admin pages": "\n".join(outputs),
    }
    assert '"logger":"egressd.access"' in everything["egressd logs"]  # the access log was captured
    assert "egressd_requests_total" in everything["error answers and admin pages"]
    assert everything["error answers and admin pages"].count("X-Egressd-Error") >= 4
    planted = [INJECTED, HEADER_KEY, OAUTH_SECRET, QUERY_SECRET, RELOAD_SECRET, *tokens]
    digits = [c.replace(" ", "").replace("-", "") for c in CARDS]
    for where, text in everything.items():
        for secret in planted:
            assert secret not in text, f"{secret[:12]}... found in {where}"
        for card in (*CARDS, *digits):
            assert card not in text, f"card number {card} found in {where}"
        assert APP_KEY not in text, f"the app's own key found in {where}"
