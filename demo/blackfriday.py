"""The Black-Friday simulation behind `egressd demo` (part 2).

Packaged fakes of Stripe, PayPal, SendGrid and Mailgun get real-looking limits and
outages; the same shop traffic (payments and e-mails) is sent twice: once straight to
the fakes by a naive retrying client, once through egressd running the shipped example
policies re-pointed at the fakes. The fakes' ledgers count what really happened (charges,
e-mails sent) per payment and per e-mail, so duplicates and losses are facts, not guesses.

The fakes also send their webhooks, as the providers do (signed, at least once, some events
delivered twice): straight to the shop's endpoints (`demo.app`) in the direct run, to
egressd's webhook listener in the other, which verifies, deduplicates, translates PayPal's
and Mailgun's events about failed-over payments and e-mails into Stripe's and SendGrid's
shape, and delivers to the same endpoints. The endpoints verify every delivery with the
providers' SDKs and count what they got per payment and per e-mail.

Simulated time runs `TIME_FACTOR` times faster than the clock: every duration in the
scenario, in the client and in the policies is divided by it and every rate multiplied
by it, so a provider limit of 100 requests per simulated second is enforced as 800 real
requests/s and the 20 s Stripe outage lasts 2.5 s of wall-clock time. Latencies are
reported in simulated time (measured x TIME_FACTOR).

Everything listens on and talks to 127.0.0.1 only, and every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import gc
import json
import math
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from demo.app import ShopProcess, ShopWebhooks
from fakes.courier import Courier
from fakes.sendgrid import SENDGRID_WEBHOOKS
from fakes.server import FakeServer, start_fakes, stop_fakes
from proxy.config.units import parse_duration, parse_rate
from proxy.outbox.store import Entry
from proxy.server import EgressServer, Settings

Mode = Literal["direct", "egressd"]
OutboxWhen = Literal["on_failure", "always"]

TIME_FACTOR = 8.0  # simulated seconds per wall-clock second
PROVIDER_LIMIT = 100.0  # requests per simulated second, at every fake provider
PROVIDER_BURST = 100  # one simulated second of traffic
FALLBACK_SLOWNESS = 0.3  # s (simulated): PayPal and Mailgun answer every call this late
SLOW_ANSWER = 12.0  # s (simulated): the slow spells' answers
NAIVE_RETRIES = 3  # the Mailgun SDK's default: 3 retries, POST included
NAIVE_BACKOFF = 1.0  # s (simulated), fixed; Retry-After ignored
NAIVE_TIMEOUT = 10.0  # s (simulated) per attempt
APP_TIMEOUT_BEHIND_EGRESSD = 60.0  # s (simulated): above every policy's timeouts.total
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
PAY_WORKERS = 64
MAIL_WORKERS = 100
STRIPE_KEY = "sk_test_blackfriday_not_a_secret"
SENDGRID_KEY = "SG.blackfriday-not-a-secret"
MAILGUN_KEY = "key-demo-not-a-secret"
MAIL_DOMAIN = "mg.example.com"
OUTBOX_PROBE_AFTER = "10s"  # simulated: how long the outbox waits before asking the provider after a doubt
REFUSED_PAYMENT_METHOD = "pm_card_mastercard"  # not in the shipped crosswalk: failover must refuse

# Webhooks (issue 15): the fakes send them as the providers do, the shop verifies them.
STRIPE_WEBHOOK_SECRET = "whsec_blackfriday_not_a_secret"
PAYPAL_WEBHOOK_ID = "WH-BLACKFRIDAY-0DEMO0NOT0A0SECRET"
MAILGUN_WEBHOOK_KEY = "mailgun-webhook-signing-key-demo-not-a-secret"
WEBHOOK_DELAY = 2.0  # s (simulated): an event's first POST comes this long after the API call
WEBHOOK_REDELIVER = 0.25  # a quarter of the events are delivered twice (providers deliver at least once)
# POSTs each provider has in flight at once. The webhooks' work in egressd shares this one
# event loop with the client, the fakes and the rest of egressd (a PayPal event costs egressd
# a verify call too); sent in bursts, it makes every other call of the simulation slower.
# Providers deliver to one endpoint a few at a time; so do the fakes here.
WEBHOOK_CONCURRENCY = 2
WEBHOOK_REDELIVER_AFTER = 5.0  # s (simulated) after the first delivery
WEBHOOK_ATTEMPTS = 4  # tries per delivery, then the fake gives up
WEBHOOK_BACKOFF = 4.0  # s (simulated) before the second try, doubling
WEBHOOK_TIMEOUT = 30.0  # s (simulated) per POST
SENDGRID_WEBHOOK_BATCH = 5.0  # s (simulated): SendGrid collects events this long into one POST
SENDGRID_WEBHOOK_BATCH_SIZE = 100
WEBHOOK_DRAIN_BOUND = 240.0  # s (simulated): the most the run waits for webhooks after the traffic

# Listening sockets per fake (fakes/server.py): the fakes share one event loop with the client
# and egressd, and uvloop accepts about one new connection per listening socket per turn of a
# busy loop, so the burst of new connections a mass failover opens to Mailgun waited up to
# seconds to be accepted, past Mailgun's attempt timeout. Real providers accept at once.
FAKE_LISTENERS = 8

PROVIDER_PATHS = {"stripe": "/v1/", "paypal": "/v2/", "sendgrid": "/v3/", "mailgun": "/v3/"}
PROVIDERS = ("stripe", "paypal", "sendgrid", "mailgun")
MAIL_UPSTREAMS = ("sendgrid", "mailgun")  # the upstreams with an outbox in the egressd run
APP_MAIL_UPSTREAM = "sendgrid"  # the one the shop sends its e-mail to


# --------------------------------------------------------------------------------------------
# the scenario


@dataclass(frozen=True)
class Scenario:
    """What happens when, in simulated seconds from the start of a run."""

    scale: float
    payments: int
    emails: int
    pay_window: float
    mail_window: float
    stripe_slow_at: float
    stripe_slow_count: int
    stripe_outage_at: float
    stripe_outage_len: float
    sendgrid_slow_at: float
    sendgrid_slow_count: int
    sendgrid_burst_at: float
    sendgrid_burst_len: float
    refused_index: int
    k: float = TIME_FACTOR

    @classmethod
    def build(cls, scale: float = 1.0) -> Scenario:
        """Scale 1: 2,000 payments over 60 s and 10,000 e-mails over 80 s (simulated).

        Counts and the traffic windows scale linearly (so rates stay Black-Friday rates);
        the outages scale too but never below a few seconds, so that they outlast egressd's
        retries and the failover shows at any scale.
        """
        if not 0.01 <= scale <= 20:
            raise ValueError("scale must be within 0.01..20")
        payments = max(20, round(2000 * scale))
        emails = max(50, round(10000 * scale))
        pay_window = 60.0 * scale
        mail_window = 80.0 * scale
        outage_at = pay_window / 3
        outage_len = max(20.0 * scale, 5.0)
        refused_at = outage_at + min(outage_len, pay_window) / 2
        return cls(
            scale=scale,
            payments=payments,
            emails=emails,
            pay_window=pay_window,
            mail_window=mail_window,
            stripe_slow_at=pay_window / 6,
            stripe_slow_count=max(3, round(20 * scale)),
            stripe_outage_at=outage_at,
            stripe_outage_len=outage_len,
            sendgrid_slow_at=mail_window * 0.15,
            sendgrid_slow_count=max(3, round(30 * scale)),
            sendgrid_burst_at=mail_window * 0.55,
            sendgrid_burst_len=max(8.0 * scale, 4.0),
            refused_index=min(payments - 1, math.floor(refused_at / pay_window * payments)),
        )

    def real(self, sim_seconds: float) -> float:
        return sim_seconds / self.k

    def pay_at(self, i: int) -> float:
        return self.pay_window * i / self.payments

    def mail_at(self, i: int) -> float:
        return self.mail_window * i / self.emails

    def windows(self) -> list[tuple[str, float, float]]:
        """The fault windows, for the charts: (label, start, end) in simulated seconds."""
        return [
            ("Stripe down (503)", self.stripe_outage_at, self.stripe_outage_at + self.stripe_outage_len),
            ("SendGrid 503 burst", self.sendgrid_burst_at, self.sendgrid_burst_at + self.sendgrid_burst_len),
        ]

    def describe(self) -> list[str]:
        k = self.k
        return [
            f"{self.payments} payments over {self.pay_window:g} s and {self.emails} e-mails over "
            f"{self.mail_window:g} s of simulated time (scale {self.scale:g}); simulated time runs {k:g}x "
            f"faster than the clock (every duration / {k:g}, every rate x {k:g})",
            f"every provider allows {PROVIDER_LIMIT:g} requests/s (burst {PROVIDER_BURST}), then answers 429 "
            f"with Retry-After in its own shape",
            f"Stripe: {self.stripe_slow_count} answers take {SLOW_ANSWER:g} s from t={self.stripe_slow_at:g} s; "
            f"down (503) from t={self.stripe_outage_at:g} s for {self.stripe_outage_len:g} s",
            f"SendGrid: {self.sendgrid_slow_count} answers take {SLOW_ANSWER:g} s from "
            f"t={self.sendgrid_slow_at:g} s; 503 burst from t={self.sendgrid_burst_at:g} s for "
            f"{self.sendgrid_burst_len:g} s",
            f"PayPal and Mailgun answer every call {FALLBACK_SLOWNESS * 1000:g} ms late",
            f"payment #{self.refused_index} (during the Stripe outage) uses {REFUSED_PAYMENT_METHOD}, "
            f"which has no PayPal vault entry in the crosswalk",
            f"naive client: {NAIVE_RETRIES} retries on 429/5xx/errors/timeouts, fixed {NAIVE_BACKOFF:g} s "
            f"backoff, Retry-After ignored, {NAIVE_TIMEOUT:g} s timeout; an Idempotency-Key per payment "
            f"(as Stripe's SDK sends), none for e-mail (SendGrid has none)",
            f"through egressd: the same client with its own retries off and a {APP_TIMEOUT_BEHIND_EGRESSD:g} s "
            f"timeout (docs/operations.md: let egressd retry)",
            f"webhooks: every fake sends its events as the provider does (Stripe payment_intent.succeeded, PayPal "
            f"PAYMENT.CAPTURE.COMPLETED, SendGrid delivered in batches, Mailgun delivered), signed, "
            f"{WEBHOOK_DELAY:g} s after the call, {WEBHOOK_CONCURRENCY} POSTs at a time per provider, up to "
            f"{WEBHOOK_ATTEMPTS} tries, and {WEBHOOK_REDELIVER:.0%} of the events delivered twice "
            f"({WEBHOOK_REDELIVER_AFTER:g} s apart: providers deliver at least once), from a process of their own; "
            f"the shop (a process of its own) has a Stripe and a SendGrid endpoint (verified with the providers' "
            f"SDKs), none for PayPal or Mailgun",
        ]


# --------------------------------------------------------------------------------------------
# policies for the egressd run


DURATION_PATHS = (
    ("timeouts", "connect"),
    ("timeouts", "attempt"),
    ("timeouts", "total"),
    ("retry", "backoff", "initial"),
    ("retry", "backoff", "max"),
    ("retry", "max_retry_after"),
    ("circuit_breaker", "window"),
    ("circuit_breaker", "open_for"),
    ("rate_limit", "queue", "max_wait"),
    ("outbox", "max_age"),
    ("outbox", "probe_after"),
)


def _get_path(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[dict[str, Any], str] | None:
    node: Any = doc
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node:
        return node, path[-1]
    return None


def compress_time(doc: dict[str, Any], k: float) -> dict[str, Any]:
    """A policy with every duration / k and every rate x k (simulated -> wall-clock time)."""
    out = copy.deepcopy(doc)
    for path in DURATION_PATHS:
        found = _get_path(out, path)
        if found is not None:
            node, key = found
            # Fixed-point: "%g" would write 24h / 8 as "1.08e+07ms", which is no duration.
            node[key] = f"{parse_duration(node[key]) * 1000 / k:.3f}".rstrip("0").rstrip(".") + "ms"
    found = _get_path(out, ("rate_limit", "rate"))
    if found is not None:
        node, key = found
        node[key] = f"{parse_rate(node[key]).per_second * k:.6g}/s"
    found = _get_path(out, ("retry", "budget", "min_per_second"))
    if found is not None:
        node, key = found
        node[key] = float(node[key]) * k
    return out


def demo_credentials(docs: Mapping[str, dict[str, Any]], fakes: Mapping[str, FakeServer]) -> list[str]:
    """Give the paypal and mailgun examples the fakes' demo credentials in place of the
    `${env:...}` ones the examples read (so the demo needs no secrets); returns the changes."""
    paypal = fakes["paypal"].url
    docs["paypal"]["auth"] = {
        "oauth_client_credentials": {
            "token_url": paypal + "/v1/oauth2/token",
            "client_id": "demo-client-id",
            "client_secret": "demo-client-secret",
        }
    }
    docs["mailgun"]["auth"] = {"basic": {"username": "api", "password": MAILGUN_KEY}}
    return [
        "paypal: oauth_client_credentials with the fake PayPal's demo client "
        "(example: ${env:PAYPAL_CLIENT_ID}, ${env:PAYPAL_CLIENT_SECRET})",
        "mailgun: basic auth with a demo key (example: ${env:MAILGUN_API_KEY})",
    ]


def simulation_policies(
    examples: Mapping[str, dict[str, Any]],
    fakes: Mapping[str, FakeServer],
    k: float,
    *,
    outbox_when: OutboxWhen = "on_failure",
    webhooks: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The shipped example policies re-pointed at the fakes; returns the changes made, too.
    `outbox_when` is the e-mail outbox's `when` (the demo runs `on_failure`; the tests
    also run `always`, which keeps every send); `webhooks`: a `webhooks` block per upstream
    (`webhook_blocks`)."""
    docs = {name: copy.deepcopy(examples[name]) for name in PROVIDERS}
    for name, doc in docs.items():
        doc["target"] = fakes[name].url
        doc.pop("listen", None)
    changes = ["targets point at the local fakes; failover blocks kept as shipped"]
    changes += demo_credentials(docs, fakes)
    for name in ("sendgrid", "mailgun"):
        docs[name].setdefault("rate_limit", {})["rate"] = "90/s"
    changes.append(
        f"sendgrid, mailgun: rate_limit 90/s (examples: 600/m, 300/m) because the fakes allow {PROVIDER_LIMIT:g}/s"
    )
    for name in ("sendgrid", "mailgun"):
        outbox = dict(docs[name].get("outbox") or {})  # the examples ship it commented out
        outbox.update(when=outbox_when, probe_after=OUTBOX_PROBE_AFTER)
        if outbox_when == "on_failure":
            outbox["keep_in_doubt"] = True
        docs[name]["outbox"] = outbox
    kept = (
        "a send that failed without reaching the provider, or whose outcome is ambiguous (a 503: kept in "
        "doubt, and the provider is asked before any resend), is kept"
        if outbox_when == "on_failure"
        else "every send is kept"
    )
    doubt = ", keep_in_doubt: true" if outbox_when == "on_failure" else ""
    changes.append(
        f"sendgrid, mailgun: outbox {{when: {outbox_when}{doubt}, probe_after: {OUTBOX_PROBE_AFTER}}}: {kept}, "
        "answered 202 and delivered later (probe_after: the default 60s would outlast the simulation)"
    )
    if webhooks:
        for name, block in webhooks.items():
            docs[name]["webhooks"] = dict(block)
        changes.append(
            "stripe, sendgrid: webhooks {deliver_to: the shop's endpoint, secret / public_key: the fake's, "
            "signing_key: one made for the run}; paypal, mailgun: webhooks {webhook_id / secret} only (their "
            "events about failed-over payments and e-mails are translated and go to the primary's deliver_to); "
            "egressd run with --webhook-listen, the fakes' webhooks pointed at it"
        )
    changes.append(f"every duration / {k:g} and every rate x {k:g} (simulated time runs {k:g}x faster)")
    return [compress_time(doc, k) for doc in docs.values()], changes


def fake_options(sc: Scenario) -> dict[str, dict[str, Any]]:
    """The fakes' options for a run: Black-Friday limits and webhooks as the providers send them
    (their URL is set once the receiver runs)."""

    def hooks() -> dict[str, Any]:
        return {
            "delay": sc.real(WEBHOOK_DELAY),
            "redeliver": WEBHOOK_REDELIVER,
            "redeliver_after": sc.real(WEBHOOK_REDELIVER_AFTER),
            "attempts": WEBHOOK_ATTEMPTS,
            "backoff": sc.real(WEBHOOK_BACKOFF),
            "timeout": sc.real(WEBHOOK_TIMEOUT),
            "concurrency": WEBHOOK_CONCURRENCY,
        }

    return {
        "stripe": {"webhooks": hooks(), "webhook_secret": STRIPE_WEBHOOK_SECRET, "listeners": FAKE_LISTENERS},
        "paypal": {"webhooks": hooks(), "webhook_id": PAYPAL_WEBHOOK_ID, "listeners": FAKE_LISTENERS},
        "sendgrid": {
            "rate_limit": int(PROVIDER_LIMIT * sc.k * 60),
            "webhooks": hooks(),
            "webhook_batch": sc.real(SENDGRID_WEBHOOK_BATCH),
            "webhook_batch_size": SENDGRID_WEBHOOK_BATCH_SIZE,
            "listeners": FAKE_LISTENERS,
        },
        "mailgun": {"webhooks": hooks(), "webhook_signing_key": MAILGUN_WEBHOOK_KEY, "listeners": FAKE_LISTENERS},
    }


def signing_key() -> tuple[str, str]:
    """A P-256 key for egressd to sign SendGrid deliveries with: (PEM private, base64 DER public)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def webhook_blocks(
    app_url: str, fakes: Mapping[str, FakeServer], sendgrid_signing_pem: str
) -> dict[str, dict[str, Any]]:
    """The `webhooks` blocks of the egressd run (docs/webhooks.md, setup per provider)."""
    return {
        "stripe": {"deliver_to": app_url + "/webhooks/stripe", "secret": STRIPE_WEBHOOK_SECRET},
        "paypal": {"webhook_id": PAYPAL_WEBHOOK_ID},
        "sendgrid": {
            "deliver_to": app_url + "/webhooks/sendgrid",
            "public_key": fakes["sendgrid"].app[SENDGRID_WEBHOOKS].public_key,
            "signing_key": sendgrid_signing_pem,
        },
        "mailgun": {"secret": MAILGUN_WEBHOOK_KEY},
    }


# --------------------------------------------------------------------------------------------
# one run


@dataclass
class Outcome:
    """What the app saw for one payment or e-mail."""

    kind: Literal["pay", "mail"]
    index: int
    status: int | None = None  # the last answer's status; None: no answer (error, timeout)
    error: str | None = None
    attempts: int = 0
    latency: float = 0.0  # simulated seconds, first try to final answer
    upstream: str | None = None  # X-Egressd-Upstream
    failover: str | None = None  # X-Egressd-Failover
    outbox_id: str | None = None  # X-Egressd-Outbox: queued; id=ID (the outbox kept the send)

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Tally:
    total: int
    delivered: int  # happened at least once at some provider
    duplicated: int  # happened more than once
    extra: int  # side effects beyond the first
    lost: int  # never happened
    refused: int  # lost, and egressd refused the failover (a documented honesty rule)
    kept_lost: int  # lost, though the outbox accepted it: it ended ambiguous or dead (listed)
    savable: int  # lost, neither refused nor accounted for by the outbox
    failovers: int
    app_errors: int  # the app was told it failed (it may still have happened)
    app_errors_but_done: int
    p50: float
    p99: float


@dataclass(frozen=True)
class KeptSend:
    """A send the outbox kept, as the outbox store and the fakes saw it at the end of the run."""

    index: int  # the e-mail's number (its email_id); -1 when its body no longer tells
    id: str  # the outbox id
    state: str  # the store's state at the end; "missing" when the store no longer had it
    upstream: str
    via: str  # delivered: the upstream that took it
    attempts: int
    sent_to: tuple[str, ...]
    last_error: str
    effects: int  # times the fakes' ledgers show the e-mail
    answered: bool = True  # the app got this id (X-Egressd-Outbox); False: the app never saw it
    #                        (it gave up before the 202, or the fallback's outbox kept it in a failover)


#: Outbox states that leave a send undelivered yet accounted for: the operator has it.
ACCOUNTED = ("ambiguous", "dead")


@dataclass
class OutboxTally:
    """The e-mails the outbox kept, by what became of them (contract 7.6)."""

    accepted: int = 0  # kept and answered 202 (the app got X-Egressd-Outbox)
    delivered_later: int = 0  # delivered by the outbox to the upstream the app called
    failed_over_later: int = 0  # delivered by the outbox through the failover
    ambiguous: int = 0  # may have reached the provider; not resent, left for the operator
    dead: int = 0  # refused by the provider, or past max_age
    pending: int = 0  # still waiting at the end of the run (or missing from the store)
    # Kept sends whose id the app never got, by state: sends to the app's upstream it gave up
    # on before the 202 (a timeout), and sends the fallback's own outbox kept in a failover.
    unanswered: dict[str, int] = field(default_factory=dict)
    in_failover: dict[str, int] = field(default_factory=dict)
    results: dict[str, int] = field(default_factory=dict)  # the worker's counts, e-mail upstreams summed
    drain_wall: float = 0.0  # wall-clock seconds waited for the outbox after the app traffic ended
    drain_bound: float = 0.0  # the most the run waits for it (wall clock)
    drained: bool = True  # nothing pending when the wait ended
    undelivered: list[KeptSend] = field(default_factory=list)  # every kept send the fakes do not show

    @property
    def consistent(self) -> bool:
        parts = self.delivered_later + self.failed_over_later + self.ambiguous + self.dead + self.pending
        return self.accepted == parts


@dataclass
class WebhookTally:
    """What the shop's webhook endpoints got, per payment and per e-mail that happened.

    Raw deliveries: the shop deduplicates nothing in these counts, so an event that reached
    it twice (a provider's redelivery egressd did not absorb, or the naive run) counts twice."""

    pay_once: int = 0  # payments that happened with exactly one verified payment_intent.succeeded
    pay_twice: int = 0  # ... with two or more
    pay_none: int = 0  # ... with none
    pay_none_failed_over: int = 0  # ... with none, of which failed over to PayPal
    pay_none_app_failed: int = 0  # ... with none, of which the app was told the payment failed
    pay_translated: int = 0  # payments whose event came translated from PayPal
    pay_stray: int = 0  # succeeded events about payments that never happened (0 expected)
    mail_once: int = 0  # e-mails that happened with exactly one verified SendGrid delivered event
    mail_twice: int = 0
    mail_none: int = 0
    mail_none_app_failed: int = 0  # ... with none, of which the app was told the send failed
    mail_translated: int = 0  # e-mails whose event came translated from Mailgun
    mail_stray: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # events the fakes made, per provider
    posts: dict[str, int] = field(default_factory=dict)  # 2xx POSTs of them, per provider (redeliveries too)
    given_up: int = 0  # deliveries a fake gave up after all its tries
    absorbed: dict[str, int] = field(default_factory=dict)  # through egressd: redeliveries answered "duplicate"
    egressd: dict[str, int] = field(default_factory=dict)  # through egressd: the listener's and worker's counts
    refused: int = 0  # deliveries the shop's signature check refused
    unknown: int = 0  # POSTs to a path the shop does not serve (PayPal's, Mailgun's in the naive run)
    pending: int = 0  # events egressd still held when the wait ended
    drained: bool = True
    drain_wall: float = 0.0
    verifiers: dict[str, str] = field(default_factory=dict)

    @property
    def absorbed_pay(self) -> int:
        return self.absorbed.get("stripe", 0) + self.absorbed.get("paypal", 0)

    @property
    def absorbed_mail(self) -> int:
        return self.absorbed.get("sendgrid", 0) + self.absorbed.get("mailgun", 0)


@dataclass
class RunResult:
    mode: Mode
    pay: Tally
    mail: Tally
    provider_429: int
    mail_429: int  # of which on the e-mail upstreams (SendGrid, Mailgun)
    provider_requests: dict[str, int]
    effects: dict[str, int]
    refusals: list[str]
    wall: float
    sim_length: float
    timed_out: bool
    timeline: dict[str, list[int]] = field(default_factory=dict)  # per simulated second
    outbox: OutboxTally | None = None  # through egressd only
    webhooks: WebhookTally | None = None

    @property
    def duplicates(self) -> int:
        return self.pay.duplicated + self.mail.duplicated


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def payment_form(i: int, sc: Scenario) -> dict[str, str]:
    # Every payment has its own amount (10.00 USD + i cents): the fakes' ledgers record
    # amounts on both Stripe and PayPal, so a charge can be traced to its order anywhere.
    method = REFUSED_PAYMENT_METHOD if i == sc.refused_index else "pm_card_visa"
    return {
        "amount": str(1000 + i),
        "currency": "usd",
        "payment_method": method,
        "confirm": "true",
        "description": f"Black Friday order {i}",
        "metadata[order_id]": str(i),
    }


def mail_body(i: int) -> dict[str, Any]:
    return {
        "personalizations": [{"to": [{"email": f"customer{i}@example.org", "name": f"Customer {i}"}]}],
        "from": {"email": "shop@example.com", "name": "Shop"},
        "subject": f"Black Friday: your order {i}",
        "content": [
            {"type": "text/plain", "value": f"Thanks for order {i}."},
            {"type": "text/html", "value": f"<p>Thanks for order <b>{i}</b>.</p>"},
        ],
        "categories": ["black-friday"],
        "custom_args": {"email_id": str(i)},
    }


def outbox_id(header: str | None) -> str | None:
    """The id in `X-Egressd-Outbox: queued; id=ID`, or None."""
    for part in (header or "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == "id" and value:
            return value
    return None


async def send(
    session: aiohttp.ClientSession,
    out: Outcome,
    url: str,
    *,
    headers: dict[str, str],
    retries: int,
    attempt_timeout: float,
    backoff: float,
    k: float,
    data: Any = None,
    json_body: Any = None,
) -> None:
    """The naive client: resend on 429/5xx/errors/timeouts after a fixed pause."""
    began = time.monotonic()
    client_timeout = aiohttp.ClientTimeout(total=attempt_timeout)
    for attempt in range(retries + 1):
        out.attempts = attempt + 1
        try:
            async with session.post(url, headers=headers, data=data, json=json_body, timeout=client_timeout) as resp:
                await resp.read()
                out.status, out.error = resp.status, None
                out.upstream = resp.headers.get("X-Egressd-Upstream")
                out.failover = resp.headers.get("X-Egressd-Failover")
                out.outbox_id = outbox_id(resp.headers.get("X-Egressd-Outbox"))
        except (TimeoutError, aiohttp.ClientError) as exc:
            out.status, out.error = None, type(exc).__name__
        if out.status is not None and out.status not in RETRY_STATUSES:
            break
        if attempt < retries:
            await asyncio.sleep(backoff)
    out.latency = (time.monotonic() - began) * k


async def _feed(
    queue: asyncio.Queue[int | None], count: int, at: Callable[[int], float], t0: float, workers: int
) -> None:
    for i in range(count):
        delay = t0 + at(i) - time.monotonic()
        if delay > 0.001:
            await asyncio.sleep(delay)
        queue.put_nowait(i)
    for _ in range(workers):
        queue.put_nowait(None)


async def _scenario(sc: Scenario, fakes: Mapping[str, FakeServer], t0: float) -> None:
    events: list[tuple[float, Callable[[], object]]] = [
        (
            sc.stripe_slow_at,
            lambda: fakes["stripe"].faults.delay(
                sc.real(SLOW_ANSWER), phase="after", count=sc.stripe_slow_count, path="/v1/"
            ),
        ),
        (sc.stripe_outage_at, lambda: fakes["stripe"].faults.outage(sc.real(sc.stripe_outage_len), path="/v1/")),
        (
            sc.sendgrid_slow_at,
            lambda: fakes["sendgrid"].faults.delay(
                sc.real(SLOW_ANSWER), phase="after", count=sc.sendgrid_slow_count, path="/v3/"
            ),
        ),
        (
            sc.sendgrid_burst_at,
            lambda: fakes["sendgrid"].faults.outage(sc.real(sc.sendgrid_burst_len), status=503, path="/v3/"),
        ),
    ]
    for at, action in sorted(events, key=lambda e: e[0]):
        delay = t0 + sc.real(at) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        action()


def _base_faults(sc: Scenario, fakes: Mapping[str, FakeServer]) -> None:
    for name, prefix in PROVIDER_PATHS.items():
        fakes[name].faults.rate_limit(PROVIDER_LIMIT * sc.k, burst=PROVIDER_BURST, path=prefix)
    for name in ("paypal", "mailgun"):
        fakes[name].faults.delay(sc.real(FALLBACK_SLOWNESS), phase="before", path=PROVIDER_PATHS[name])


def _tally(
    outcomes: list[Outcome],
    effects: Counter[int],
    failover_from: str,
    fallback: str,
    kept: Mapping[int, KeptSend] | None = None,
) -> Tally:
    kept = kept or {}
    lost = [o for o in outcomes if effects[o.index] == 0]
    refused = [o for o in lost if (o.failover or "").startswith("refused")]
    # The app was told "accepted" (202): a kept send that never happened is lost. The
    # outbox accounts for it only when it says so (ambiguous, dead); one still pending, or
    # that the store calls delivered while no provider has it, is lost unaccounted.
    kept_lost = [o for o in lost if o.index in kept and kept[o.index].state in ACCOUNTED]
    errors = [o for o in outcomes if not o.ok]
    return Tally(
        total=len(outcomes),
        delivered=sum(1 for o in outcomes if effects[o.index] > 0),
        duplicated=sum(1 for o in outcomes if effects[o.index] > 1),
        extra=sum(max(0, effects[o.index] - 1) for o in outcomes),
        lost=len(lost),
        refused=len(refused),
        kept_lost=len(kept_lost),
        savable=len(lost) - len(refused) - len(kept_lost),
        failovers=sum(
            1
            for o in outcomes
            if o.ok and o.upstream == fallback and (o.failover or "").startswith(f"used; from={failover_from}")
        ),
        app_errors=len(errors),
        app_errors_but_done=sum(1 for o in errors if effects[o.index] > 0),
        p50=percentile([o.latency for o in outcomes], 0.50),
        p99=percentile([o.latency for o in outcomes], 0.99),
    )


def outbox_drain_bound(sc: Scenario) -> float:
    """How long (simulated seconds) the run waits for the outbox after the app traffic ends:
    every e-mail once more at the provider limit, a few probes, and a minute of slack."""
    return sc.emails / PROVIDER_LIMIT + 6 * parse_duration(OUTBOX_PROBE_AFTER) + 60.0


async def drain_outbox(server: EgressServer, sc: Scenario) -> tuple[float, bool]:
    """Wait until the outbox holds nothing pending, or the bound; (seconds waited, drained).
    Polled every 0.1 s: the store's stats read every entry, and the worker shares the loop."""
    began = time.monotonic()
    deadline = began + sc.real(outbox_drain_bound(sc))
    while True:
        stats = await server.outbox_store.stats(time.time())
        if sum(st.pending for st in stats.values()) == 0:
            return time.monotonic() - began, True
        if time.monotonic() >= deadline:
            return time.monotonic() - began, False
        await asyncio.sleep(0.1)


def entry_email_index(body: bytes) -> int:
    """The e-mail's number in a kept send: SendGrid `custom_args.email_id`, Mailgun
    `v:email_id` (a failed-over send); -1 when the body does not tell (a delivered
    entry keeps no body)."""
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            return int((data.get("custom_args") or {}).get("email_id", -1))
    except ValueError:
        pass
    try:
        values = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("v:email_id") or ["-1"]
        return int(values[0])
    except ValueError:
        return -1


async def kept_sends(
    server: EgressServer, outcomes: list[Outcome], effects: Counter[int]
) -> tuple[dict[int, KeptSend], list[KeptSend]]:
    """What the outbox store says of every send it kept: those whose id the app got (by
    e-mail number), and those the app never saw an id for (kept by the fallback's own
    outbox inside a failover)."""
    entries: dict[str, Entry] = {}
    for name in MAIL_UPSTREAMS:
        for e in await server.outbox_store.list(upstream=name, limit=10 * len(outcomes) + 100):
            entries[e.id] = e

    def kept(index: int, entry_id: str, e: Entry | None, answered: bool) -> KeptSend:
        return KeptSend(
            index=index,
            id=entry_id,
            state=e.state if e is not None else "missing",
            upstream=e.upstream if e is not None else "",
            via=e.delivered_via if e is not None else "",
            attempts=e.attempts if e is not None else 0,
            sent_to=tuple(e.sent_to) if e is not None else (),
            last_error=e.last_error if e is not None else "",
            effects=effects[index] if index >= 0 else 0,
            answered=answered,
        )

    seen: dict[int, KeptSend] = {}
    for o in outcomes:
        if o.outbox_id is not None:
            seen[o.index] = kept(o.index, o.outbox_id, entries.pop(o.outbox_id, None), True)
    others = [kept(entry_email_index(e.body), e.id, e, False) for e in entries.values()]
    return seen, others


def outbox_tally(
    kept: Mapping[int, KeptSend],
    others: list[KeptSend],
    counts: Mapping[tuple[str, str], int],
    upstreams: tuple[str, ...],
) -> OutboxTally:
    t = OutboxTally(accepted=len(kept))
    for k in kept.values():
        if k.state == "delivered":
            if k.via and k.via != k.upstream:
                t.failed_over_later += 1
            else:
                t.delivered_later += 1
        elif k.state == "ambiguous":
            t.ambiguous += 1
        elif k.state == "dead":
            t.dead += 1
        else:
            t.pending += 1
        if k.effects == 0:  # the fakes do not have it, whatever the store says: listed
            t.undelivered.append(k)
    for k in others:
        unseen = t.unanswered if k.upstream == APP_MAIL_UPSTREAM else t.in_failover
        unseen[k.state] = unseen.get(k.state, 0) + 1
        if k.state != "delivered" and (k.index < 0 or k.effects == 0):
            t.undelivered.append(k)
    for (upstream, result), n in counts.items():
        if upstream in upstreams:
            t.results[result] = t.results.get(result, 0) + n
    return t


async def drain_webhooks(
    fakes: Mapping[str, FakeServer], server: EgressServer | None, sc: Scenario
) -> tuple[float, bool, int]:
    """Wait until the fakes have sent every webhook (retries and redeliveries included) and
    egressd holds none undelivered, within a bound; (seconds waited, drained, still pending)."""
    began = time.monotonic()
    deadline = began + sc.real(WEBHOOK_DRAIN_BOUND)
    for fake in fakes.values():
        if not await fake.webhooks.drain(max(0.0, deadline - time.monotonic())):
            return time.monotonic() - began, False, 0
    if server is None:
        return time.monotonic() - began, True, 0
    while True:
        stats = await server.webhook_store.stats(time.time())
        pending = sum(st.pending for st in stats.values())
        if pending == 0:
            return time.monotonic() - began, True, 0
        if time.monotonic() >= deadline:
            return time.monotonic() - began, False, pending
        await asyncio.sleep(0.05)


def webhook_tally(
    seen: ShopWebhooks,
    fakes: Mapping[str, FakeServer],
    pays: list[Outcome],
    pay_fx: Counter[int],
    mail_fx: Counter[int],
    mails: list[Outcome] | None = None,
) -> WebhookTally:
    """Per payment and per e-mail that happened, how many verified events reached the shop."""
    t = WebhookTally(verifiers=dict(seen.verifiers))
    mails = mails or []
    per_pay = seen.succeeded_per_payment()
    translated_pay = {d.amount - 1000 for d in seen.stripe if d.translated_from}
    failed_over = {o.index for o in pays if o.upstream == "paypal"}
    for i in range(len(pays)):
        if pay_fx[i] == 0:
            continue
        n = per_pay[i]
        t.pay_once += n == 1
        t.pay_twice += n >= 2
        t.pay_none += n == 0
        t.pay_none_failed_over += n == 0 and i in failed_over
        t.pay_none_app_failed += n == 0 and not pays[i].ok
        t.pay_translated += i in translated_pay
    t.pay_stray = sum(1 for i in per_pay if pay_fx[i] == 0)
    per_mail = seen.delivered_per_mail()
    translated_mail = {d.email_id for d in seen.mail if d.translated_from}
    for i, done in mail_fx.items():
        if i < 0 or done == 0:
            continue
        n = per_mail[i]
        t.mail_once += n == 1
        t.mail_twice += n >= 2
        t.mail_none += n == 0
        t.mail_none_app_failed += n == 0 and 0 <= i < len(mails) and not mails[i].ok
        t.mail_translated += i in translated_mail
    t.mail_stray = sum(1 for i in per_mail if mail_fx[i] == 0)
    for name, fake in fakes.items():
        t.sent[name] = len(fake.webhooks.events)
        t.posts[name] = sum(fake.webhooks.delivered().values())
        t.given_up += len(fake.webhooks.failed())
    t.refused = sum(seen.refused.values())
    t.unknown = sum(seen.unknown.values())
    return t


def _ledger_facts(
    fakes: Mapping[str, FakeServer], t0_wall: float, k: float
) -> tuple[Counter[int], Counter[int], dict[str, int], dict[str, list[int]]]:
    """Side effects per payment and per e-mail, effects per provider, and a per-second timeline."""
    pay: Counter[int] = Counter()
    mail: Counter[int] = Counter()
    per_provider: dict[str, int] = {}
    timeline: dict[str, Counter[int]] = {name: Counter() for name in (*PROVIDERS, "429")}

    def second(t: float) -> int:
        return max(0, int((t - t0_wall) * k))

    kinds = {
        "stripe": "charge.succeeded",
        "paypal": "order.captured",
        "sendgrid": "mail.sent",
        "mailgun": "message.queued",
    }
    for name, kind in kinds.items():
        effects = fakes[name].ledger.effects(kind)
        per_provider[name] = len(effects)
        for e in effects:
            timeline[name][second(e.t)] += 1
            if name == "stripe":
                pay[int(e.data["amount"]) - 1000] += 1
            elif name == "paypal":
                pay[round(float(e.data["amount"]) * 100) - 1000] += 1
            elif name == "sendgrid":
                mail[int((e.data.get("custom_args") or {}).get("email_id", -1))] += 1
            else:
                values = (e.data.get("fields") or {}).get("v:email_id") or ["-1"]
                mail[int(values[0])] += 1
        for r in fakes[name].ledger.requests:
            if r.status == 429:
                timeline["429"][second(r.t)] += 1
    length = max([0, *(s + 1 for c in timeline.values() for s in c)])
    series = {name: [c[s] for s in range(length)] for name, c in timeline.items()}
    return pay, mail, per_provider, series


async def run_once(
    mode: Mode,
    sc: Scenario,
    examples: Mapping[str, dict[str, Any]],
    *,
    outbox_when: OutboxWhen = "on_failure",
    webhooks: bool = True,
) -> tuple[RunResult, list[str]]:
    """One run of the whole shop traffic, straight to the fakes or through egressd; with
    `webhooks`, the fakes send theirs (to the shop, or to egressd) and the shop counts them."""
    fakes = await start_fakes(PROVIDERS, options=fake_options(sc))
    server: EgressServer | None = None
    shop: ShopProcess | None = None
    courier: Courier | None = None
    changes: list[str] = []
    tmp = tempfile.TemporaryDirectory(prefix="egressd-blackfriday-")
    try:
        pem, egressd_public = signing_key()
        if webhooks:
            # The providers' webhooks leave from a process of their own, as from the providers'
            # machines: this event loop (client, fakes, egressd) does not pay for sending them.
            courier = await Courier().start()
            for fake in fakes.values():
                fake.webhooks.courier = courier
            # Through egressd, the shop checks SendGrid deliveries with egressd's key (egressd
            # signs them: docs/webhooks.md, the recommended setup); directly, with SendGrid's.
            sendgrid_public = fakes["sendgrid"].app[SENDGRID_WEBHOOKS].public_key
            shop = await ShopProcess(
                STRIPE_WEBHOOK_SECRET, egressd_public if mode == "egressd" else sendgrid_public
            ).start()
        if mode == "egressd":
            policies, changes = simulation_policies(
                examples,
                fakes,
                sc.k,
                outbox_when=outbox_when,
                webhooks=webhook_blocks(shop.url, fakes, pem) if shop is not None else None,
            )
            (Path(tmp.name) / "shop.yaml").write_text(yaml.safe_dump_all(policies, sort_keys=False))
            server = EgressServer(
                Settings(
                    policies=Path(tmp.name),
                    listen=("127.0.0.1", 0),
                    admin=("127.0.0.1", 0),
                    webhook_listen=("127.0.0.1", 0) if shop is not None else None,
                    drain=0.0,
                )
            )
            await server.start()
            host, port = server.addresses["main"]
            stripe_url = f"http://{host}:{port}/stripe"
            sendgrid_url = f"http://{host}:{port}/sendgrid"
            retries, timeout = 0, sc.real(APP_TIMEOUT_BEHIND_EGRESSD)
            if shop is not None:  # the providers' dashboards point at egressd
                hook_host, hook_port = server.addresses["webhooks"]
                for name, fake in fakes.items():
                    fake.webhooks.settings.url = f"http://{hook_host}:{hook_port}/{name}"
        else:
            stripe_url, sendgrid_url = fakes["stripe"].url, fakes["sendgrid"].url
            retries, timeout = NAIVE_RETRIES, sc.real(NAIVE_TIMEOUT)
            if shop is not None:  # the providers post to the shop; it has no PayPal or Mailgun endpoint
                for name, fake in fakes.items():
                    fake.webhooks.settings.url = f"{shop.url}/webhooks/{name}"
        _base_faults(sc, fakes)

        pays = [Outcome("pay", i) for i in range(sc.payments)]
        mails = [Outcome("mail", i) for i in range(sc.emails)]
        pay_q: asyncio.Queue[int | None] = asyncio.Queue()
        mail_q: asyncio.Queue[int | None] = asyncio.Queue()
        backoff = sc.real(NAIVE_BACKOFF)

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def pay_worker() -> None:
                while (i := await pay_q.get()) is not None:
                    await send(
                        session,
                        pays[i],
                        stripe_url + "/v1/payment_intents",
                        headers={"Authorization": "Bearer " + STRIPE_KEY, "Idempotency-Key": f"order-{i}-payment"},
                        data=payment_form(i, sc),
                        retries=retries,
                        attempt_timeout=timeout,
                        backoff=backoff,
                        k=sc.k,
                    )

            async def mail_worker() -> None:
                while (i := await mail_q.get()) is not None:
                    await send(
                        session,
                        mails[i],
                        sendgrid_url + "/v3/mail/send",
                        headers={"Authorization": "Bearer " + SENDGRID_KEY},
                        json_body=mail_body(i),
                        retries=retries,
                        attempt_timeout=timeout,
                        backoff=backoff,
                        k=sc.k,
                    )

            # A full garbage collection over the ledgers' objects stalls the event loop for
            # ~0.1 s, almost a simulated second: collect now, then not during the traffic.
            gc.collect()
            if sc.scale <= 2:  # bigger runs keep the collector: memory over smoothness
                gc.disable()
            t0 = time.monotonic()
            t0_wall = time.time()
            tasks = [
                asyncio.create_task(_feed(pay_q, sc.payments, lambda i: sc.real(sc.pay_at(i)), t0, PAY_WORKERS)),
                asyncio.create_task(_feed(mail_q, sc.emails, lambda i: sc.real(sc.mail_at(i)), t0, MAIL_WORKERS)),
                *(asyncio.create_task(pay_worker()) for _ in range(PAY_WORKERS)),
                *(asyncio.create_task(mail_worker()) for _ in range(MAIL_WORKERS)),
            ]
            scenario = asyncio.create_task(_scenario(sc, fakes, t0))
            # Bounded: at worst every call uses all its tries and timeouts, plus slack.
            expected = max(sc.emails / PROVIDER_LIMIT, sc.mail_window, sc.pay_window) * 3 + 4 * NAIVE_TIMEOUT
            done, pending = await asyncio.wait(tasks, timeout=sc.real(expected) + 10)
            timed_out = bool(pending)
            for task in (*pending, scenario):
                task.cancel()
            await asyncio.gather(*pending, scenario, return_exceptions=True)
            for task in done:
                failure = task.exception()
                if failure is not None:
                    raise failure
            wall = time.monotonic() - t0
            gc.enable()
        drain: tuple[float, bool] = (0.0, True)
        if server is not None:
            # Sends the outbox kept were answered 202; they count once the fakes have them.
            drain = await drain_outbox(server, sc)
        hooks_wall, hooks_drained, hooks_pending = await drain_webhooks(fakes, server, sc)
        pay_fx, mail_fx, per_provider, timeline = _ledger_facts(fakes, t0_wall, sc.k)
        hooks: WebhookTally | None = None
        if shop is not None:
            hooks = webhook_tally(await shop.seen(), fakes, pays, pay_fx, mail_fx, mails)
            hooks.drain_wall, hooks.drained, hooks.pending = hooks_wall, hooks_drained, hooks_pending
        if server is not None and hooks is not None:
            upstreams = (await server.status_data())["upstreams"]
            for name in PROVIDERS:
                counts = upstreams.get(name, {}).get("webhooks") or {}
                hooks.absorbed[name] = int(counts.get("duplicate", 0))
                for kind in ("received", "duplicate", "rejected", "delivered", "translated", "dropped", "dead"):
                    hooks.egressd[kind] = hooks.egressd.get(kind, 0) + int(counts.get(kind, 0))
        kept: dict[int, KeptSend] = {}
        others: list[KeptSend] = []
        outbox: OutboxTally | None = None
        if server is not None:
            kept, others = await kept_sends(server, mails, mail_fx)
            outbox = outbox_tally(kept, others, server.outbox.counts, MAIL_UPSTREAMS)
            outbox.drain_wall, outbox.drained = drain
            outbox.drain_bound = sc.real(outbox_drain_bound(sc))
        result = RunResult(
            mode=mode,
            pay=_tally(pays, pay_fx, "stripe", "paypal"),
            mail=_tally(mails, mail_fx, "sendgrid", "mailgun", {**{k.index: k for k in others}, **kept}),
            provider_429=sum(1 for f in fakes.values() for r in f.ledger.requests if r.status == 429),
            mail_429=sum(1 for name in MAIL_UPSTREAMS for r in fakes[name].ledger.requests if r.status == 429),
            provider_requests={name: len(f.ledger.requests) for name, f in fakes.items()},
            effects=per_provider,
            refusals=sorted(
                {
                    # `refused; reason=R` or `refused; reason=R; detail=D`: the reason alone
                    (o.failover or "").split("reason=", 1)[-1].split(";", 1)[0].strip()
                    for o in pays + mails
                    if (o.failover or "").startswith("refused")
                }
            ),
            wall=wall,
            sim_length=wall * sc.k,
            timed_out=timed_out,
            timeline=timeline,
            outbox=outbox,
            webhooks=hooks,
        )
        return result, changes
    finally:
        gc.enable()
        if server is not None:
            with contextlib.suppress(Exception):
                await server.stop()
        await stop_fakes(fakes)
        if courier is not None:
            await courier.stop()
        if shop is not None:
            await shop.stop()
        tmp.cleanup()


# --------------------------------------------------------------------------------------------
# verdict and the printed report


def verdict(through: RunResult) -> tuple[bool, str]:
    """Exit-status rule: egressd's run has no duplicates, no savable losses, no provider 429
    on the e-mail upstreams (their outbox and rate limits keep under the limit), and, when
    the webhooks ran, every payment that happened got exactly one verified
    payment_intent.succeeded at the app (none, or two, fails the run). The e-mail webhook
    row is shown, not ruled on: an e-mail a failover sent while the app was told it failed
    has no id egressd can translate Mailgun's event to (it is counted as dropped)."""
    savable = through.pay.savable + through.mail.savable
    ok = through.duplicates == 0 and savable == 0 and through.mail_429 == 0 and not through.timed_out
    why = (
        f"egressd's run: {through.duplicates} duplicates, {savable} lost calls egressd could have saved, "
        f"{through.mail_429} provider 429s on the e-mail upstreams"
        + (" (the run hit its time bound)" if through.timed_out else "")
    )
    hooks = through.webhooks
    if hooks is not None:  # the webhooks ran
        off = hooks.pay_none + hooks.pay_twice
        ok = ok and off == 0 and hooks.drained
        why += f", {off} payments without exactly one verified payment_intent.succeeded at the app"
        if not hooks.drained:
            why += f" (webhooks still under way after {hooks.drain_wall:.1f} s of waiting)"
    if through.outbox is not None and not through.outbox.drained:
        why += f" (the outbox still held sends after {through.outbox.drain_wall:.1f} s of waiting)"
    return ok, why


DEFINITIONS = [
    "delivered: the fakes' ledgers show the charge (Stripe charge / PayPal capture) or the e-mail "
    "(SendGrid sent / Mailgun queued) at least once, matched by payment amount and e-mail id; an e-mail "
    "the outbox delivered after the app traffic ended counts too (the run waits for the outbox to "
    "empty, within a bound)",
    "duplicated: it happened more than once; lost: it never happened",
    "accepted by the outbox: egressd kept the send (SendGrid and Mailgun run with outbox: {when: "
    "on_failure}: a send that failed without reaching the provider) and answered the app 202 with "
    "X-Egressd-Outbox: queued; id=...; it is delivered later (to SendGrid, or failed over to Mailgun), "
    "or ends ambiguous (it may have reached the provider: not resent, left for the operator) or dead; "
    "accepted = delivered later + failed over later + ambiguous + dead + still pending",
    "lost that egressd could have saved: lost, and neither refused (egressd refused the failover with "
    "X-Egressd-Failover: refused; reason=...: docs/providers.md, the call cannot be expressed "
    "faithfully on the fallback, or the primary may already have done it) nor accounted for by the "
    "outbox (accepted, then ambiguous or dead: listed with its id, left for the operator); a kept send "
    "still pending when the wait ends counts here",
    f"webhooks: the fakes send their events as the providers do, and deliver {WEBHOOK_REDELIVER:.0%} of them "
    "twice (the same event id: providers deliver at least once); the app's Stripe and SendGrid endpoints "
    "verify every delivery with the providers' SDKs and count what they got, raw (the app deduplicates "
    "nothing in these rows); a payment (e-mail) counts when it happened (the delivered row above). Directly, "
    "PayPal's and Mailgun's events would go to endpoints the app does not have; through egressd they are "
    "verified (PayPal's verify API, Mailgun's key), translated into Stripe's (SendGrid's) shape with the ids "
    "the app was given, and signed for the app; repeats absorbed: provider redeliveries egressd answered as "
    "duplicates and did not deliver again",
    "exit status 0 when egressd's run has 0 duplicated, 0 lost-that-egressd-could-have-saved, 0 "
    "provider 429s on the e-mail upstreams and every payment that happened with exactly one verified "
    "payment_intent.succeeded at the app (and every part-1 mechanism behaved), 1 otherwise",
]

UNDELIVERED_SHOWN = 20  # kept sends listed one per line; the rest are counted


def undelivered_lines(outbox: OutboxTally, limit: int = UNDELIVERED_SHOWN) -> list[str]:
    """One line per kept send that no provider has (bounded), for the operator."""
    lines = []
    for k in sorted(outbox.undelivered, key=lambda k: (k.index, k.id))[:limit]:
        who = f"e-mail #{k.index}" if k.index >= 0 else "an e-mail"
        where = ", ".join(k.sent_to) or "nowhere"
        kept_by = (
            ""
            if k.answered
            else " (the app gave up before the answer)"
            if k.upstream == APP_MAIL_UPSTREAM
            else f" (kept by {k.upstream}'s outbox in a failover)"
        )
        lines.append(
            f"{who}: {k.id} {k.state}{kept_by} after {k.attempts} attempt(s), written to {where}"
            + (f"; last: {k.last_error}" if k.last_error else "")
        )
    if len(outbox.undelivered) > limit:
        lines.append(f"... and {len(outbox.undelivered) - limit} more (egressd outbox list)")
    return lines


def _fmt_latency(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def outbox_rows(sc: Scenario, o: OutboxTally | None) -> list[tuple[str, str, str]]:
    """The e-mail outbox's rows (through egressd only): accepted = delivered later + failed
    over later + ambiguous + dead + still pending."""
    o = o or OutboxTally()
    rows = [
        ("  accepted by the outbox (202, sent later)", "-", str(o.accepted)),
        ("  - delivered later", "-", str(o.delivered_later)),
        ("  - failed over later (Mailgun)", "-", str(o.failed_over_later)),
        ("  - ambiguous (not resent, for the operator)", "-", str(o.ambiguous)),
        ("  - dead", "-", str(o.dead)),
        ("  - still pending at the end", "-", str(o.pending)),
    ]
    for label, unseen in (
        ("  kept, but the app gave up before the 202", o.unanswered),
        ("  kept by Mailgun's outbox in a failover", o.in_failover),
    ):
        if unseen:  # neither happens in a healthy run: shown only when it does
            rows.append((label, "-", ", ".join(f"{n} {state}" for state, n in sorted(unseen.items()))))
    rows.append(
        (
            "  outbox empty after the traffic in",
            "-",
            f"{o.drain_wall * sc.k:.0f} s ({o.drain_wall:.1f} s)"
            if o.drained
            else f"not within {o.drain_bound * sc.k:.0f} s ({o.drain_bound:.1f} s)",
        )
    )
    return rows


def webhook_rows(sc: Scenario, direct: RunResult, through: RunResult) -> list[tuple[str, str, str]]:
    """What the shop's webhook endpoints got: per payment (e-mail) that happened, how many
    verified payment_intent.succeeded (delivered) events, counted raw."""
    d, t = direct.webhooks or WebhookTally(), through.webhooks or WebhookTally()

    def wait(w: WebhookTally) -> str:
        if not w.drained:
            return f"not within {WEBHOOK_DRAIN_BOUND:.0f} s" + (f" ({w.pending} held)" if w.pending else "")
        return f"{w.drain_wall * sc.k:.0f} s ({w.drain_wall:.1f} s)"

    rows = [
        (
            "payments with exactly one verified payment_intent.succeeded at the app",
            f"{d.pay_once} / {direct.pay.delivered}",
            f"{t.pay_once} / {through.pay.delivered}",
        ),
        ("  payment_intent.succeeded delivered twice (or more)", str(d.pay_twice), str(t.pay_twice)),
        ("  succeeded payments with no event", str(d.pay_none), str(t.pay_none)),
    ]
    if d.pay_none_failed_over or t.pay_none_failed_over:
        rows.append(("  - of which failed over to PayPal", str(d.pay_none_failed_over), str(t.pay_none_failed_over)))
    if d.pay_none_app_failed or t.pay_none_app_failed:
        rows.append(("  - of which the app was told it failed", str(d.pay_none_app_failed), str(t.pay_none_app_failed)))
    rows += [
        ("  - translated from PayPal's PAYMENT.CAPTURE.COMPLETED", "-", str(t.pay_translated)),
        ("  repeats egressd's dedupe absorbed (Stripe, PayPal)", "-", str(t.absorbed_pay)),
        (
            "e-mails with exactly one verified SendGrid delivered event",
            f"{d.mail_once} / {direct.mail.delivered}",
            f"{t.mail_once} / {through.mail.delivered}",
        ),
        ("  delivered event twice (or more)", str(d.mail_twice), str(t.mail_twice)),
        ("  e-mails sent with no event", str(d.mail_none), str(t.mail_none)),
        *(
            [("  - of which the app was told it failed", str(d.mail_none_app_failed), str(t.mail_none_app_failed))]
            if d.mail_none_app_failed or t.mail_none_app_failed
            else []
        ),
        ("  - translated from Mailgun's delivered", "-", str(t.mail_translated)),
        ("  repeats egressd's dedupe absorbed (SendGrid, Mailgun)", "-", str(t.absorbed_mail)),
        ("  webhooks the app refused (signature check)", str(d.refused), str(t.refused)),
        ("  fallback events egressd could not translate (dropped)", "-", str(t.egressd.get("dropped", 0))),
        ("  webhooks the providers gave up on", str(d.given_up), str(t.given_up)),
        ("  every webhook delivered after the traffic in", wait(d), wait(t)),
    ]
    if d.pay_stray or t.pay_stray or d.mail_stray or t.mail_stray:  # never expected: shown when it happens
        rows.append(
            (
                "  events about payments / e-mails that never happened",
                f"{d.pay_stray} / {d.mail_stray}",
                f"{t.pay_stray} / {t.mail_stray}",
            )
        )
    return rows


def report_rows(sc: Scenario, direct: RunResult, through: RunResult) -> list[tuple[str, str, str]]:
    def of(n: int, total: int) -> str:
        return f"{n} / {total}"

    rows: list[tuple[str, str, str]] = []
    for label, d, t, fallback in (
        ("payments", direct.pay, through.pay, "Stripe -> PayPal"),
        ("e-mails", direct.mail, through.mail, "SendGrid -> Mailgun"),
    ):
        rows += [
            (f"{label}: delivered", of(d.delivered, d.total), of(t.delivered, t.total)),
            ("  duplicated (happened 2+ times)", str(d.duplicated), str(t.duplicated)),
            ("  lost (never happened)", str(d.lost), str(t.lost)),
            ("  - refused failover (honest)", "-", str(t.refused)),
            (
                "  - accepted by the outbox, then ambiguous or dead",
                "-",
                str(t.kept_lost) if label == "e-mails" else "-",
            ),
            ("  - lost that egressd could have saved", "-", str(t.savable)),
            (f"  failed over {fallback}", "-", str(t.failovers)),
            ("  app was told it failed", str(d.app_errors), str(t.app_errors)),
            ("  - of which it had happened", str(d.app_errors_but_done), str(t.app_errors_but_done)),
            (
                "  latency p50 / p99",
                f"{_fmt_latency(d.p50)} / {_fmt_latency(d.p99)}",
                f"{_fmt_latency(t.p50)} / {_fmt_latency(t.p99)}",
            ),
        ]
    rows += outbox_rows(sc, through.outbox)
    rows += webhook_rows(sc, direct, through)
    rows += [
        ("provider 429s (answered by the fakes)", str(direct.provider_429), str(through.provider_429)),
        ("  - of which SendGrid, Mailgun", str(direct.mail_429), str(through.mail_429)),
        (
            "requests the providers received",
            str(sum(direct.provider_requests.values())),
            str(sum(through.provider_requests.values())),
        ),
        (
            "simulated duration (wall clock)",
            f"{direct.sim_length:.0f} s ({direct.wall:.1f} s)",
            f"{through.sim_length:.0f} s ({through.wall:.1f} s)",
        ),
    ]
    return rows


def webhook_verifiers(w: WebhookTally) -> str:
    return "; ".join(f"{name}: {what}" for name, what in sorted(w.verifiers.items()))


def print_simulation(sc: Scenario, direct: RunResult, through: RunResult, changes: list[str], out: Any) -> None:
    print("\nPart 2: Black-Friday simulation", file=out)
    for line in sc.describe():
        print("  " + line, file=out)
    for change in changes:
        print("  policy change for the simulation: " + change, file=out)
    rows = report_rows(sc, direct, through)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in [*rows, ("", "direct, naive client", "")])
    w2 = max(len(r[2]) for r in [*rows, ("", "", "through egressd")])
    print("\n" + " " * w0 + "  " + "direct, naive client".rjust(w1) + "  " + "through egressd".rjust(w2), file=out)
    print("-" * (w0 + w1 + w2 + 4), file=out)
    for name, d, t in rows:
        print(f"{name.ljust(w0)}  {d.rjust(w1)}  {t.rjust(w2)}", file=out)
    if through.refusals:
        print(f"\nrefused failovers through egressd: {', '.join(through.refusals)}", file=out)
    if through.webhooks is not None and through.webhooks.verifiers:
        print("\nthe app's webhook endpoints verify with: " + webhook_verifiers(through.webhooks), file=out)
    if through.outbox is not None:
        lines = undelivered_lines(through.outbox)
        if lines:
            print(f"\ne-mails the outbox kept and no provider has ({len(through.outbox.undelivered)}):", file=out)
            for line in lines:
                print("  " + line, file=out)
        else:
            print(
                "\nevery e-mail the outbox kept was delivered"
                if through.outbox.accepted or through.outbox.unanswered or through.outbox.in_failover
                else "\nthe outbox kept no e-mail (no send failed before reaching SendGrid or Mailgun)",
                file=out,
            )
    print("\nDefinitions:", file=out)
    for line in DEFINITIONS:
        print("  - " + line, file=out)


def result_json(sc: Scenario, direct: RunResult, through: RunResult) -> str:
    """A machine-readable summary (embedded in the HTML report)."""

    def run(r: RunResult) -> dict[str, Any]:
        return {
            "payments": vars(r.pay),
            "emails": vars(r.mail),
            "provider_429": r.provider_429,
            "provider_requests": r.provider_requests,
            "provider_429_email": r.mail_429,
            "refusals": r.refusals,
            "wall_seconds": round(r.wall, 2),
            "outbox": None
            if r.outbox is None
            else {
                **{k: v for k, v in vars(r.outbox).items() if k != "undelivered"},
                "undelivered": [vars(k) for k in r.outbox.undelivered[:UNDELIVERED_SHOWN]],
                "undelivered_count": len(r.outbox.undelivered),
            },
            "webhooks": None if r.webhooks is None else vars(r.webhooks),
        }

    return json.dumps({"scale": sc.scale, "time_factor": sc.k, "direct": run(direct), "egressd": run(through)})


__all__ = [
    "TIME_FACTOR",
    "RunResult",
    "Scenario",
    "WebhookTally",
    "compress_time",
    "print_simulation",
    "result_json",
    "run_once",
    "simulation_policies",
    "undelivered_lines",
    "verdict",
    "webhook_rows",
    "webhook_tally",
]
