"""The app's webhook endpoints for bench/webhooks.py, as its own process (aiohttp, uvloop).

It verifies every delivery with the providers' official SDKs, as an app does:
`stripe.Webhook.construct_event(body, Stripe-Signature, secret)` on `POST /hooks/stripe`,
and sendgrid's `EventWebhook(public_key).verify_signature(...)` on `POST /hooks/sendgrid`
(the public key of egressd's `signing_key`: egressd signs what it delivers). For each
event of a verified delivery it appends one line to `--log`, *before* answering 200 (the
app "has" the event once the line is written):

    <provider> TAB <event id> TAB <X-Egressd-Webhook-Id> TAB <X-Egressd-Delivery-Attempt> TAB <unix time>

and `refused TAB <provider> TAB <why>` for a delivery the SDK refused (answered 400). The
log is opened with O_APPEND and written with one `write` per delivery, so it survives this
process being stopped and started again on the same port (the bench's "app down"). It
deduplicates nothing: counting what arrives is the point.

    python bench/webhook_app.py --port P --log FILE --stripe-secret whsec_... --sendgrid-public-key B64

Prints `listening on 127.0.0.1:P` when ready; SIGTERM stops accepting, lets the deliveries
in flight finish, and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from typing import Any

import stripe
from aiohttp import web
from sendgrid.helpers.eventwebhook import EventWebhook

stripe.enable_telemetry = False
SG_SIG = "X-Twilio-Email-Event-Webhook-Signature"
SG_TS = "X-Twilio-Email-Event-Webhook-Timestamp"


class Endpoints:
    def __init__(self, log_path: str, stripe_secret: str, sendgrid_public_key: str) -> None:
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.stripe_secret = stripe_secret
        self.sendgrid = EventWebhook(sendgrid_public_key)

    def _write(self, lines: list[str]) -> None:
        os.write(self.fd, "".join(lines).encode())

    def _lines(self, provider: str, ids: list[str], request: web.Request) -> list[str]:
        hook = request.headers.get("X-Egressd-Webhook-Id", "-")
        attempt = request.headers.get("X-Egressd-Delivery-Attempt", "-")
        now = f"{time.time():.6f}"
        return [f"{provider}\t{i}\t{hook}\t{attempt}\t{now}\n" for i in ids]

    def _refused(self, provider: str, why: str) -> web.Response:
        self._write([f"refused\t{provider}\t{why}\n"])
        return web.Response(status=400, text=why)

    async def stripe_hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event: Any = stripe.Webhook.construct_event(
                body.decode(), request.headers.get("Stripe-Signature", ""), self.stripe_secret
            )
        except Exception as exc:  # the SDK refused it
            return self._refused("stripe", type(exc).__name__)
        self._write(self._lines("stripe", [str(event["id"])], request))
        return web.Response(text="ok")

    async def sendgrid_hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            ok = self.sendgrid.verify_signature(
                body.decode(), request.headers.get(SG_SIG, ""), request.headers.get(SG_TS, "")
            )
        except Exception as exc:
            return self._refused("sendgrid", type(exc).__name__)
        if not ok:
            return self._refused("sendgrid", "bad_signature")
        ids = [str(e["sg_event_id"]) for e in json.loads(body)]
        self._write(self._lines("sendgrid", ids, request))
        return web.Response(text="ok")


async def serve(args: argparse.Namespace) -> None:
    ep = Endpoints(args.log, args.stripe_secret, args.sendgrid_public_key)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/hooks/stripe", ep.stripe_hook)
    app.router.add_post("/hooks/sendgrid", ep.sendgrid_hook)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    await stop.wait()
    await runner.cleanup()  # stops accepting, lets handlers in flight answer
    os.close(ep.fd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--stripe-secret", required=True)
    parser.add_argument("--sendgrid-public-key", required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
