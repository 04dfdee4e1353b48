#!/usr/bin/env python
"""Exactly once under faults: drives egressd through each exactly-once fault (contract 7.2,
7.7) and counts the side effects at the fake providers, not only the answers the app got.

    python bench/exactly_once.py                   # the issue's sizes, under a minute on 2 CPUs
    python bench/exactly_once.py --quick           # smaller sizes, about 30 s
    python bench/exactly_once.py --only kill9-restart,redis-paused
    python bench/exactly_once.py --json out.json   # the rows as JSON too

Everything runs on 127.0.0.1: the packaged fakes (`fakes.FakeServer`) in this event
loop, egressd in process (`EgressServer`, memory state, or two replicas on one Redis) or,
for kill -9, as real `python -m proxy run --data-dir DIR` processes, and Redis as our own
`redis-server` on a free port (the Redis cases are skipped when it is not installed).

Cases:

* `failover-after-503-charged` - Stripe charges, then answers 503; retries open the circuit
  and the next attempt meets `circuit_open`, with failover to PayPal on `circuit_open`.
  Each key must be charged once in all (Stripe + PayPal), and a payment that reached Stripe
  must not be failed over (one that arrives after the circuit opened never reached Stripe
  and may be; the share depends on timing and is in the notes).
* `disconnect-resend` (sendgrid keyless, sendgrid with the app's key, mailgun keyless,
  generic echo with the app's key) - the upstream acts, then answers 3 s late; the app gives
  up after 1 s and resends. The resend must join the call egressd still owns.
* `ambiguous-5xx-keyless-resend` - Mailgun accepts, then answers 503; the app resends
  within `fingerprint_window`: the recorded 503 is replayed, nothing is sent again.
* `two-replicas-burst` - two replicas on one Redis, the same POST to both at once (half
  keyed, half keyless). At most one send per pair; 503 `state_unavailable` is allowed.
* `reloads-under-load` - reloads flipping `idempotency.replay_ttl` while the app sends new
  keys and repeats of earlier ones: a repeat never reaches the upstream again.
* `kill9-restart` (data dir; data dir + Redis) - sends completed before kill -9 are replayed
  after the restart; sends cut off in flight get 502 `in_doubt` and are not sent again.
* `redis-paused` - Redis SIGSTOPped for 2 s under a burst of keyed pairs to two replicas:
  503 `state_unavailable` or success, never a duplicate; after Redis is back every key is
  resent once and must end up sent exactly once.
* `redis-emptied` - Redis restarted empty while sends are in flight on replica A; repeats
  on replica B must be replays, not sends.

A case PASSes when no intended send reached the fake twice and the app's answers are the
ones the contract names. Exit status 1 when any case FAILs (a duplicate side effect always
fails its case), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from multidict import CIMultiDict  # noqa: E402

from fakes import FakeServer, SideEffect  # noqa: E402
from proxy.events import EventBus  # noqa: E402
from proxy.server import EgressServer, Settings  # noqa: E402

CASES = (
    "failover-after-503-charged",
    "disconnect-resend",
    "ambiguous-5xx-keyless-resend",
    "two-replicas-burst",
    "reloads-under-load",
    "kill9-restart",
    "redis-paused",
    "redis-emptied",
)
MAILGUN_DOMAIN = "mg.example.com"
MAILGUN_PATH = f"/v3/{MAILGUN_DOMAIN}/messages"
SENDGRID_AUTH = {"Authorization": "Bearer SG.bench"}
MAILGUN_AUTH = {"Authorization": "Basic YXBpOmtleS1iZW5jaA=="}  # api:key-bench
STRIPE_AUTH = {"Authorization": "Bearer sk_test_bench"}
CROSSWALK = {"pm_card_visa": "8TX02017P3456"}


# -- rows --------------------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    calls: str = ""  # what the app sent: "30 payments", "200 pairs"
    expected: str = ""  # the side effects the fake should count
    counted: int | None = None  # side effects counted at the fake(s)
    duplicates: int | None = None  # intended sends that acted more than once (extra effects)
    answers: Counter[str] = field(default_factory=Counter)  # the app's answers, by status
    ok: bool = False
    skipped: bool = False
    done: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def result(self) -> str:
        return "SKIP" if self.skipped else "PASS" if self.ok else "FAIL"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["answers"] = dict(self.answers.most_common())
        out["result"] = self.result
        return out


def dupes(counts: Mapping[str, int]) -> int:
    """Side effects beyond the first, over every intended send."""
    return sum(max(0, n - 1) for n in counts.values())


# -- the app's HTTP ----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int  # 0: no answer
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    failure: str = ""  # "timeout" or "no answer (ExcName)" when status is 0
    elapsed: float = 0.0  # seconds from sending to the whole answer (or the failure)

    @property
    def replayed(self) -> bool:
        return self.headers.get("Idempotent-Replayed") == "true"

    @property
    def error(self) -> str:
        return self.headers.get("X-Egressd-Error", "")

    @property
    def detail(self) -> str:
        return self.headers.get("X-Egressd-Error-Detail", "")

    @property
    def label(self) -> str:
        if self.status == 0:
            return self.failure
        parts = [str(self.status)]
        if self.error:
            parts.append(self.error + (f"/{self.detail}" if self.detail else ""))
        failover = self.headers.get("X-Egressd-Failover")
        if failover:
            fields = dict(p.strip().partition("=")[::2] for p in failover.split(";")[1:])
            parts.append(
                f"failover {failover.split(';')[0].strip()}" + (f"/{fields['reason']}" if "reason" in fields else "")
            )
        if self.replayed:
            parts.append("replayed")
        return " ".join(parts)


async def call(
    http: aiohttp.ClientSession,
    url: str,
    *,
    data: bytes | str | None = None,
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    give_up: float = 20.0,
) -> Answer:
    """One POST as the app sends it; a timeout or a broken connection is an answer too."""
    t0 = time.monotonic()
    try:
        async with http.post(
            url, data=data, json=json_body, headers=dict(headers or {}), timeout=aiohttp.ClientTimeout(total=give_up)
        ) as r:
            body = await r.read()
            return Answer(r.status, CIMultiDict(r.headers), body, elapsed=time.monotonic() - t0)
    except TimeoutError:
        return Answer(0, failure="timeout", elapsed=time.monotonic() - t0)
    except aiohttp.ClientError as exc:
        return Answer(0, failure=f"no answer ({type(exc).__name__})", elapsed=time.monotonic() - t0)


def session(limit: int = 1000) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, force_close=False))


# -- what the app sends, per provider, and how the fake's side effect names it ------------------


@dataclass(frozen=True)
class SendKind:
    upstream: str  # also the fake's name
    path: str
    effect: str

    def request(self, tag: str, key: str | None) -> tuple[str, dict[str, str], bytes]:
        """(path, headers, body) of the send named `tag`; identical for the same tag."""
        headers: dict[str, str] = {} if key is None else {"Idempotency-Key": key}
        if self.upstream == "sendgrid":
            body = {
                "personalizations": [{"to": [{"email": "b@example.org"}]}],
                "from": {"email": "a@example.com"},
                "subject": f"bench {tag}",
                "content": [{"type": "text/plain", "value": "thanks"}],
            }
            return (
                self.path,
                {**SENDGRID_AUTH, **headers, "Content-Type": "application/json"},
                json.dumps(body).encode(),
            )
        if self.upstream == "mailgun":
            form = f"from=a%40example.com&to=b%40example.org&subject=bench+{tag}&text=thanks"
            return (
                self.path,
                {**MAILGUN_AUTH, **headers, "Content-Type": "application/x-www-form-urlencoded"},
                (form.encode()),
            )
        return f"{self.path}/{tag}", {**headers, "Content-Type": "application/json"}, json.dumps({"n": tag}).encode()

    def tag(self, effect: SideEffect) -> str:
        if self.upstream == "echo":
            return str(effect.data.get("path", "")).rsplit("/", 1)[-1]
        return str(effect.data.get("subject") or "").removeprefix("bench ")

    def counts(self, fake: FakeServer) -> Counter[str]:
        return Counter(self.tag(e) for e in fake.ledger.effects(self.effect))


SENDGRID = SendKind("sendgrid", "/v3/mail/send", "mail.sent")
MAILGUN = SendKind("mailgun", MAILGUN_PATH, "message.queued")
ECHO = SendKind("echo", "/send", "echo.POST")


def policy(kind: SendKind, url: str, idempotency: dict[str, Any], **extra: Any) -> dict[str, Any]:
    provider: Any = {"sendgrid": "sendgrid", "mailgun": {"name": "mailgun", "domain": MAILGUN_DOMAIN}}.get(
        kind.upstream, "generic"
    )
    return {
        "upstream": kind.upstream,
        "target": url,
        "provider": provider,
        "timeouts": {"connect": "1s", "attempt": "10s", "total": "15s"},
        "idempotency": idempotency,
        **extra,
    }


# -- the parties -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Ctx:
    """What every case gets: sizes, a work directory, and starters that clean up after it."""

    def __init__(self, *, quick: bool, workdir: Path, quiet: bool) -> None:
        self.quick = quick
        self.workdir = workdir
        self.quiet = quiet
        self.redis_problem = redis_problem()

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def tmpdir(self, prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.workdir))

    async def fake(self, stack: contextlib.AsyncExitStack, name: str) -> FakeServer:
        fake = await FakeServer(name).start()
        stack.push_async_callback(bounded, fake.stop(), 15)
        return fake

    async def proxy(
        self, stack: contextlib.AsyncExitStack, docs: list[dict[str, Any]], *, redis_url: str | None = None,
        prefix: str = "",
    ) -> tuple[EgressServer, str]:  # fmt: skip
        """An in-process egressd on port 0 (memory state, or Redis shared under `prefix`)."""
        directory = self.tmpdir("policies-")
        (directory / "policies.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        settings = Settings(policies=directory, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), drain=2.0)
        kwargs: dict[str, Any] = {}
        if redis_url is not None:
            from proxy.state.resilient import open_shared_state

            bus = EventBus()
            kwargs = {"state": open_shared_state(redis_url, prefix=prefix, events=bus), "events": bus}
        server = EgressServer(settings, **kwargs)
        stack.push_async_callback(bounded, server.stop(), 20)
        await server.start()
        host, port = server.addresses["main"]
        return server, f"http://{host}:{port}"

    async def redis(self, stack: contextlib.AsyncExitStack) -> Any:
        from tests.redis_server import RedisServer

        server = RedisServer()
        stack.callback(server.cleanup)
        await asyncio.to_thread(server.start)
        return server


def redis_problem() -> str | None:
    """Why the Redis cases cannot run here, or None."""
    try:
        from tests.redis_server import REDIS_SERVER
    except ImportError as exc:  # tests/ needs pytest
        return f"cannot import tests.redis_server ({exc})"
    if not os.access(REDIS_SERVER, os.X_OK):
        return "redis-server is not installed (apt-get install redis-server)"
    return None


async def bounded(aw: Awaitable[Any], seconds: float) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(aw, seconds)


async def wait_until(predicate: Callable[[], bool], within: float) -> bool:
    end = time.monotonic() + within
    while not predicate():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.02)
    return True


# -- 1. failover after a 503 that charged -------------------------------------------------------


async def case_failover(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(30, 6)
    row = Row("failover-after-503-charged", calls=f"{n} payments", expected=f"{n} (1 per key)")
    out.append(row)
    async with contextlib.AsyncExitStack() as stack:
        sf = await ctx.fake(stack, "stripe")
        pf = await ctx.fake(stack, "paypal")
        sf.faults.status(503, path="/v1/payment_intents", processed=True)
        stripe_doc = {
            "upstream": "stripe",
            "target": sf.url,
            "provider": "stripe",
            "timeouts": {"connect": "1s", "attempt": "2s", "total": "10s"},
            "retry": {"attempts": 3, "backoff": {"initial": "5ms", "max": "10ms"}},
            "circuit_breaker": {"min_requests": 2, "window": "30s", "failure_rate": 0.5, "open_for": "30s"},
            "idempotency": {"replay_ttl": "24h"},
            "failover": [{"to": "paypal", "on": ["circuit_open"], "crosswalk": {"payment_methods": CROSSWALK}}],
        }
        paypal_doc = {
            "upstream": "paypal",
            "target": pf.url,
            "provider": "paypal",
            "auth": {
                "oauth_client_credentials": {
                    "token_url": pf.url + "/v1/oauth2/token",
                    "client_id": "x",
                    "client_secret": "y",
                }
            },
            "idempotency": {"header": "PayPal-Request-Id", "generate": False},
        }
        _, base = await ctx.proxy(stack, [stripe_doc, paypal_doc])
        run = uuid.uuid4().hex[:8]
        keys = [f"pay-{run}-{i}" for i in range(n)]
        async with session() as http:

            async def pay(i: int) -> Answer:
                # A distinct amount per payment ties a PayPal capture to its payment.
                form = f"amount={2000 + i}&currency=usd&payment_method=pm_card_visa&confirm=true"
                headers = {
                    **STRIPE_AUTH,
                    "Idempotency-Key": keys[i],
                    "Content-Type": "application/x-www-form-urlencoded",
                }
                return await call(http, base + "/stripe/v1/payment_intents", data=form, headers=headers, give_up=30)

            answers = await asyncio.gather(*(pay(i) for i in range(n)))
        await asyncio.sleep(0.2)
        per_key: Counter[str] = Counter({k: 0 for k in keys})
        stripe_counts = sf.ledger.counts_by_key("payment_intent.created")
        for k, c in stripe_counts.items():
            per_key[k] += c
        captures = pf.ledger.effects("order.captured")
        unattributed = 0
        for e in captures:
            try:
                i = round(float(e.data.get("amount", "")) * 100) - 2000
            except ValueError:
                i = -1
            if 0 <= i < n:
                per_key[keys[i]] += 1
            else:
                unattributed += 1
        row.answers.update(a.label for a in answers)
        row.counted = sum(stripe_counts.values()) + len(captures)
        row.duplicates = dupes(per_key) + unattributed
        phantoms = sum(1 for k, a in zip(keys, answers, strict=True) if 200 <= a.status < 300 and per_key[k] == 0)
        not_charged = sum(1 for k in keys if per_key[k] == 0)
        # A key that reached Stripe (which charged it: processed=True) must not be failed over; a
        # key that arrived after the circuit opened never reached Stripe and may fail over.
        reached = {r.idempotency_key for r in sf.ledger.requests_to("/v1/payment_intents", "POST")}
        reached_then_moved = sum(
            1 for k, a in zip(keys, answers, strict=True) if k in reached and "failover used" in a.label
        )
        row.notes.append(
            f"{sum(1 for k in keys if k in reached)} keys reached Stripe (charges {sum(stripe_counts.values())}, "
            f"failover must be refused), {sum(1 for k in keys if k not in reached)} arrived with the circuit "
            f"already open (may fail over); PayPal captures {len(captures)}"
            + (f" ({unattributed} not tied to a payment)" if unattributed else "")
        )
        if reached_then_moved:
            row.notes.append(f"{reached_then_moved} payments that reached Stripe were failed over")
        if not_charged:
            row.notes.append(f"{not_charged} payments charged nowhere (the app got an error for them)")
        if phantoms:
            row.notes.append(f"{phantoms} payments answered 2xx without a charge")
        row.ok = row.duplicates == 0 and phantoms == 0 and reached_then_moved == 0
        row.done = True


# -- 2. the app times out and resends ------------------------------------------------------------

RESEND_CASES: dict[str, tuple[SendKind, dict[str, Any], bool]] = {
    "sendgrid-keyless": (SENDGRID, {"fingerprint_window": "10m", "generate": False}, False),
    "sendgrid-app-key": (SENDGRID, {"replay_ttl": "24h"}, True),
    "mailgun-keyless": (MAILGUN, {"fingerprint_window": "10m", "generate": False}, False),
    "generic-app-key": (ECHO, {"replay_ttl": "24h"}, True),
}


async def case_disconnect_resend(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(3, 2)
    rows = []
    for sub in RESEND_CASES:
        row = Row(f"disconnect-resend/{sub}", calls=f"{n} sends x 2 tries", expected=f"{n} (1 per send)")
        out.append(row)
        rows.append(row)
    # The four providers run side by side (each with its own fake and egressd).
    await asyncio.gather(
        *(_resend_one(ctx, row, *RESEND_CASES[sub], n) for row, sub in zip(rows, RESEND_CASES, strict=True))
    )


async def _resend_one(ctx: Ctx, row: Row, kind: SendKind, idem: dict[str, Any], keyed: bool, n: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        fake = await ctx.fake(stack, kind.upstream)
        fake.faults.add(kind="delay", seconds=3.0, phase="after", path=kind.path)
        _, base = await ctx.proxy(stack, [policy(kind, fake.url, idem)])
        run = uuid.uuid4().hex[:8]

        async def send(i: int) -> list[Answer]:
            tag = f"{run}-{i}"
            path, headers, body = kind.request(tag, f"k-{tag}" if keyed else None)
            got = []
            # The app's first try gives up after 1 s (closing its connection); its resend waits longer.
            for timeout in (1.0, 10.0):
                async with session() as http:
                    got.append(
                        await call(http, f"{base}/{kind.upstream}{path}", data=body, headers=headers, give_up=timeout)
                    )
            return got

        results = await asyncio.gather(*(send(i) for i in range(n)))
        await asyncio.sleep(0.3)
        counts = kind.counts(fake)
        tags = [f"{run}-{i}" for i in range(n)]
        for got in results:
            row.answers.update(a.label for a in got)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts) + sum(c for t, c in counts.items() if t not in tags)
        once = all(counts.get(t, 0) == 1 for t in tags)
        joined = all(200 <= got[1].status < 300 and got[1].replayed for got in results)
        if not once:
            row.notes.append(f"per send: {dict(counts)}")
        if not joined:
            row.notes.append("a resend did not get the first call's answer (2xx with Idempotent-Replayed: true)")
        row.ok = row.duplicates == 0 and once and joined
        row.done = True


# -- 3. an ambiguous 5xx to a keyless send, resent ----------------------------------------------


async def case_ambiguous(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(20, 4)
    resends = 2
    row = Row(
        "ambiguous-5xx-keyless-resend", calls=f"{n} messages x {1 + resends} tries", expected=f"{n} (1 per message)"
    )
    out.append(row)
    async with contextlib.AsyncExitStack() as stack:
        mg = await ctx.fake(stack, "mailgun")
        # Accepted, then 503: once per message (the first tries all arrive together).
        mg.faults.add(kind="status", status=503, processed=True, count=n, path=MAILGUN_PATH)
        _, base = await ctx.proxy(stack, [policy(MAILGUN, mg.url, {"fingerprint_window": "10m", "generate": False})])
        run = uuid.uuid4().hex[:8]
        tags = [f"{run}-{i}" for i in range(n)]
        async with session() as http:

            async def send(tag: str) -> Answer:
                path, headers, body = MAILGUN.request(tag, None)
                return await call(http, f"{base}/mailgun{path}", data=body, headers=headers)

            first = await asyncio.gather(*(send(t) for t in tags))
            later = [await asyncio.gather(*(send(t) for t in tags)) for _ in range(resends)]
        await asyncio.sleep(0.2)
        counts = MAILGUN.counts(mg)
        row.answers.update(a.label for a in first)
        for batch in later:
            row.answers.update(a.label for a in batch)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        once = all(counts.get(t, 0) == 1 for t in tags)
        replayed = all(
            a.replayed and a.status == f.status for batch in later for a, f in zip(batch, first, strict=True)
        )
        if not once:
            row.notes.append(f"per message: {sorted(counts.values())}")
        if not replayed:
            row.notes.append("a resend was not answered with the recorded answer (same status, Idempotent-Replayed)")
        row.ok = row.duplicates == 0 and once and replayed
        row.done = True


# -- 4. two replicas, simultaneous identical calls ----------------------------------------------

REPLICA_IDEM = {"fingerprint_window": "10m", "replay_ttl": "24h", "generate": False}


async def _replicas(
    ctx: Ctx, stack: contextlib.AsyncExitStack, redis_url: str, docs: list[dict[str, Any]]
) -> tuple[str, str]:
    prefix = f"eo-{uuid.uuid4().hex[:6]}:"
    _, a = await ctx.proxy(stack, docs, redis_url=redis_url, prefix=prefix)
    _, b = await ctx.proxy(stack, docs, redis_url=redis_url, prefix=prefix)
    return a, b


async def case_two_replicas(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(200, 40)
    row = Row("two-replicas-burst", calls=f"{n} pairs (A+B at once)", expected=f"<= 1 per pair ({n})")
    out.append(row)
    if ctx.redis_problem:
        row.skipped, row.done = True, True
        row.notes.append(ctx.redis_problem)
        return
    async with contextlib.AsyncExitStack() as stack:
        redis = await ctx.redis(stack)
        sg = await ctx.fake(stack, "sendgrid")
        a, b = await _replicas(ctx, stack, redis.url, [policy(SENDGRID, sg.url, REPLICA_IDEM)])
        run = uuid.uuid4().hex[:8]
        tags = [f"{run}-{i}" for i in range(n)]
        async with session(limit=0) as http:

            async def one(base: str, i: int) -> Answer:
                path, headers, body = SENDGRID.request(tags[i], f"pair-{tags[i]}" if i % 2 == 0 else None)
                return await call(http, f"{base}/sendgrid{path}", data=body, headers=headers, give_up=30)

            flat = await asyncio.gather(*(one(base, i) for i in range(n) for base in (a, b)))
        await asyncio.sleep(0.3)
        pairs = [flat[2 * i : 2 * i + 2] for i in range(n)]
        counts = SENDGRID.counts(sg)
        row.answers.update(x.label for x in flat)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        unavailable = sum(1 for p in pairs if any(x.error == "state_unavailable" for x in p))
        phantom = sum(1 for t, p in zip(tags, pairs, strict=True) if any(x.status == 202 for x in p) and counts[t] == 0)
        unanswered_send = sum(
            1 for t, p in zip(tags, pairs, strict=True) if counts[t] > 0 and not any(x.status == 202 for x in p)
        )
        odd = sum(1 for x in flat if x.status != 202 and x.error != "state_unavailable")
        row.notes.append(f"pairs with a 503 state_unavailable (allowed): {unavailable}; pairs sent: {len(counts)}")
        if phantom:
            row.notes.append(f"{phantom} pairs answered 202 but never sent")
        if unanswered_send:
            row.notes.append(f"{unanswered_send} pairs sent although neither call was answered 202")
        if odd:
            row.notes.append(f"{odd} answers neither 202 nor 503 state_unavailable")
        row.ok = row.duplicates == 0 and phantom == 0 and unanswered_send == 0 and odd == 0
        row.done = True


# -- 5. reloads under load ------------------------------------------------------------------------


async def case_reloads(ctx: Ctx, out: list[Row]) -> None:
    reloads = ctx.size(20, 4)
    seconds = ctx.size(10, 2)
    rate = 260.0
    row = Row("reloads-under-load", expected="1 per key")
    out.append(row)
    async with contextlib.AsyncExitStack() as stack:
        echo = await ctx.fake(stack, "echo")
        doc = policy(ECHO, echo.url, {"replay_ttl": "10m"})
        server, base = await ctx.proxy(stack, [doc])
        policy_file = server.settings.policies / "policies.yaml"
        run = uuid.uuid4().hex[:8]
        rng = random.Random(7)
        finished: list[str] = []  # keys whose first call was answered 200
        new_keys: list[str] = []
        repeat_answers: list[Answer] = []
        first_answers: list[Answer] = []
        reload_results: list[bool] = []
        url = f"{base}/echo/send/r"
        loop = asyncio.get_running_loop()

        async with session(limit=128) as http:

            async def one(key: str, repeat: bool) -> None:
                headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
                got = await call(http, url, data=json.dumps({"k": key}), headers=headers, give_up=15)
                (repeat_answers if repeat else first_answers).append(got)
                if not repeat and got.status == 200:
                    finished.append(key)

            async def reloader() -> None:
                for r in range(reloads):
                    await asyncio.sleep(seconds / (reloads + 1))
                    doc["idempotency"]["replay_ttl"] = "11m" if r % 2 == 0 else "10m"
                    policy_file.write_text(yaml.safe_dump_all([doc], sort_keys=False))
                    reload_results.append(await server.reload("bench"))

            async def load() -> None:
                tasks = []
                t0 = loop.time()
                i = 0
                while i / rate < seconds:
                    delay = t0 + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if finished and rng.random() < 0.5:
                        tasks.append(asyncio.create_task(one(rng.choice(finished), True)))
                    else:
                        key = f"{run}-{len(new_keys)}"
                        new_keys.append(key)
                        tasks.append(asyncio.create_task(one(key, False)))
                    i += 1
                await asyncio.gather(*tasks)

            began = loop.time()
            sending = asyncio.create_task(load())
            await reloader()
            await sending
            took = loop.time() - began
        await asyncio.sleep(0.2)
        counts = echo.ledger.counts_by_key("echo.POST")
        calls = len(first_answers) + len(repeat_answers)
        row.calls = (
            f"{calls} calls ({len(new_keys)} keys, {len(repeat_answers)} repeats), {len(reload_results)} reloads"
        )
        row.expected = f"{len(new_keys)} (1 per key)"
        row.answers.update(a.label for a in (*first_answers, *repeat_answers))
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        failed_reloads = sum(1 for ok in reload_results if not ok)
        not_replayed = sum(1 for a in repeat_answers if not (a.status == 200 and a.replayed))
        phantom = sum(1 for k in finished if counts.get(k, 0) == 0)
        row.notes.append(f"{calls / took:.0f} calls/s over {took:.1f} s")
        if failed_reloads:
            row.notes.append(f"{failed_reloads} reloads failed")
        if not_replayed:
            row.notes.append(f"{not_replayed} repeats not answered 200 with Idempotent-Replayed: true")
        if phantom:
            row.notes.append(f"{phantom} keys answered 200 but never sent")
        row.ok = row.duplicates == 0 and failed_reloads == 0 and not_replayed == 0 and phantom == 0
        row.done = True


# -- 6. kill -9 and restart ---------------------------------------------------------------------


async def case_kill9(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(5, 2)
    rows = {
        "data-dir": Row(
            "kill9-restart/data-dir", calls=f"{4 * n} sends, resent after restart", expected=f"{4 * n} (1 per send)"
        ),
        "redis": Row(
            "kill9-restart/redis", calls=f"{4 * n} sends, resent after restart", expected=f"{4 * n} (1 per send)"
        ),
    }
    out.extend(rows.values())
    await _kill9_one(ctx, rows["data-dir"], n, with_redis=False)
    if ctx.redis_problem:
        rows["redis"].skipped = rows["redis"].done = True
        rows["redis"].notes.append(ctx.redis_problem)
        return
    await _kill9_one(ctx, rows["redis"], n, with_redis=True)


async def _kill9_one(ctx: Ctx, row: Row, n: int, *, with_redis: bool) -> None:
    async with contextlib.AsyncExitStack() as stack:
        redis_url = (await ctx.redis(stack)).url if with_redis else None
        sg = await ctx.fake(stack, "sendgrid")
        doc = policy(SENDGRID, sg.url, {"fingerprint_window": "10m", "replay_ttl": "24h", "generate": False})
        # The cut calls are still in flight at the kill (the fake answers 10 s late); a resend
        # waits longer than `total`, so whatever egressd finally answers is seen.
        doc["timeouts"] = {"connect": "1s", "attempt": "12s", "total": "15s"}
        policies = ctx.tmpdir("policies-")
        (policies / "p.yaml").write_text(yaml.safe_dump_all([doc], sort_keys=False))
        from tests.egressd_process import Egressd  # the tests' restartable `egressd run`

        proc = Egressd(policies, redis_url=redis_url, drain=2.0, data_dir=ctx.tmpdir("data-"))
        stack.callback(proc.stop)
        await asyncio.to_thread(proc.start)
        url = proc.url + "/sendgrid" + SENDGRID.path
        run = uuid.uuid4().hex[:8]
        # (tag, key): completed keyed, completed keyless, cut keyed, cut keyless.
        done = [(f"{run}-done-k{i}", f"done-{run}-{i}") for i in range(n)] + [
            (f"{run}-done-f{i}", None) for i in range(n)
        ]
        cut = [(f"{run}-cut-k{i}", f"cut-{run}-{i}") for i in range(n)] + [(f"{run}-cut-f{i}", None) for i in range(n)]
        async with session() as http:

            async def send(tag: str, key: str | None, give_up: float = 20.0) -> Answer:
                _, headers, body = SENDGRID.request(tag, key)
                return await call(http, url, data=body, headers=headers, give_up=give_up)

            before = await asyncio.gather(*(send(t, k) for t, k in done))
            row.answers.update(f"before kill: {a.label}" for a in before)
            # Cut off by the kill: the fake sends, then answers late.
            sg.faults.add(kind="delay", seconds=10.0, phase="after", path=SENDGRID.path)
            cut_tasks = [asyncio.ensure_future(send(t, k, give_up=30)) for t, k in cut]
            acted = await wait_until(lambda: sg.ledger.count(SENDGRID.effect) >= 4 * n, 10)
            if not acted:
                row.notes.append(
                    f"only {sg.ledger.count(SENDGRID.effect)} of {4 * n} sends reached the fake before the kill"
                )
            proc.signal(signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)
            cut_answers = await asyncio.gather(*cut_tasks)
            row.answers.update(f"killed: {a.label}" for a in cut_answers)
            sg.faults.clear()
            await asyncio.to_thread(proc.start)
            sent_before = sg.ledger.count(SENDGRID.effect)
            after_done = await asyncio.gather(*(send(t, k) for t, k in done))
            t0 = time.monotonic()
            after_cut = await asyncio.gather(*(send(t, k, give_up=25) for t, k in cut))
            cut_wait = time.monotonic() - t0
        row.answers.update(f"resent: {a.label}" for a in (*after_done, *after_cut))
        await asyncio.sleep(0.2)
        counts = SENDGRID.counts(sg)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        replayed = all(a.status == 202 and a.replayed for a in after_done)
        in_doubt = all(
            a.status == 502 and a.error == "upstream_unreachable" and a.detail == "in_doubt" for a in after_cut
        )
        if not replayed:
            row.notes.append("a send completed before the kill was not replayed (202, Idempotent-Replayed) after it")
        if not in_doubt:
            row.notes.append(
                f"a send cut off by the kill was not answered 502 upstream_unreachable/in_doubt "
                f"(the resends took {cut_wait:.1f} s)"
            )
        if sg.ledger.count(SENDGRID.effect) != sent_before:
            row.notes.append(
                f"{sg.ledger.count(SENDGRID.effect) - sent_before} sends reached the fake after the restart"
            )
        row.ok = row.duplicates == 0 and replayed and in_doubt and acted
        row.done = True


# -- 7. Redis paused, Redis emptied --------------------------------------------------------------


async def case_redis_paused(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(60, 12)
    row = Row("redis-paused", calls=f"{n} keyed pairs over 3 s, then 1 resend each", expected=f"{n} (1 per key)")
    out.append(row)
    if ctx.redis_problem:
        row.skipped, row.done = True, True
        row.notes.append(ctx.redis_problem)
        return
    async with contextlib.AsyncExitStack() as stack:
        redis = await ctx.redis(stack)
        stack.callback(lambda: redis.proc is not None and redis.resume())  # never leave it stopped
        sg = await ctx.fake(stack, "sendgrid")
        a, b = await _replicas(ctx, stack, redis.url, [policy(SENDGRID, sg.url, REPLICA_IDEM)])
        run = uuid.uuid4().hex[:8]
        tags = [f"{run}-{i}" for i in range(n)]
        spread = 3.0
        async with session(limit=0) as http:

            async def one(base: str, i: int, delay: float = 0.0) -> Answer:
                await asyncio.sleep(delay)
                path, headers, body = SENDGRID.request(tags[i], f"paused-{tags[i]}")
                return await call(http, f"{base}/sendgrid{path}", data=body, headers=headers, give_up=30)

            async def pause() -> None:
                await asyncio.sleep(0.5)
                redis.suspend()
                try:
                    await asyncio.sleep(2.0)
                finally:
                    redis.resume()

            pauser = asyncio.create_task(pause())
            try:
                burst = await asyncio.gather(*(one(base, i, spread * i / n) for i in range(n) for base in (a, b)))
                await pauser
            finally:
                pauser.cancel()  # its own `finally` resumes Redis
            await asyncio.sleep(1.5)  # Redis answers again
            sent_in_burst = SENDGRID.counts(sg)
            again = await asyncio.gather(*(one(a if i % 2 else b, i) for i in range(n)))
        await asyncio.sleep(0.3)
        counts = SENDGRID.counts(sg)
        row.answers.update(f"burst: {x.label}" for x in burst)
        row.answers.update(f"resend: {x.label}" for x in again)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        odd = sum(1 for x in burst if x.status != 202 and x.error != "state_unavailable")
        unavailable = sum(1 for x in burst if x.error == "state_unavailable")
        once = all(counts.get(t, 0) == 1 for t in tags)
        row.notes.append(
            f"burst: {unavailable} answers 503 state_unavailable (allowed), {sum(sent_in_burst.values())} keys sent, "
            f"slowest answer {max(x.elapsed for x in burst):.2f} s (Redis stopped for 2 s)"
        )
        if odd:
            row.notes.append(f"{odd} burst answers neither 202 nor 503 state_unavailable")
        if not once:
            row.notes.append(
                f"{sum(1 for t in tags if counts.get(t, 0) != 1)} keys not sent exactly once after the resend"
            )
        row.ok = row.duplicates == 0 and odd == 0 and once
        row.done = True


async def case_redis_emptied(ctx: Ctx, out: list[Row]) -> None:
    n = ctx.size(10, 3)
    row = Row("redis-emptied", calls=f"{n} keyed sends on A, repeated on B", expected=f"{n} (1 per key)")
    out.append(row)
    if ctx.redis_problem:
        row.skipped, row.done = True, True
        row.notes.append(ctx.redis_problem)
        return
    async with contextlib.AsyncExitStack() as stack:
        redis = await ctx.redis(stack)
        sg = await ctx.fake(stack, "sendgrid")
        a, b = await _replicas(ctx, stack, redis.url, [policy(SENDGRID, sg.url, REPLICA_IDEM)])
        run = uuid.uuid4().hex[:8]
        tags = [f"{run}-{i}" for i in range(n)]
        sg.faults.add(kind="delay", seconds=1.5, phase="after", path=SENDGRID.path)
        async with session() as http:

            async def one(base: str, tag: str) -> Answer:
                path, headers, body = SENDGRID.request(tag, f"empty-{tag}")
                return await call(http, f"{base}/sendgrid{path}", data=body, headers=headers, give_up=30)

            firsts = [asyncio.ensure_future(one(a, t)) for t in tags]
            acted = await wait_until(lambda: sg.ledger.count(SENDGRID.effect) >= n, 10)
            await asyncio.to_thread(redis.restart)  # no persistence: it comes back empty
            first = await asyncio.gather(*firsts)
            sg.faults.clear()
            await asyncio.sleep(1.0)
            repeats = await asyncio.gather(*(one(b, t) for t in tags))
        await asyncio.sleep(0.2)
        counts = SENDGRID.counts(sg)
        row.answers.update(f"on A: {x.label}" for x in first)
        row.answers.update(f"repeat on B: {x.label}" for x in repeats)
        row.counted = sum(counts.values())
        row.duplicates = dupes(counts)
        replayed = all(x.status == 202 and x.replayed for x in repeats)
        if not acted:
            row.notes.append("the sends had not all reached the fake when Redis was restarted")
        if not replayed:
            row.notes.append("a repeat on B was not a replay (202, Idempotent-Replayed)")
        row.ok = row.duplicates == 0 and replayed
        row.done = True


CASE_FUNCS: dict[str, Callable[[Ctx, list[Row]], Awaitable[None]]] = {
    "failover-after-503-charged": case_failover,
    "disconnect-resend": case_disconnect_resend,
    "ambiguous-5xx-keyless-resend": case_ambiguous,
    "two-replicas-burst": case_two_replicas,
    "reloads-under-load": case_reloads,
    "kill9-restart": case_kill9,
    "redis-paused": case_redis_paused,
    "redis-emptied": case_redis_emptied,
}


# -- the run -------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "aiohttp": aiohttp.__version__}


async def run_exactly_once(
    *, quick: bool = False, only: Iterable[str] | None = None, quiet: bool = False, case_limit: float | None = None
) -> dict[str, Any]:
    """Run the cases (all, or those named in `only`) and return the figures (see `render_table`)."""
    names = list(only) if only else list(CASES)
    unknown = [n for n in names if n not in CASE_FUNCS]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; one of {', '.join(CASES)}")
    limit = case_limit or (60.0 if quick else 90.0)
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    began = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="egressd-exactly-once-") as tmp:
        ctx = Ctx(quick=quick, workdir=Path(tmp), quiet=quiet)
        for name in names:
            ctx.say(f"exactly-once: {name} ...")
            t0 = time.monotonic()
            mine: list[Row] = []
            try:
                await asyncio.wait_for(CASE_FUNCS[name](ctx, mine), limit)
            except TimeoutError:
                problem = f"did not finish within {limit:.0f} s"
            except Exception as exc:  # a broken case is a failed case, and the others still run
                problem = f"error: {type(exc).__name__}: {exc}"[:300]
            else:
                problem = ""
            if not mine:
                mine.append(Row(name))
            for row in mine:
                row.seconds = round(time.monotonic() - t0, 1)
                if not row.done:
                    row.ok = False
                    row.notes.append(problem or "did not finish")
                ctx.say(f"  {row.case}: {row.result} (counted {row.counted}, duplicates {row.duplicates})")
            rows.extend(mine)
    return {
        "started_at": started_at,
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "quick": quick,
        "seconds": round(time.monotonic() - began, 1),
        "cases": [r.to_dict() for r in rows],
        "duplicates": sum(r.duplicates or 0 for r in rows),
        "failed": [r.case for r in rows if r.result == "FAIL"],
        "ok": all(r.result != "FAIL" for r in rows),
    }


def _answers_cell(answers: Mapping[str, int]) -> str:
    return ", ".join(f"{n}x {label}" for label, n in answers.items()) or "-"


def render_table(fig: Mapping[str, Any]) -> str:
    m = fig["machine"]
    lines = [
        f"exactly once of {fig['started_at']}: {'quick' if fig['quick'] else 'full'} sizes, {fig['seconds']:.0f} s "
        f"({m['cpu']} x{m['cores']}, Python {m['python']})",
        "",
        "| case | calls/pairs | side effects expected | counted at the fake | duplicates | answers the app got "
        "| result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in fig["cases"]:
        counted = "-" if c["counted"] is None else str(c["counted"])
        dup = "-" if c["duplicates"] is None else str(c["duplicates"])
        lines.append(
            f"| {c['case']} | {c['calls']} | {c['expected']} | {counted} | {dup} | {_answers_cell(c['answers'])} | "
            f"{c['result']} |"
        )
    notes = [f"- {c['case']}: {note}" for c in fig["cases"] for note in c["notes"]]
    if notes:
        lines += ["", *notes]
    lines += [
        "",
        f"exactly once: {'PASS' if fig['ok'] else 'FAIL'} ({fig['duplicates']} duplicate side effects"
        + (f"; failed: {', '.join(fig['failed'])}" if fig["failed"] else "")
        + ")",
    ]
    return "\n".join(lines)


def quiet_logs() -> None:
    """egressd's and the fakes' own logs stay quiet: the output is the table."""
    for name in ("egressd", "aiohttp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
        logging.getLogger(name).propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (under 90 s)")
    parser.add_argument("--only", default=None, help=f"comma-separated cases: {', '.join(CASES)}")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()] if args.only else None
    if only and (bad := [c for c in only if c not in CASE_FUNCS]):
        parser.error(f"unknown case(s) {', '.join(bad)}; one of {', '.join(CASES)}")
    quiet_logs()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    figures = asyncio.run(run_exactly_once(quick=args.quick, only=only, quiet=args.quiet))
    print(render_table(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
