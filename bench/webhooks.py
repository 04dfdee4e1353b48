#!/usr/bin/env python
"""Inbound webhooks (issue 15's targets; docs/performance.md, "Webhooks"): how fast egressd
verifies, stores and answers a provider, and whether every event reaches the app exactly
once through an app outage, a kill -9 and the provider's redeliveries.

    python bench/webhooks.py                   # both parts at the issue's sizes, about 4.5 minutes
    python bench/webhooks.py --quick           # smaller sizes, under a minute
    python bench/webhooks.py --only latency    # or --only fault
    python bench/webhooks.py --json out.json   # the figures as JSON too

Parties, all on 127.0.0.1, each its own process: egressd as a real `python -m proxy run
--data-dir DIR --webhook-listen ...` (the tests' restartable `Egressd`; the data dir is a
fresh directory under the system temp dir, on local disk: the file system is printed),
with two upstreams whose `webhooks` blocks deliver to the app:

    stripe:   {deliver_to: APP/hooks/stripe, secret: whsec_..., tolerance: 5m}
    sendgrid: {deliver_to: APP/hooks/sendgrid, public_key: <SendGrid's>, signing_key: <egressd's>}

the app (bench/webhook_app.py), which verifies every delivery with the official SDKs
(`stripe.Webhook.construct_event`; sendgrid's `EventWebhook` with egressd's public key, the
recommended setup of docs/webhooks.md) and logs each event id it accepted before answering
200; and the "provider", this script, which signs events as Stripe (`Stripe-Signature`,
HMAC-SHA256 over `t.body`) and SendGrid (ECDSA P-256 over timestamp + body) do.

1. Latency. One egressd serves both upstreams; its data dir first gets `--prefill`
   delivered entries (and their ids) per upstream, what about 8 minutes at 200/s leave
   behind (egressd keeps delivered entries a day): a run from an empty store would hide
   any cost that grows with it. An open-loop paced sender POSTs `--rate` POSTs/s, on
   keep-alive connections, to three targets in turn: a baseline (bench/upstream.py,
   aiohttp + uvloop, reads the body and answers 200: what this machine gives any endpoint
   at this load), egressd's Stripe path (one `payment_intent.succeeded`, ~1.1 KB,
   pretty-printed like Stripe's, per POST) and its SendGrid path (a signed batch of
   `--batch` events per POST: the ECDSA verify, the expensive one, runs `--rate` times a
   second and the events/s are `--batch` times the target's). After `--warmup` s per
   target (not counted), `--rounds` segments of `--seconds / --rounds` s each, the order
   rotating, so that a burst of other work on the machine lands on all three alike. Each
   POST is signed just before the run. A POST's latency is counted from its *scheduled*
   send time to the end of the answer (no coordinated omission: a stall of the sender or
   of egressd shows). Reported: p50 / p99 / max, the rate answered 200, the target
   process's CPU (utime+stime) per POST, how late the sender itself was (p99), the
   machine's CPU pressure (Linux PSI: the share of the time some task waited for a CPU;
   on a 2-CPU machine shared with other work it sets much of the tail), and the
   time from the provider's 200 to the app having the event (p50 / p99; egressd delivers
   in the background during the run). The app must get every event once. `--nice -10`
   (root) runs the event loops of egressd, the baseline and the sender ahead of the
   machine's other work (the app stays at 0): a diagnosis of what is egressd's own and
   what is waiting for a CPU, as on a quiet machine; the default measures the machine as
   it is.
2. Fault run (Stripe events at `--fault-rate`/s and SendGrid batches at a fifth of it, for
   `--fault-seconds`): the app's endpoint process is stopped (connection refused) from
   `--down-at` for `--down-for` s, then started again; egressd is killed with SIGKILL
   `--kill-after` s after the app is back, at the first moment the app's log grew within
   2 ms (while the backlog is being delivered: deliveries in flight, the worst case for
   at-least-once delivery), and started again on the same data dir. The provider POSTs
   every genuine event three times (the original, a redelivery racing it 0-200 ms later,
   and one 2-6 s (quick) or 5-15 s later), the same bytes and signature each time, as
   providers resend; a POST that gets no
   answer (egressd down) or a 5xx is resent every 0.5 s, as providers retry. One slot in
   `--forge-every` carries a forged POST instead, in turn: signed with the wrong key, an old
   timestamp (10 min, correctly signed), a tampered body (signed, then changed) and
   unsigned. The app's log then says, per event id: delivered once, more than once (and
   whether the copies were one stored entry delivered again - same `X-Egressd-Webhook-Id`,
   egressd's documented at-least-once - or a provider redelivery stored twice, a dedupe
   failure), or missing; and whether any forged event got through.

PASS lines: latency p99 <= 10 ms at the rate with every POST answered 200 and the rate
achieved (per provider); every genuine event delivered; delivered exactly once (a repeat
with the same egressd id is reported as such but still fails "exactly once"); no provider
redelivery stored twice; 0 forged events delivered; every forged POST answered 400; every
genuine POST answered 200; the SDKs refused no delivery. Exit status 1 when any FAILs.
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
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from tests.egressd_process import Egressd  # noqa: E402  (the tests' restartable `egressd run`)
from tests.redis_server import free_port  # noqa: E402

WHSEC = "whsec_bench_webhooks_0123456789abcdef"
FORGER_WHSEC = "whsec_not_the_endpoints_secret_000"
SG_SIG = "X-Twilio-Email-Event-Webhook-Signature"
SG_TS = "X-Twilio-Email-Event-Webhook-Timestamp"
FORGERIES = ("bad_signature", "old_timestamp", "tampered", "unsigned")
P99_TARGET_MS = 10.0


# -- the providers ---------------------------------------------------------------------------


@dataclass
class Post:
    """One POST the provider makes (a genuine event or batch, or a forgery)."""

    provider: str
    body: bytes
    headers: dict[str, str]
    ids: list[str]  # the event ids it carries
    forged: str | None = None  # which forgery, or None


def p256() -> tuple[ec.EllipticCurvePrivateKey, str, str]:
    """(key, public key as SendGrid shows it: base64 DER, private key as PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return key, base64.b64encode(der).decode(), pem


class Stripe:
    name = "stripe"

    def event(self, event_id: str, n: int) -> bytes:
        """A `payment_intent.succeeded` event shaped like Stripe's (pretty-printed, ~1.1 KB)."""
        pi = f"pi_3Bench{n:010d}"
        event = {
            "id": event_id,
            "object": "event",
            "api_version": "2026-06-24.dahlia",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": pi,
                    "object": "payment_intent",
                    "amount": 2000,
                    "amount_capturable": 0,
                    "amount_received": 2000,
                    "capture_method": "automatic",
                    "client_secret": f"{pi}_secret_bench",
                    "confirmation_method": "automatic",
                    "created": int(time.time()) - 3,
                    "currency": "usd",
                    "customer": f"cus_Bench{n % 1000:04d}",
                    "description": f"Order #{n}",
                    "latest_charge": f"ch_3Bench{n:010d}",
                    "livemode": False,
                    "metadata": {"order_id": str(n), "shop": "bench"},
                    "payment_method": f"pm_1Bench{n:010d}",
                    "payment_method_types": ["card"],
                    "receipt_email": f"customer{n}@example.org",
                    "status": "succeeded",
                }
            },
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": f"req_Bench{n:08d}", "idempotency_key": f"order-{n}"},
            "type": "payment_intent.succeeded",
        }
        return json.dumps(event, indent=2).encode()

    def sign(self, body: bytes, t: int, secret: str = WHSEC) -> dict[str, str]:
        sig = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
        return {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json; charset=utf-8"}

    def genuine(self, n: int) -> Post:
        event_id = f"evt_bench_{n:08d}"
        body = self.event(event_id, n)
        return Post(self.name, body, self.sign(body, int(time.time())), [event_id])

    def forged(self, n: int, kind: str) -> Post:
        event_id = f"evt_forged_{kind}_{n:08d}"
        body = self.event(event_id, n)
        now = int(time.time())
        if kind == "bad_signature":
            headers = self.sign(body, now, FORGER_WHSEC)
        elif kind == "old_timestamp":
            headers = self.sign(body, now - 600)
        elif kind == "tampered":
            headers = self.sign(body, now)
            body = body.replace(b'"amount": 2000', b'"amount": 200000', 1)
        else:
            headers = {"Content-Type": "application/json; charset=utf-8"}
        return Post(self.name, body, headers, [event_id], forged=kind)


class SendGrid:
    name = "sendgrid"

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.key, self.public_key, _ = p256()  # SendGrid's own key pair
        self.forger, _, _ = p256()
        self.egressd_key, self.egressd_public, self.egressd_pem = p256()  # egressd's signing_key

    def events(self, ids: Sequence[str], n: int) -> bytes:
        now = int(time.time())
        items = [
            {
                "email": f"customer{n}@example.org",
                "timestamp": now,
                "smtp-id": f"<bench{n}.{k}@example.com>",
                "event": "delivered",
                "category": ["order"],
                "sg_event_id": event_id,
                "sg_message_id": f"BenchMsg{n:08d}.filter0001.{k}.0",
                "response": "250 OK",
                "order_id": str(n),
            }
            for k, event_id in enumerate(ids)
        ]
        return json.dumps(items, indent=1).encode()

    def sign(self, body: bytes, t: int, key: ec.EllipticCurvePrivateKey | None = None) -> dict[str, str]:
        stamp = str(t)
        sig = (key or self.key).sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {SG_SIG: base64.b64encode(sig).decode(), SG_TS: stamp, "Content-Type": "application/json"}

    def genuine(self, n: int) -> Post:
        ids = [f"sg_bench_{n:08d}_{k}" for k in range(self.batch)]
        body = self.events(ids, n)
        return Post(self.name, body, self.sign(body, int(time.time())), ids)

    def forged(self, n: int, kind: str) -> Post:
        ids = [f"sg_forged_{kind}_{n:08d}_{k}" for k in range(self.batch)]
        body = self.events(ids, n)
        now = int(time.time())
        if kind == "bad_signature":
            headers = self.sign(body, now, self.forger)
        elif kind == "old_timestamp":
            headers = self.sign(body, now - 600)
        elif kind == "tampered":
            headers = self.sign(body, now)
            body = body.replace(b'"250 OK"', b'"550 NO"', 1)
        else:
            headers = {"Content-Type": "application/json"}
        return Post(self.name, body, headers, ids, forged=kind)


# -- the parties -----------------------------------------------------------------------------


class App:
    """bench/webhook_app.py as a process, stoppable and startable on the same port."""

    def __init__(self, work: Path, sendgrid_public_key: str) -> None:
        self.port = free_port()
        self.log = work / "app.log"
        self.stderr = work / "app.stderr"
        self.key = sendgrid_public_key
        self.proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, str(REPO / "bench" / "webhook_app.py"), "--port", str(self.port)]
        cmd += ["--log", str(self.log), "--stripe-secret", WHSEC, "--sendgrid-public-key", self.key]
        with open(self.stderr, "a") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            raise RuntimeError(f"the app did not start: {line!r} {self.stderr.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def lines(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split("\t") for line in self.log.read_text().splitlines() if line]


def policies(work: Path, app: App, sg: SendGrid) -> Path:
    directory = work / "policies"
    directory.mkdir(exist_ok=True)
    docs = [
        {
            "upstream": "stripe",
            "target": "http://127.0.0.1:9",  # never called: only the webhook listener is used
            "provider": "stripe",
            "webhooks": {"deliver_to": f"{app.url}/hooks/stripe", "secret": WHSEC, "tolerance": "5m"},
        },
        {
            "upstream": "sendgrid",
            "target": "http://127.0.0.1:9",
            "provider": "sendgrid",
            "webhooks": {
                "deliver_to": f"{app.url}/hooks/sendgrid",
                "public_key": sg.public_key,
                "signing_key": sg.egressd_pem,
                "tolerance": "5m",
            },
        },
    ]
    (directory / "webhooks.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return directory


def prefill(data: Path, upstream: str, n: int) -> None:
    """Put `n` delivered entries of `upstream` (and their event ids) in a new data dir, as
    `n` events delivered within the last day leave them (`KEEP_DONE`: kept, without their
    body, for a day; the ids for `dedupe_for`): the store egressd meets in steady state."""
    if n <= 0:
        return
    from proxy.state.sqlite import DB_NAME, open_database
    from proxy.webhooks.sqlite_store import _COLUMNS, ROW_SHAPE
    from proxy.webhooks.store import encode_headers

    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = open_database(data / DB_NAME)
    now = time.time()
    headers = encode_headers(
        [("Content-Type", "application/json; charset=utf-8"), ("Stripe-Signature", f"t={int(now)},v1={'0' * 64}")]
    )
    marks = ",".join("?" * 16)
    try:
        for start in range(0, n, 20_000):
            rows, ids = [], []
            for i in range(start, min(n, start + 20_000)):
                at = now - 3600 * (n - i) / n  # received over the last hour
                entry, event = f"wh_prefill_{upstream}_{i:014x}", f"evt_prefill_{i:08d}"
                rows.append(
                    (entry, upstream, "delivered", at, at, at + 3 * 86400, at + 0.01, 1, "", json.dumps([event]),
                     '["payment_intent.succeeded"]', headers, b"", '["own"]', "", ROW_SHAPE)
                )  # fmt: skip
                ids.append((upstream, event, entry, at + 7 * 86400))
            db.execute("BEGIN")
            db.executemany(f"INSERT INTO webhook_events ({_COLUMNS}) VALUES ({marks})", rows)
            db.executemany("INSERT INTO webhook_ids (upstream, event_id, entry, until) VALUES (?, ?, ?, ?)", ids)
            db.execute("COMMIT")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def start_egressd(work: Path, app: App, sg: SendGrid) -> tuple[Egressd, str]:
    hook_port = free_port()
    proc = Egressd(
        policies(work, app, sg), drain=2.0, data_dir=work / "data", args=["--webhook-listen", f"127.0.0.1:{hook_port}"]
    )
    proc.start()
    return proc, f"http://127.0.0.1:{hook_port}"


def cpu_pressure() -> float | None:
    """Seconds some task on this machine waited for a CPU (Linux PSI, `some` total)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path("/proc/pressure/cpu").read_text().split("total=", 1)[1].split()[0]) / 1e6
    return None


def pressure_share(start: float | None, end: float | None, seconds: float) -> float:
    """The share of `seconds` during which some task waited for a CPU (nan without PSI)."""
    if start is None or end is None or seconds <= 0:
        return float("nan")
    return (end - start) / seconds


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def status_json(proc: Egressd) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.admin}/status.json", timeout=5) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data
    return {}


def webhook_status(proc: Egressd) -> dict[str, Any]:
    ups = status_json(proc).get("upstreams", {})
    return {name: (u.get("webhooks") or {}) for name, u in ups.items() if u.get("webhooks")}


async def wait_until(check: Callable[[], bool], within: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(every)
    return check()


def session(limit: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=10), trust_env=False
    )


# -- 1. latency --------------------------------------------------------------------------------


@dataclass
class Sent:
    scheduled: float  # loop time the POST was due
    lag: float = 0.0  # how late the sender started it
    latency: float = float("nan")  # scheduled -> answer read
    answered_wall: float = 0.0  # wall time of the answer
    status: int = 0
    error: str = ""


async def paced(http: aiohttp.ClientSession, url: str, posts: Sequence[Post], rate: float) -> list[Sent]:
    """Open loop: POST i is due at t0 + i / rate whatever the answers do."""
    loop = asyncio.get_running_loop()
    out = [Sent(0.0) for _ in posts]

    async def one(i: int, post: Post, due: float) -> None:
        rec = out[i]
        rec.scheduled = due
        rec.lag = loop.time() - due
        try:
            async with http.post(url, data=post.body, headers=post.headers) as r:
                await r.read()
                rec.status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            rec.error = type(exc).__name__
        rec.latency = loop.time() - due
        rec.answered_wall = time.time()

    tasks = []
    t0 = loop.time() + 0.05
    for i, post in enumerate(posts):
        due = t0 + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, post, due)))
    await asyncio.gather(*tasks)
    return out


class Baseline:
    """bench/upstream.py (aiohttp + uvloop) as its own process: `POST .../sink` reads the body
    and answers 200, nothing else. The floor the machine gives any endpoint at this load."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        cmd = [sys.executable, str(REPO / "bench" / "upstream.py"), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        if "listening" not in line:
            raise RuntimeError(f"bench/upstream.py did not start: {line!r}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Target:
    """One row of the latency table: where the paced POSTs go, and what they got."""

    name: str
    url: str
    pid: int
    posts: list[Post]  # the warm-up's first
    warm: int
    sent: list[Sent] = field(default_factory=list)  # measured ones
    measured_posts: list[Post] = field(default_factory=list)
    span: float = 0.0  # seconds from the first due time to the last answer, summed over segments
    seconds: float = 0.0  # wall seconds measured
    cpu: float = 0.0  # the target process's CPU seconds over them
    pressure: float = 0.0  # PSI seconds over them
    taken: int = 0


async def latency(sg: SendGrid, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Baseline, Stripe and SendGrid in `--rounds` alternating segments (the order rotating),
    so that a burst of other work on the machine lands on all three alike."""
    work = Path(tempfile.mkdtemp(prefix="egressd-bench-webhooks-latency-"))
    stripe = Stripe()
    app, base = App(work, sg.egressd_public), Baseline()
    app.start()
    base.start()
    proc: Egressd | None = None
    try:
        for upstream in ("stripe", "sendgrid"):
            prefill(work / "data", upstream, args.prefill)
        proc, hooks = start_egressd(work, app, sg)
        assert proc.proc is not None and base.proc is not None
        if args.nice:  # the event loops of the targets and of the sender (this thread), not the app
            for pid in (proc.proc.pid, base.proc.pid, 0):
                os.setpriority(os.PRIO_PROCESS, pid, args.nice)
        warm = int(args.rate * args.warmup)
        per_round = int(args.rate * args.seconds / args.rounds)
        total = warm + per_round * args.rounds
        # Signed now: the whole run is well within the 5 minutes' tolerance.
        targets = [
            Target("baseline", f"http://127.0.0.1:{base.port}/stripe/sink", base.proc.pid,
                   [stripe.genuine(50_000_000 + n) for n in range(total)], warm),
            Target("stripe", f"{hooks}/stripe", proc.proc.pid, [stripe.genuine(n) for n in range(total)], warm),
            Target("sendgrid", f"{hooks}/sendgrid", proc.proc.pid, [sg.genuine(n) for n in range(total)], warm),
        ]  # fmt: skip
        sessions = {t.name: session(256) for t in targets}
        try:
            for t in targets:  # warm-up: connections, caches; not counted
                await paced(sessions[t.name], t.url, t.posts[: t.warm], args.rate)
                t.taken = t.warm
            for r in range(args.rounds):
                for t in targets[r % 3 :] + targets[: r % 3]:
                    chunk = t.posts[t.taken : t.taken + per_round]
                    t.taken += len(chunk)
                    c0, p0, w0 = cpu_seconds(t.pid), cpu_pressure(), time.monotonic()
                    sent = await paced(sessions[t.name], t.url, chunk, args.rate)
                    c1, p1, w1 = cpu_seconds(t.pid), cpu_pressure(), time.monotonic()
                    t.cpu, t.seconds = t.cpu + c1 - c0, t.seconds + w1 - w0
                    t.pressure += (p1 - p0) if p0 is not None and p1 is not None else float("nan")
                    t.span += max(x.scheduled + x.latency for x in sent) - sent[0].scheduled
                    t.sent += sent
                    t.measured_posts += chunk
        finally:
            for http in sessions.values():
                await http.close()
        rows = [await latency_figures(t, app, args) for t in targets]
        for row in rows:
            row["fs"] = filesystem(work)
        return rows
    finally:
        if args.nice:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        if proc is not None:
            proc.stop()
            (work / "egressd.log").write_bytes(proc.log_path.read_bytes())
            proc.log_path.unlink(missing_ok=True)  # kept in the work dir (--keep) instead
        app.stop()
        base.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


async def latency_figures(t: Target, app: App, args: argparse.Namespace) -> dict[str, Any]:
    measured = t.sent
    ok = [s for s in measured if s.status == 200]
    lat = [s.latency * 1000 for s in ok]
    row: dict[str, Any] = {
        "target": t.name,
        "posts": len(measured),
        "events_per_post": len(t.posts[0].ids),
        "body_bytes": len(t.posts[0].body),
        "rate": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "answered_200": len(ok),
        "statuses": dict(Counter(s.status or s.error for s in measured)),
        "achieved_rate": len(ok) / t.span if t.span > 0 else float("nan"),
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "sender_lag_p99_ms": pct([s.lag * 1000 for s in measured], 0.99),
        "p99_from_send_ms": pct([(s.latency - s.lag) * 1000 for s in ok], 0.99),
        "cpu_ms_per_post": t.cpu * 1000 / max(len(measured), 1),
        "cpu_share": t.cpu / max(t.seconds, 1e-9),
        "cpu_pressure": t.pressure / max(t.seconds, 1e-9),
        "prefilled": args.prefill,
    }
    if t.name == "baseline":
        return row
    expected = {i for p in t.posts for i in p.ids}

    def at_app() -> set[str]:
        return {line[1] for line in app.lines() if line[0] == t.name}

    await wait_until(lambda: len(at_app()) >= len(expected), 30)
    await asyncio.sleep(1.0)  # a second copy would show up now
    lines = [line for line in app.lines() if line[0] == t.name]
    seen = Counter(line[1] for line in lines)
    first_at: dict[str, float] = {}
    for line in lines:
        first_at.setdefault(line[1], float(line[4]))
    answered = {i: s.answered_wall for p, s in zip(t.measured_posts, measured, strict=True) for i in p.ids}
    to_app = [(first_at[i] - answered[i]) * 1000 for i in answered if i in first_at]
    row.update(
        events_expected=len(expected),
        events_at_app=len(seen),
        events_twice_at_app=sum(1 for c in seen.values() if c > 1),
        to_app_p50_ms=pct(to_app, 0.50),
        to_app_p99_ms=pct(to_app, 0.99),
        app_refused=sum(1 for line in app.lines() if line[0] == "refused"),
    )
    return row


# -- 2. the fault run --------------------------------------------------------------------------


@dataclass
class Delivery:
    """What the provider got for one POST copy, after its own resends."""

    post: Post
    copy: int  # 0 original, 1 the racing redelivery, 2 the late one
    status: int = 0
    reason: str = ""
    tries: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def provider_send(http: aiohttp.ClientSession, url: str, d: Delivery, give_up: float) -> None:
    """POST, resending on no answer or a 5xx every 0.5 s (as a provider retries) until `give_up`."""
    while True:
        d.tries += 1
        try:
            async with http.post(url, data=d.post.body, headers=d.post.headers) as r:
                text = (await r.text()).strip()
                if r.status < 500:
                    d.status, d.reason = r.status, text
                    return
                d.errors[f"HTTP {r.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            d.errors[type(exc).__name__] += 1
        if time.monotonic() > give_up:
            return
        await asyncio.sleep(0.5)


async def fault_run(sg: SendGrid, args: argparse.Namespace) -> dict[str, Any]:
    stripe = Stripe()
    work = Path(tempfile.mkdtemp(prefix="egressd-bench-webhooks-fault-"))
    app = App(work, sg.egressd_public)
    app.start()
    proc: Egressd | None = None
    rnd = random.Random(15)
    late = (2.0, 6.0) if args.quick else (5.0, 15.0)
    timeline: dict[str, float] = {}
    try:
        proc, hooks = start_egressd(work, app, sg)
        # The schedule: (offset s, delivery). Stripe slots at fault_rate, SendGrid at a fifth.
        plan: list[tuple[float, Delivery]] = []
        forged = 0
        for prov, rate in ((stripe, args.fault_rate), (sg, args.fault_rate / 5)):
            for n in range(int(rate * args.fault_seconds)):
                at = n / rate
                if n % args.forge_every == args.forge_every - 1:
                    kind = FORGERIES[(n // args.forge_every) % len(FORGERIES)]
                    plan.append((at, Delivery(prov.forged(n, kind), 0)))
                    forged += 1
                    continue
                post = prov.genuine(n)
                plan.append((at, Delivery(post, 0)))
                plan.append((at + rnd.uniform(0.0, 0.2), Delivery(post, 1)))
                plan.append((at + rnd.uniform(*late), Delivery(post, 2)))
        plan.sort(key=lambda x: x[0])
        genuine_ids = {(d.post.provider, i) for _, d in plan if d.post.forged is None for i in d.post.ids}
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.2
        wall0 = time.time() + 0.2
        psi_start = cpu_pressure()

        async def faults() -> None:
            await asyncio.sleep(max(0.0, t0 + args.down_at - loop.time()))
            timeline["app_down"] = time.time() - wall0
            await asyncio.to_thread(app.stop)
            await asyncio.sleep(max(0.0, t0 + args.down_at + args.down_for - loop.time()))
            await asyncio.to_thread(app.start)
            timeline["app_up"] = time.time() - wall0
            await asyncio.sleep(args.kill_after)
            # Kill while deliveries stream in: the app's log grew within the last 2 ms.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                before = app.log.stat().st_size
                await asyncio.sleep(0.002)
                if app.log.stat().st_size > before:
                    break
            assert proc is not None
            timeline["kill_wall"] = time.time()
            timeline["kill"] = timeline["kill_wall"] - wall0
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait)
            await asyncio.to_thread(proc.start)
            timeline["restarted"] = time.time() - wall0

        async with session(512) as http:
            fault_task = asyncio.create_task(faults())
            tasks = []
            give_up = time.monotonic() + args.fault_seconds + late[1] + 120
            for at, d in plan:
                delay = t0 + at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                url = f"{hooks}/{d.post.provider}"
                tasks.append(asyncio.create_task(provider_send(http, url, d, give_up)))
            await asyncio.gather(*tasks)
            await fault_task
        timeline["sent"] = time.time() - wall0
        pressure = pressure_share(psi_start, cpu_pressure(), time.time() - wall0)

        def all_there() -> bool:
            return genuine_ids <= {(line[0], line[1]) for line in app.lines() if line[0] != "refused"}

        await wait_until(all_there, args.drain_deadline, every=0.5)
        timeline["all_delivered"] = time.time() - wall0 if all_there() else float("nan")
        await asyncio.sleep(3.0)  # a late second copy would show up now
        status = webhook_status(proc)
        db = sqlite_states(work / "data")
    finally:
        if proc is not None:
            proc.stop()
            (work / "egressd.log").write_bytes(proc.log_path.read_bytes())
            proc.log_path.unlink(missing_ok=True)  # kept in the work dir (--keep) instead
        app.stop()

    lines = app.lines()
    refused = [line for line in lines if line[0] == "refused"]
    got = [line for line in lines if line[0] != "refused"]
    copies: dict[tuple[str, str], list[list[str]]] = {}
    for line in got:
        copies.setdefault((line[0], line[1]), []).append(line)
    genuine_seen = {k: v for k, v in copies.items() if k in genuine_ids}
    forged_seen = {k: v for k, v in copies.items() if k not in genuine_ids}
    repeats = {k: v for k, v in genuine_seen.items() if len(v) > 1}
    same_entry = {k: v for k, v in repeats.items() if len({c[2] for c in v}) == 1}
    kill_wall = timeline.get("kill_wall", 0.0)
    repeat_detail = [
        {
            "event": f"{k[0]}:{k[1]}",
            "webhook_ids": sorted({c[2] for c in v}),
            "attempts": [c[3] for c in v],
            "ms_from_kill": [round((float(c[4]) - kill_wall) * 1000, 1) for c in v],
        }
        for k, v in sorted(repeats.items())
    ][:50]
    deliveries = [d for _, d in plan]
    genuine_posts = [d for d in deliveries if d.post.forged is None]
    forged_posts = [d for d in deliveries if d.post.forged is not None]
    by_kind: dict[str, Counter[str]] = {}
    for d in forged_posts:
        key = f"{d.post.provider} {d.post.forged}"
        by_kind.setdefault(key, Counter())[f"{d.status} {d.reason}" if d.status else "no answer"] += 1
    errors: Counter[str] = Counter()
    for d in deliveries:
        errors.update(d.errors)
    rows = {
        "stripe_events": sum(1 for p in genuine_ids if p[0] == "stripe"),
        "sendgrid_events": sum(1 for p in genuine_ids if p[0] == "sendgrid"),
        "genuine_posts": len(genuine_posts),
        "genuine_answers": dict(Counter(f"{d.status} {d.reason}" if d.status else "no answer" for d in genuine_posts)),
        "forged_posts": len(forged_posts),
        "forged_answers": {k: dict(v) for k, v in sorted(by_kind.items())},
        "resends_after_no_answer_or_5xx": sum(d.tries - 1 for d in deliveries),
        "provider_errors": dict(errors),
        "delivered_once": sum(1 for v in genuine_seen.values() if len(v) == 1),
        "delivered_more_than_once": len(repeats),
        "repeats_same_egressd_id": len(same_entry),
        "repeats_different_egressd_ids": len(repeats) - len(same_entry),
        "missing": len(genuine_ids) - len(genuine_seen),
        "forged_delivered": len(forged_seen),
        "app_refused": len(refused),
        "redelivered_attempts": sum(1 for line in got if line[3] not in ("1", "-")),
        "app_events_in_the_second_before_the_kill": sum(1 for line in got if 0 <= kill_wall - float(line[4]) <= 1.0),
        "app_events_in_the_50_ms_around_the_kill": sum(1 for line in got if abs(kill_wall - float(line[4])) <= 0.025),
        "repeat_detail": repeat_detail,
        "repeat_first_copy_ms_from_kill": sorted(r["ms_from_kill"][0] for r in repeat_detail),
        "timeline_s": {k: round(v, 2) for k, v in timeline.items() if k != "kill_wall"},
        "cpu_pressure": pressure,
        "egressd_status_after": status,
        "store_states_after": db,
        "fs": filesystem(work),
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        rows["work_dir"] = str(work)
    return rows


def sqlite_states(data: Path) -> dict[str, int]:
    """Entries per state in the data dir's webhook table (read after the run, read only)."""
    with contextlib.suppress(sqlite3.Error):
        db = sqlite3.connect(f"file:{data / 'egressd.db'}?mode=ro", uri=True)
        try:
            return {str(s): int(n) for s, n in db.execute("SELECT state, COUNT(*) FROM webhook_events GROUP BY state")}
        finally:
            db.close()
    return {}


# -- report ------------------------------------------------------------------------------------


def filesystem(path: Path) -> str:
    """The file system type of the mount holding `path` (from /proc/mounts)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    return kind


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "sqlite": sqlite3.sqlite_version,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
    }


def render(fig: dict[str, Any], args: argparse.Namespace) -> str:
    m = fig["machine"]
    out = [
        f"# bench/webhooks.py{' --quick' if args.quick else ''}: {m['date']}, {m['cpus']} CPUs ({m['cpu']}), "
        f"Linux {m['kernel']}, Python {m['python']}, aiohttp {m['aiohttp']}, SQLite {m['sqlite']}, "
        f"load average {m['load_avg']} at start, {fig.get('load_avg_end')} at end",
        "",
    ]
    if fig.get("latency"):
        fs = fig["latency"][0]["fs"]
        out += [
            f"Verification + durable store + 200, open loop at {args.rate:g} POSTs/s: {args.rounds} rounds of "
            f"{args.seconds / args.rounds:g} s per target, alternating (after {args.warmup:g} s of warm-up each); "
            f"data dir on {fs}, holding {args.prefill} delivered entries per upstream before the run"
            + (f"; egressd, baseline and sender at nice {args.nice}, the app at 0" if args.nice else "")
            + ":",
            "",
            "| target | POSTs (events each, bytes) | answered 200 | achieved /s | p50 ms | p99 ms | max ms "
            "| p99 from the actual send ms | sender lag p99 ms | CPU ms/POST (share of a CPU) | CPU pressure "
            "| 200 -> app p50 / p99 ms | at the app once |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        labels = {
            "baseline": "baseline: bench/upstream.py, reads the body, answers 200",
            "stripe": "egressd: Stripe event (HMAC-SHA256)",
            "sendgrid": f"egressd: SendGrid batch of {args.batch} (ECDSA P-256)",
        }
        for r in fig["latency"]:
            app_cells = "- | -"
            if "events_expected" in r:
                once = r["events_at_app"] - r["events_twice_at_app"]
                app_cells = f"{r['to_app_p50_ms']:.1f} / {r['to_app_p99_ms']:.1f} | {once} of {r['events_expected']}"
            out.append(
                f"| {labels[r['target']]} | {r['posts']} ({r['events_per_post']}, {r['body_bytes']} B) | "
                f"{r['answered_200']} | {r['achieved_rate']:.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                f"{r['max_ms']:.1f} | {r['p99_from_send_ms']:.2f} | {r['sender_lag_p99_ms']:.2f} | "
                f"{r['cpu_ms_per_post']:.2f} ({r['cpu_share'] * 100:.0f} %) | {r['cpu_pressure'] * 100:.0f} % | "
                f"{app_cells} |"
            )
        out.append("")
    f = fig.get("fault")
    if f:
        tl = f["timeline_s"]
        out += [
            f"Fault run: {f['stripe_events']} Stripe events + {f['sendgrid_events']} SendGrid events "
            f"({args.fault_rate:g} + {args.fault_rate / 5:g} POSTs/s for {args.fault_seconds:g} s), each genuine "
            f"POST sent 3 times; app down {tl.get('app_down', 0):.1f}-{tl.get('app_up', 0):.1f} s, kill -9 at "
            f"{tl.get('kill', 0):.1f} s (restarted, ready at {tl.get('restarted', 0):.1f} s), all delivered at "
            f"{tl.get('all_delivered', float('nan')):.1f} s (CPU pressure while sending: "
            f"{f['cpu_pressure'] * 100:.0f} %):",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| genuine POSTs (3 per event or batch) / answers | {f['genuine_posts']} / {fmt(f['genuine_answers'])} |",
            f"| provider resends (no answer or 5xx) | {f['resends_after_no_answer_or_5xx']} "
            f"({fmt(f['provider_errors'])}) |",
            f"| genuine events delivered once | {f['delivered_once']} of {f['stripe_events'] + f['sendgrid_events']} |",
            f"| delivered more than once: same egressd id (at least once) / different ids (dedupe failure) | "
            f"{f['repeats_same_egressd_id']} / {f['repeats_different_egressd_ids']} |",
            f"| repeats: the app accepted the first copy at (ms from the kill) | "
            f"{', '.join(f'{x:+.1f}' for x in sorted(set(f['repeat_first_copy_ms_from_kill']))) or '-'} |",
            f"| missing at the app | {f['missing']} |",
            f"| deliveries egressd retried (attempt > 1) that the app accepted | {f['redelivered_attempts']} |",
            f"| events the app accepted in the second before the kill / within 25 ms of it | "
            f"{f['app_events_in_the_second_before_the_kill']} / {f['app_events_in_the_50_ms_around_the_kill']} |",
            f"| forged POSTs / forged events delivered | {f['forged_posts']} / {f['forged_delivered']} |",
        ]
        for kind, answers in f["forged_answers"].items():
            out.append(f"| forged: {kind} | {fmt(answers)} |")
        out.append(f"| deliveries the app's SDK refused | {f['app_refused']} |")
        out.append(f"| store after the run (entries by state) | {fmt(f['store_states_after'])} |")
        out.append("")
        for r in f["repeat_detail"]:
            out.append(
                f"repeat {r['event']}: egressd ids {r['webhook_ids']}, attempts {r['attempts']}, "
                f"at {r['ms_from_kill']} ms from the kill"
            )
        if f["repeat_detail"]:
            out.append("")
    for name, ok in fig["checks"].items():
        out.append(f"{'PASS' if ok else 'FAIL'}  {name}")
    return "\n".join(out)


def fmt(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def checks(fig: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for r in fig.get("latency", []):
        name = r["target"]
        if name == "baseline":
            continue
        out[f"{name}: p99 <= {P99_TARGET_MS:g} ms at {args.rate:g} POSTs/s ({r['p99_ms']:.2f} ms)"] = (
            r["p99_ms"] <= P99_TARGET_MS
        )
        out[f"{name}: every POST answered 200, rate achieved (>= 98 %)"] = (
            r["answered_200"] == r["posts"] and r["achieved_rate"] >= 0.98 * args.rate
        )
        out[f"{name}: every event at the app once, none refused by the SDK"] = (
            r["events_at_app"] == r["events_expected"] and r["events_twice_at_app"] == 0 and r["app_refused"] == 0
        )
    f = fig.get("fault")
    if f:
        out["fault: every genuine event delivered to the app (at least once)"] = f["missing"] == 0
        out[
            f"fault: every genuine event delivered exactly once ({f['delivered_more_than_once']} delivered twice, "
            f"{f['repeats_same_egressd_id']} of them one stored entry sent again across the kill)"
        ] = f["delivered_more_than_once"] == 0
        out[
            "fault: no provider redelivery stored twice; every repeat carries the same event id and "
            "X-Egressd-Webhook-Id (the app can deduplicate)"
        ] = f["repeats_different_egressd_ids"] == 0
        out["fault: 0 forged events delivered"] = f["forged_delivered"] == 0
        out["fault: every forged POST answered 400"] = all(
            all(k.startswith("400 ") for k in answers) for answers in f["forged_answers"].values()
        )
        out["fault: every genuine POST answered 200"] = all(k.startswith("200 ") for k in f["genuine_answers"])
        out["fault: the app's SDKs refused no delivery"] = f["app_refused"] == 0
    return out


async def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    fig: dict[str, Any] = {"machine": machine(), "args": vars(args)}
    sg = SendGrid(args.batch)
    if args.only in (None, "latency"):
        fig["latency"] = await latency(sg, args)
    if args.only in (None, "fault"):
        fig["fault"] = await fault_run(sg, args)
    fig["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    fig["checks"] = checks(fig, args)
    print(render(fig, args))
    return (0 if all(fig["checks"].values()) else 1), fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, under a minute")
    parser.add_argument("--only", choices=("latency", "fault"), default=None)
    parser.add_argument("--rate", type=float, default=200.0, help="latency: POSTs/s")
    parser.add_argument("--seconds", type=float, default=None, help="latency: measured seconds per target (30; 5)")
    parser.add_argument("--rounds", type=int, default=None, help="latency: alternating segments per target (3; 2)")
    parser.add_argument("--warmup", type=float, default=None, help="latency: seconds not counted (3; quick 1)")
    parser.add_argument("--batch", type=int, default=5, help="SendGrid events per POST")
    parser.add_argument(
        "--prefill", type=int, default=None, help="latency: delivered entries already in the data dir (100000; 20000)"
    )
    parser.add_argument("--fault-rate", type=float, default=None, help="Stripe events/s in the fault run (100; 50)")
    parser.add_argument("--fault-seconds", type=float, default=None, help="fault run: seconds of sending (60; 12)")
    parser.add_argument("--down-at", type=float, default=None, help="fault run: app down at (10; 3) s")
    parser.add_argument("--down-for", type=float, default=None, help="fault run: app down for (30; 6) s")
    parser.add_argument("--kill-after", type=float, default=None, help="kill -9 this long after the app is up (5; 2)")
    parser.add_argument("--forge-every", type=int, default=20, help="one slot in N is a forged POST")
    parser.add_argument("--drain-deadline", type=float, default=None, help="seconds to wait for delivery (150; 40)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="latency: nice value of the event loops of egressd, the baseline and the sender (diagnosis)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directories (logs, data dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (
        ("seconds", 30.0, 5.0),
        ("rounds", 3, 2),
        ("warmup", 3.0, 1.0),
        ("prefill", 100_000, 20_000),
        ("fault_rate", 100.0, 50.0),
        ("fault_seconds", 60.0, 12.0),
        ("down_at", 10.0, 3.0),
        ("down_for", 30.0, 6.0),
        ("kill_after", 5.0, 2.0),
        ("drain_deadline", 150.0, 40.0),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    code, fig = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2, default=str))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
