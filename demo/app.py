"""The shop's webhook endpoints in the Black-Friday simulation (`demo.blackfriday`).

The shop fulfils orders from Stripe's `payment_intent.succeeded` webhook and keeps its mail
records from SendGrid's Event Webhook, as those providers tell their users to. It has two
endpoints, and only those two:

* `POST /webhooks/stripe`: `stripe.Webhook.construct_event(body, Stripe-Signature, secret)`;
* `POST /webhooks/sendgrid`: sendgrid's `EventWebhook(public_key).verify_signature(body,
  signature, timestamp)`.

A delivery the check refuses is answered 400 and counted as refused; a verified one 200,
and every event in it is recorded as delivered, raw: the app deduplicates nothing here,
so a provider's redelivery that reaches it shows as a second delivery of the same event.
Any other path (a PayPal or Mailgun webhook: the shop has no endpoint for them) is 404.

The shop runs in a process of its own (`ShopProcess`: `python -m demo.app`), as an app does:
its SDK checks then cost the simulation's event loop (the fakes and egressd) nothing.
`GET /__shop__/seen` gives what it got, as JSON.

The official SDKs are test dependencies of egressd, not runtime ones (`pip install .` does
not bring them), so when one is not installed the endpoint checks the same documented
scheme itself (providers.md 1.11: HMAC-SHA256 of "t.body", 300 s tolerance as the SDK;
4.8: ECDSA P-256 over timestamp + body) and `verifiers` says so.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

STRIPE_TOLERANCE = 300  # seconds: stripe-python's default for construct_event
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)  # where this `demo` package is importable from

Check = Callable[[bytes, str, str], bool]


def stripe_check(secret: str) -> tuple[str, Callable[[bytes, str], bool]]:
    """(what checks, check(body, Stripe-Signature)) for the shop's Stripe endpoint."""
    try:
        import stripe
    except ImportError:  # `pip install .` without the test extras

        def own(body: bytes, header: str) -> bool:
            parts = [p.strip().partition("=") for p in header.split(",")]
            stamps = [v for k, _, v in parts if k == "t"]
            sigs = [v for k, _, v in parts if k == "v1"]
            if len(stamps) != 1 or not stamps[0].isdigit() or not sigs:
                return False
            expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest()
            fresh = abs(time.time() - int(stamps[0])) <= STRIPE_TOLERANCE
            return fresh and any(hmac.compare_digest(expected, s) for s in sigs)

        return "the demo's own Stripe-Signature check (stripe-python is not installed)", own

    def sdk(body: bytes, header: str) -> bool:
        try:
            stripe.Webhook.construct_event(body.decode("utf-8"), header, secret, tolerance=STRIPE_TOLERANCE)
        except (stripe.SignatureVerificationError, ValueError):
            return False
        return True

    return f"stripe-python {stripe.VERSION} stripe.Webhook.construct_event", sdk


def sendgrid_check(public_key: str) -> tuple[str, Check]:
    """(what checks, check(body, signature, timestamp)) for the shop's SendGrid endpoint."""
    try:
        from sendgrid.helpers.eventwebhook import EventWebhook  # type: ignore[import-untyped]
    except ImportError:  # `pip install .` without the test extras
        key = serialization.load_der_public_key(base64.b64decode(public_key))
        assert isinstance(key, ec.EllipticCurvePublicKey)

        def own(body: bytes, signature: str, timestamp: str) -> bool:
            try:
                key.verify(base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
            except (InvalidSignature, ValueError):
                return False
            return True

        return "the demo's own Signed Event Webhook check (sendgrid is not installed)", own

    verifier = EventWebhook(public_key)

    def sdk(body: bytes, signature: str, timestamp: str) -> bool:
        try:
            return bool(verifier.verify_signature(body.decode("utf-8"), signature, timestamp))
        except ValueError:
            return False

    return "sendgrid EventWebhook.verify_signature", sdk


@dataclass
class StripeDelivery:
    event_id: str
    type: str
    payment_intent: str
    amount: int
    translated_from: str | None  # X-Egressd-Translated-From


@dataclass
class MailDelivery:
    event_id: str  # sg_event_id
    event: str
    email_id: int  # the shop's e-mail number (custom_args.email_id); -1 when absent
    translated_from: str | None


@dataclass
class ShopWebhooks:
    """What reached the shop's endpoints."""

    stripe: list[StripeDelivery] = field(default_factory=list)
    mail: list[MailDelivery] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)  # per endpoint: the check said no
    unknown: Counter[str] = field(default_factory=Counter)  # POSTs to paths the shop does not serve
    verifiers: dict[str, str] = field(default_factory=dict)

    def succeeded_per_payment(self) -> Counter[int]:
        """Verified `payment_intent.succeeded` deliveries per payment (amount 1000 + i cents)."""
        return Counter(d.amount - 1000 for d in self.stripe if d.type == "payment_intent.succeeded")

    def delivered_per_mail(self) -> Counter[int]:
        """Verified SendGrid `delivered` events per e-mail number."""
        return Counter(d.email_id for d in self.mail if d.event == "delivered")

    def to_json(self) -> dict[str, Any]:
        return {
            "stripe": [list(asdict(d).values()) for d in self.stripe],
            "mail": [list(asdict(d).values()) for d in self.mail],
            "refused": dict(self.refused),
            "unknown": dict(self.unknown),
            "verifiers": self.verifiers,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShopWebhooks:
        return cls(
            stripe=[StripeDelivery(*row) for row in data["stripe"]],
            mail=[MailDelivery(*row) for row in data["mail"]],
            refused=Counter(data["refused"]),
            unknown=Counter(data["unknown"]),
            verifiers=dict(data["verifiers"]),
        )


def _email_id(event: Any) -> int:
    try:
        return int(event.get("email_id", -1))
    except (TypeError, ValueError):
        return -1


class ShopApp:
    """The shop's webhook endpoints on 127.0.0.1 (see the module docstring)."""

    def __init__(self, stripe_secret: str, sendgrid_public_key: str) -> None:
        self.seen = ShopWebhooks()
        what, self._stripe_ok = stripe_check(stripe_secret)
        self.seen.verifiers["stripe"] = what
        what, self._sendgrid_ok = sendgrid_check(sendgrid_public_key)
        self.seen.verifiers["sendgrid"] = what
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> ShopApp:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/webhooks/stripe", self._stripe)
        app.router.add_post("/webhooks/sendgrid", self._sendgrid)
        app.router.add_get("/__shop__/seen", self._seen)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _stripe(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self._stripe_ok(body, request.headers.get("Stripe-Signature", "")):
            self.seen.refused["stripe"] += 1
            return web.Response(status=400, text="bad signature")
        event = json.loads(body)
        obj = (event.get("data") or {}).get("object") or {}
        self.seen.stripe.append(
            StripeDelivery(
                str(event.get("id")),
                str(event.get("type")),
                str(obj.get("id")),
                int(obj.get("amount") or 0),
                request.headers.get("X-Egressd-Translated-From"),
            )
        )
        return web.Response(text="ok")

    async def _sendgrid(self, request: web.Request) -> web.Response:
        body = await request.read()
        ok = self._sendgrid_ok(
            body,
            request.headers.get("X-Twilio-Email-Event-Webhook-Signature", ""),
            request.headers.get("X-Twilio-Email-Event-Webhook-Timestamp", ""),
        )
        if not ok:
            self.seen.refused["sendgrid"] += 1
            return web.Response(status=400, text="bad signature")
        translated = request.headers.get("X-Egressd-Translated-From")
        for event in json.loads(body):
            self.seen.mail.append(
                MailDelivery(str(event.get("sg_event_id")), str(event.get("event")), _email_id(event), translated)
            )
        return web.Response(text="ok")

    async def _seen(self, request: web.Request) -> web.Response:
        return web.json_response(self.seen.to_json())

    async def _other(self, request: web.Request) -> web.Response:
        await request.read()
        self.seen.unknown[request.path] += 1
        return web.Response(status=404, text="not found")


class ShopProcess:
    """The shop's endpoints in a child process (`python -m demo.app`), on 127.0.0.1."""

    def __init__(self, stripe_secret: str, sendgrid_public_key: str) -> None:
        self.args = ["--stripe-secret", stripe_secret, "--sendgrid-public-key", sendgrid_public_key]
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self, within: float = 30.0) -> ShopProcess:
        env = dict(os.environ)
        # This checkout's (or installation's) demo package, whatever the working directory.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "demo.app",
            *self.args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=within)
        except TimeoutError:
            line = b""
        self.url = line.decode().strip()
        if not self.url.startswith("http://127.0.0.1:"):
            await self.stop()
            raise RuntimeError(f"the demo shop did not start: {self.url or 'no answer'}")
        return self

    async def seen(self) -> ShopWebhooks:
        async with aiohttp.ClientSession(trust_env=False) as http:
            async with http.get(self.url + "/__shop__/seen", timeout=aiohttp.ClientTimeout(total=60)) as r:
                return ShopWebhooks.from_json(await r.json())

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def _serve(stripe_secret: str, sendgrid_public_key: str) -> int:
    shop = await ShopApp(stripe_secret, sendgrid_public_key).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(shop.url, flush=True)
    try:
        await stop.wait()
    finally:
        await shop.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.app", description="The demo shop's webhook endpoints.")
    parser.add_argument("--stripe-secret", required=True)
    parser.add_argument("--sendgrid-public-key", required=True)
    args = parser.parse_args(argv)
    return asyncio.run(_serve(args.stripe_secret, args.sendgrid_public_key))


if __name__ == "__main__":
    sys.exit(main())
