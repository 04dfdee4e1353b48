"""`egressd demo`: a self-contained demonstration on loopback.

Part 1 starts the packaged fake providers, serves the shipped example policies re-pointed
at them (with a few values shortened so that it takes seconds), injects faults, drives
traffic through egressd and prints what each resilience mechanism did.

Part 2 is the Black-Friday simulation (`demo.blackfriday`): the same shop traffic sent
straight to the fakes by a naive retrying client and through egressd with failover, and a
report comparing the two (`--html FILE` writes it with charts too).

No network, no secrets. Exit status 0 when every part-1 mechanism behaved and egressd's
simulated run had no duplicates, no lost calls it could have saved, no provider 429 at the
e-mail upstreams, and exactly one verified payment_intent.succeeded at the shop for every
payment that happened, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from demo.blackfriday import (
    DEFINITIONS,
    Scenario,
    demo_credentials,
    print_simulation,
    report_rows,
    result_json,
    run_once,
    verdict,
)
from demo.html import render_html
from fakes.server import FakeServer, start_fakes, stop_fakes
from proxy.config.loader import PolicyYamlLoader
from proxy.server import EgressServer, Settings

STRIPE_KEY = "sk_test_demo_not_a_secret"
SENDGRID_KEY = "SG.demo-not-a-secret"
MAIL = {
    "personalizations": [{"to": [{"email": "customer@example.org"}]}],
    "from": {"email": "shop@example.com", "name": "Shop"},
    "subject": "Your order #42",
    "content": [{"type": "text/plain", "value": "Thanks for your order."}],
}


def example_policies() -> dict[str, dict[str, Any]]:
    """The shipped example policies (installed as `proxy.examples`, or ./policies in a checkout)."""
    texts: list[str] = []
    try:
        root = importlib.resources.files("proxy.examples")
        texts = [p.read_text() for p in root.iterdir() if p.name.endswith((".yaml", ".yml"))]
    except (ModuleNotFoundError, FileNotFoundError):
        checkout = Path(__file__).resolve().parent.parent / "policies"
        texts = [p.read_text() for p in sorted(checkout.glob("*.y*ml"))]
    docs: dict[str, dict[str, Any]] = {}
    for text in texts:
        for doc in yaml.load_all(text, Loader=PolicyYamlLoader):
            if isinstance(doc, dict):
                docs[doc["upstream"]] = doc
    return docs


def demo_policies(fakes: dict[str, FakeServer]) -> tuple[list[dict[str, Any]], list[str]]:
    """Re-point the examples at the fakes; shorten what would make a demo slow. Returns the changes too."""
    docs = example_policies()
    changes: list[str] = []
    for name, doc in docs.items():
        if name in fakes:
            doc["target"] = fakes[name].url
        doc.pop("listen", None)
        doc.pop("failover", None)  # failover is part 2's subject
    changes.append("targets point at the local fakes; failover blocks left out (part 2 shows failover)")
    changes += demo_credentials(docs, fakes)
    stripe = docs["stripe"]
    stripe["retry"]["backoff"] = {"initial": "50ms", "max": "400ms", "multiplier": 2, "jitter": "full"}
    changes.append("stripe: retry backoff 50ms..400ms (example: 250ms..5s)")
    sendgrid = docs["sendgrid"]
    sendgrid["timeouts"] = {"connect": "1s", "attempt": "300ms", "total": "1s"}
    changes.append("sendgrid: attempt timeout 300ms, total 1s (example: 15s / 40s)")
    catalog = {
        "upstream": "catalog",
        "target": fakes["echo"].url,
        "retry": {"attempts": 3, "backoff": {"initial": "50ms", "max": "200ms"}, "on": [429, 502, 503]},
        "cache": {"ttl": "30s", "stale_if_error": "5m"},
        "circuit_breaker": {
            "window": "10s",
            "min_requests": 5,
            "failure_rate": 0.5,
            "open_for": "500ms",
            "half_open_requests": 2,
        },
    }
    throttled = {
        "upstream": "throttled",
        "target": fakes["echo"].url,
        "rate_limit": {"rate": "40/s", "burst": 1, "queue": {"max_wait": "5s", "max_size": 100}},
    }
    changes.append("extra upstreams on the echo fake: catalog (cache, circuit) and throttled (40/s, queue)")
    return [*docs.values(), catalog, throttled], changes


@dataclass
class Row:
    mechanism: str
    action: str
    observed: str
    ok: bool


class Demo:
    def __init__(self, server: EgressServer, fakes: dict[str, FakeServer], session: aiohttp.ClientSession) -> None:
        self.server = server
        self.fakes = fakes
        self.session = session
        host, port = server.addresses["main"]
        self.base = f"http://{host}:{port}"

    async def call(
        self, method: str, path: str, *, headers: dict[str, str] | None = None, data: Any = None, json: Any = None
    ) -> tuple[int, dict[str, str], bytes, float]:
        began = time.monotonic()
        async with self.session.request(method, self.base + path, headers=headers, data=data, json=json) as resp:
            body = await resp.read()
            return resp.status, dict(resp.headers), body, time.monotonic() - began

    def stripe_headers(self, key: str | None = None) -> dict[str, str]:
        headers = {"Authorization": "Bearer " + STRIPE_KEY}
        if key:
            headers["Idempotency-Key"] = key
        return headers

    async def passthrough(self) -> Row:
        status, headers, _, took = await self.call(
            "POST",
            "/stripe/v1/payment_intents",
            headers=self.stripe_headers(str(uuid.uuid4())),
            data={"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
        )
        return Row(
            "pass-through",
            "create a Stripe PaymentIntent",
            f"{status} in {took * 1000:.1f} ms via {headers.get('X-Egressd-Upstream')}",
            status == 200,
        )

    async def retries(self) -> Row:
        stripe = self.fakes["stripe"]
        stripe.faults.status(503, count=3, path="/v1/payment_intents")
        key = str(uuid.uuid4())
        status, headers, _, _ = await self.call(
            "POST",
            "/stripe/v1/payment_intents",
            headers=self.stripe_headers(key),
            data={"amount": "1500", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
        )
        charges = stripe.ledger.count("payment_intent.created", key=key)
        attempts = headers.get("X-Egressd-Attempts")
        return Row(
            "retries",
            "Stripe answers 503 three times, then works",
            f"{status} after {attempts} attempts, one key, {charges} charge",
            status == 200 and charges == 1,
        )

    async def unsafe_timeout(self) -> Row:
        sendgrid = self.fakes["sendgrid"]
        sendgrid.faults.delay(0.6, phase="after", count=1, path="/v3/mail/send")
        before = sendgrid.ledger.count("mail.sent")
        mail = {**MAIL, "subject": "Timed out once " + uuid.uuid4().hex[:6]}
        status, headers, _, _ = await self.call(
            "POST", "/sendgrid/v3/mail/send", headers={"Authorization": "Bearer " + SENDGRID_KEY}, json=mail
        )
        sent = sendgrid.ledger.count("mail.sent") - before
        return Row(
            "retry safety",
            "a keyless e-mail POST times out after SendGrid took it",
            f"{status} {headers.get('X-Egressd-Error')}, not resent: {sent} e-mail sent",
            status == 504 and sent == 1,
        )

    async def replay(self) -> Row:
        stripe = self.fakes["stripe"]
        key = str(uuid.uuid4())
        form = {"amount": "990", "currency": "eur", "payment_method": "pm_card_visa", "confirm": "true"}
        first = await self.call("POST", "/stripe/v1/payment_intents", headers=self.stripe_headers(key), data=form)
        second = await self.call("POST", "/stripe/v1/payment_intents", headers=self.stripe_headers(key), data=form)
        changed = await self.call(
            "POST", "/stripe/v1/payment_intents", headers=self.stripe_headers(key), data={**form, "amount": "991"}
        )
        reached = len([r for r in stripe.ledger.requests_to("/v1/payment_intents", "POST") if r.idempotency_key == key])
        ok = (
            first[0] == 200
            and second[0] == 200
            and second[1].get("Idempotent-Replayed") == "true"
            and first[2] == second[2]
            and changed[0] == 400  # Stripe's own answer to a reused key (plugins/stripe.py)
            and reached == 1
        )
        return Row(
            "idempotent replay",
            "the same key sent twice, then with another amount",
            f"repeat replayed by egressd (Idempotent-Replayed: {second[1].get('Idempotent-Replayed')}), "
            f"other amount {changed[0]}; Stripe saw {reached} request",
            ok,
        )

    async def fingerprint(self) -> Row:
        sendgrid = self.fakes["sendgrid"]
        before = sendgrid.ledger.count("mail.sent")
        mail = {**MAIL, "subject": "Receipt " + uuid.uuid4().hex[:6]}
        answers = [
            await self.call(
                "POST", "/sendgrid/v3/mail/send", headers={"Authorization": "Bearer " + SENDGRID_KEY}, json=mail
            )
            for _ in range(3)
        ]
        sent = sendgrid.ledger.count("mail.sent") - before
        return Row(
            "keyless dedupe",
            "the same e-mail sent three times (an SDK resending on its own)",
            f"answers {[a[0] for a in answers]}, {sent} e-mail sent",
            sent == 1 and all(a[0] == 202 for a in answers),
        )

    async def cache(self) -> Row:
        echo = self.fakes["echo"]
        before = len(echo.ledger.requests_to("/cache/"))
        first = await self.call("GET", "/catalog/cache/60")
        second = await self.call("GET", "/catalog/cache/60")
        reached = len(echo.ledger.requests_to("/cache/")) - before
        ok = first[1].get("X-Egressd-Cache") == "miss" and second[1].get("X-Egressd-Cache") == "hit" and reached == 1
        return Row(
            "cache",
            "the same GET twice",
            f"{first[1].get('X-Egressd-Cache')} then {second[1].get('X-Egressd-Cache')} "
            f"({second[3] * 1000:.1f} ms); upstream reached {reached}x",
            ok,
        )

    async def circuit(self) -> Row:
        echo = self.fakes["echo"]
        rule = echo.faults.status(503, path="/orders")
        codes = []
        for i in range(8):  # distinct queries: the catalog's cache must not answer for it
            status, headers, _, _ = await self.call("GET", f"/catalog/orders?try={i}")
            codes.append(headers.get("X-Egressd-Error") or str(status))
        opened = "circuit_open" in codes
        reached_open = len(echo.ledger.requests_to("/orders"))
        status, _, _, took = await self.call("GET", "/catalog/orders?try=fast")
        fast = status == 503 and len(echo.ledger.requests_to("/orders")) == reached_open
        echo.faults.remove(rule)
        await asyncio.sleep(0.55)  # open_for
        trials = [await self.call("GET", f"/catalog/orders?trial={i}") for i in range(3)]
        closed = all(t[0] == 200 for t in trials)
        state = (await self.server.status_data())["upstreams"]["catalog"].get("circuit")
        return Row(
            "circuit breaker",
            "the catalog answers 503 until it recovers",
            f"opened after {codes.index('circuit_open') if opened else '-'} failing calls (3 tries each), "
            f"then failed fast ({took * 1000:.1f} ms, upstream untouched); after open_for: "
            f"{[t[0] for t in trials]}, circuit {state}",
            opened and fast and closed and state == "closed",
        )

    async def queue(self) -> Row:
        echo = self.fakes["echo"]
        before = len(echo.ledger.requests_to("/burst"))
        began = time.monotonic()
        results = await asyncio.gather(*(self.call("GET", f"/throttled/burst?i={i}") for i in range(40)))
        took = time.monotonic() - began
        reached = len(echo.ledger.requests_to("/burst")) - before
        ok_count = sum(1 for r in results if r[0] == 200)
        rate = (reached - 1) / took if took > 0 else 0.0
        return Row(
            "rate limit queue",
            "40 calls at once to an upstream limited to 40/s",
            f"{ok_count}/40 succeeded, none refused, spread over {took:.2f} s ({rate:.1f}/s at the upstream)",
            ok_count == 40 and 0.8 <= took <= 2.0,
        )

    async def backpressure(self) -> Row:
        echo = self.fakes["echo"]
        echo.faults.too_many_requests(1, count=1, path="/quota")
        status, headers, _, took = await self.call("GET", "/catalog/quota")
        return Row(
            "upstream 429",
            "the upstream answers 429 with Retry-After: 1 once",
            f"{status} after {headers.get('X-Egressd-Attempts')} attempts, retried after {took:.2f} s",
            status == 200 and took >= 1.0,
        )


async def run_mechanisms(*, quiet: bool, out: Any) -> list[Row]:
    """Part 1: each resilience mechanism once, on its own fakes and egressd."""
    fakes = await start_fakes(("stripe", "paypal", "sendgrid", "mailgun", "echo"))
    server: EgressServer | None = None
    try:
        policies, changes = demo_policies(fakes)
        with tempfile.TemporaryDirectory(prefix="egressd-demo-") as tmp:
            (Path(tmp) / "demo.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
            server = EgressServer(
                Settings(policies=Path(tmp), listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=0.0)
            )
            await server.start()
            print("Part 1: resilience mechanisms, one at a time", file=out)
            print(
                f"  egressd listening on {server.addresses['main'][0]}:{server.addresses['main'][1]}, "
                f"admin on {server.addresses['admin'][0]}:{server.addresses['admin'][1]}",
                file=out,
            )
            for change in changes:
                print("  policy change for the demo: " + change, file=out)
            async with aiohttp.ClientSession() as session:
                demo = Demo(server, fakes, session)
                steps: list[Callable[[], Awaitable[Row]]] = [
                    demo.passthrough,
                    demo.retries,
                    demo.unsafe_timeout,
                    demo.replay,
                    demo.fingerprint,
                    demo.cache,
                    demo.circuit,
                    demo.queue,
                    demo.backpressure,
                ]
                rows: list[Row] = []
                for step in steps:
                    try:
                        row = await asyncio.wait_for(step(), timeout=15)
                    except Exception as exc:  # the demo reports, it does not crash
                        row = Row(step.__name__, "(step failed)", f"{type(exc).__name__}: {exc}", False)
                    rows.append(row)
                    if not quiet:
                        print(f"  {'ok ' if row.ok else 'BAD'}  {row.mechanism}", file=out)
            print_report(rows, out)
            return rows
    finally:
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()
        await stop_fakes(fakes)


async def run_demo(*, quiet: bool = False, out: Any = None, scale: float = 1.0, html: str | None = None) -> int:
    """Part 1 (each mechanism once), then part 2 (the Black-Friday simulation). 0: all good."""
    out = out or sys.stdout
    sc = Scenario.build(scale)  # ValueError for a bad scale, before anything starts
    logger = logging.getLogger("egressd")
    logger.setLevel(logging.ERROR)
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    began = time.monotonic()
    print("egressd demo: fake Stripe, PayPal, SendGrid, Mailgun and a generic API on 127.0.0.1", file=out)
    print("(no network, no secrets; every call stays on this machine)\n", file=out)
    rows = await run_mechanisms(quiet=quiet, out=out)

    examples = example_policies()
    if not quiet:
        print("\nRunning the Black-Friday simulation: the naive client straight to the fakes ...", file=out, flush=True)
    direct, _ = await run_once("direct", sc, examples)
    if not quiet:
        print(f"  done in {direct.wall:.1f} s; the same traffic through egressd ...", file=out, flush=True)
    through, changes = await run_once("egressd", sc, examples)
    if not quiet:
        print(f"  done in {through.wall:.1f} s", file=out)
    print_simulation(sc, direct, through, changes, out)

    sim_ok, why = verdict(through)
    mechanisms_ok = all(r.ok for r in rows)
    ok = sim_ok and mechanisms_ok
    if html:
        report = render_html(
            sc,
            direct,
            through,
            report_rows(sc, direct, through),
            [f"policy change for the simulation: {c}" for c in changes],
            [(r.mechanism, r.action, r.observed, r.ok) for r in rows],
            (ok, why + ("" if mechanisms_ok else "; a part-1 mechanism FAILED")),
            DEFINITIONS,
            result_json(sc, direct, through),
        )
        await asyncio.to_thread(Path(html).write_text, report, encoding="utf-8")
        print(f"\nHTML report written to {html}", file=out)
    print(
        f"\nVerdict: {'PASS' if ok else 'FAIL'}: {why}; part 1: "
        f"{sum(r.ok for r in rows)}/{len(rows)} mechanisms ok. Demo took {time.monotonic() - began:.1f} s",
        file=out,
    )
    return 0 if ok else 1


def print_report(rows: list[Row], out: Any) -> None:
    width = max(len(r.mechanism) for r in rows)
    print("\n" + "mechanism".ljust(width) + "  result  what we did -> what happened", file=out)
    print("-" * (width + 60), file=out)
    for row in rows:
        print(f"{row.mechanism.ljust(width)}  {'ok    ' if row.ok else 'FAILED'}  {row.action}", file=out)
        print(f"{' ' * width}          -> {row.observed}", file=out)
