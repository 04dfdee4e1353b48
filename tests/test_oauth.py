"""`auth: oauth_client_credentials` against the fake PayPal (token on demand, cached,
shared, refreshed once on a 401, failures never surface as the caller's 401)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from fakes import FakeServer
from tests.conftest import proxy_url

ORDER = json.dumps({"intent": "CAPTURE", "purchase_units": [{"amount": {"currency_code": "USD", "value": "1.00"}}]})


def policy(url: str, **auth: Any) -> dict[str, Any]:
    return {
        "upstream": "paypal",
        "target": url,
        "provider": "paypal",
        "auth": {
            "oauth_client_credentials": {
                "token_url": url + "/v1/oauth2/token",
                "client_id": "cid",
                "client_secret": "sec",
                **auth,
            }
        },
    }


async def _create(server: Any, http: aiohttp.ClientSession) -> tuple[int, dict[str, str], Any]:
    async with http.post(
        proxy_url(server) + "/paypal/v2/checkout/orders",
        data=ORDER,
        headers={"Content-Type": "application/json", "Authorization": "Bearer app-token"},
    ) as r:
        return r.status, dict(r.headers), await r.json()


async def test_token_fetched_once_and_shared(start_proxy: Any) -> None:
    async with FakeServer("paypal") as pf:
        server = await start_proxy([policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            results = await asyncio.gather(*(_create(server, http) for _ in range(8)))
        assert all(status == 201 for status, _, _ in results)
        assert pf.ledger.count("token.issued") == 1
        orders = pf.ledger.requests_to("/v2/checkout/orders", "POST")
        assert all(
            r.header(
                "Authorization",
            ).startswith("Bearer A21AA")
            for r in orders
        )  # never the app's
        token_req = pf.ledger.requests_to("/v1/oauth2/token")[0]
        assert token_req.header("Authorization") == "Basic Y2lkOnNlYw=="


async def test_refreshed_once_on_401(start_proxy: Any) -> None:
    async with FakeServer("paypal") as pf:
        server = await start_proxy([policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            assert (await _create(server, http))[0] == 201
            pf.faults.status(401, path="/v2/checkout/orders", count=1)
            status, _, _ = await _create(server, http)
        assert status == 201
        assert pf.ledger.count("token.issued") == 2


async def test_refreshed_before_expiry(start_proxy: Any) -> None:
    async with FakeServer("paypal", token_ttl=1) as pf:
        server = await start_proxy([policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            assert (await _create(server, http))[0] == 201
            await asyncio.sleep(1.0)
            assert (await _create(server, http))[0] == 201
        assert pf.ledger.count("token.issued") == 2


async def test_token_failure_is_a_502_in_the_callers_shape(start_proxy: Any) -> None:
    async with FakeServer("paypal", clients={"cid": "other"}) as pf:
        server = await start_proxy([policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            status, headers, body = await _create(server, http)
        assert status == 502
        assert headers["X-Egressd-Error"] == "upstream_auth_failed"
        assert body["name"] and body["debug_id"] and "token" in body["message"]
        assert pf.ledger.count("order.created") == 0


async def test_persistent_401_is_not_passed_through(start_proxy: Any) -> None:
    async with FakeServer("paypal") as pf:
        pf.faults.status(401, path="/v2/checkout/orders")
        server = await start_proxy([policy(pf.url)])
        async with aiohttp.ClientSession() as http:
            status, headers, _ = await _create(server, http)
        assert status == 502 and headers["X-Egressd-Error"] == "upstream_auth_failed"
        assert pf.ledger.count("token.issued") == 2
