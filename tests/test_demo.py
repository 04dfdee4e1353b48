"""`egressd demo`: the Black-Friday simulation at a small scale, its report and its HTML file."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.app import MailDelivery, ShopProcess, ShopWebhooks, StripeDelivery
from demo.blackfriday import (
    TIME_FACTOR,
    KeptSend,
    Outcome,
    RunResult,
    Scenario,
    Tally,
    WebhookTally,
    _tally,
    compress_time,
    outbox_tally,
    run_once,
    simulation_policies,
    undelivered_lines,
    verdict,
    webhook_tally,
)
from demo.run import example_policies
from fakes.server import FakeServer
from proxy.cli import DEMO_MISSING
from proxy.config.loader import load_policy_dir

ROOT = Path(__file__).resolve().parent.parent


def row(stdout: str, label: str) -> tuple[str, str]:
    """The (direct, through egressd) cells of the report row starting with `label`."""
    for line in stdout.splitlines():
        if line.strip().startswith(label):
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) >= 3:
                return cells[-2], cells[-1]
    raise AssertionError(f"no row {label!r} in:\n{stdout}")


def rows(stdout: str, label: str) -> list[tuple[str, str]]:
    found = []
    for line in stdout.splitlines():
        if line.strip().startswith(label):
            cells = re.split(r"\s{2,}", line.strip())
            if len(cells) >= 3:  # a table row, not a definition
                found.append((cells[-2], cells[-1]))
    return found


def lead(cell: str) -> int:
    return int(cell.split("/")[0].strip())


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    html = tmp_path_factory.mktemp("demo") / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--quiet", "--scale", "0.05", "--html", str(html)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    return result, html


def test_small_simulation_passes_and_shows_the_difference(
    small_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, _ = small_run
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "Verdict: PASS" in out and "FAILED" not in out
    # Part 1 is still there.
    for mechanism in ("retries", "retry safety", "idempotent replay", "keyless dedupe", "cache", "circuit breaker"):
        assert mechanism in out
    # Failover used for payments and for e-mails.
    assert lead(row(out, "failed over Stripe -> PayPal")[1]) > 0
    assert lead(row(out, "failed over SendGrid -> Mailgun")[1]) > 0
    # Refused failovers: the payment without a crosswalk entry, and calls answered 5xx
    # before the circuit opened (ambiguous: the charge or mail may have happened; e-mail
    # has no idempotency key and Stripe replays its stored 5xx to the probe). Never twice.
    refused = rows(out, "- refused failover (honest)")
    assert lead(refused[0][1]) >= 1
    reasons = out.split("refused failovers through egressd: ", 1)[1].splitlines()[0].split(", ")
    assert "no_crosswalk_entry" in reasons and set(reasons) <= {"ambiguous", "no_crosswalk_entry"}
    # Nothing twice through egressd, nothing lost that egressd could have saved.
    dupes = rows(out, "duplicated (happened 2+ times)")
    assert [lead(t) for _, t in dupes] == [0, 0]
    assert [lead(t) for _, t in rows(out, "- lost that egressd could have saved")] == [0, 0]
    assert lead(row(out, "provider 429s")[1]) <= lead(row(out, "provider 429s")[0])
    assert lead(row(out, "- of which SendGrid, Mailgun")[1]) == 0  # part of the exit status
    assert "0 provider 429s on the e-mail upstreams" in out
    # The e-mail outbox (issue 14): every kept send is delivered later, failed over later,
    # ambiguous, dead or still pending, and the lost e-mails are all accounted for.
    accepted = row(out, "accepted by the outbox")
    assert accepted[0] == "-"
    parts = ["- delivered later", "- failed over later", "- ambiguous", "- dead", "- still pending"]
    assert lead(accepted[1]) == sum(lead(row(out, label)[1]) for label in parts)
    lost = [lead(t) for _, t in rows(out, "lost (never happened)")][1]
    mail_lost_parts = [
        rows(out, label)[1][1]
        for label in ("- refused failover", "- accepted by the outbox, then", "- lost that egressd could have saved")
    ]
    assert lost == sum(lead(cell) for cell in mail_lost_parts)
    assert rows(out, "- accepted by the outbox, then")[0] == ("-", "-")  # payments: no outbox
    assert "outbox empty after the traffic in" in out and "not within" not in out
    # The naive direct run duplicates or loses.
    direct_bad = sum(lead(d) for d, _ in dupes) + sum(lead(d) for d, _ in rows(out, "lost (never happened)"))
    assert direct_bad > 0
    assert "simulated time runs 8x faster" in out


def test_small_simulation_webhook_rows(small_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """Issue 15: every payment that happened (on Stripe, or on PayPal by failover) gets exactly
    one verified payment_intent.succeeded at the app through egressd, though the fakes deliver
    some events twice; directly, those arrive twice and PayPal's have nowhere to go."""
    out = small_run[0].stdout
    paid = [row(out, "payments: delivered")[i] for i in (0, 1)]
    once = row(out, "payments with exactly one verified payment_intent.succeeded at the app")
    twice = row(out, "payment_intent.succeeded delivered twice")
    none = row(out, "succeeded payments with no event")
    n = lead(paid[1])
    assert once[1] == f"{n} / {n}"  # every payment that happened through egressd: exactly one event
    assert (twice[1], none[1]) == ("0", "0")
    assert lead(twice[0]) > 0 and lead(once[0]) + lead(twice[0]) + lead(none[0]) == lead(paid[0])
    failed_over = lead(row(out, "failed over Stripe -> PayPal")[1])
    assert lead(row(out, "- translated from PayPal's PAYMENT.CAPTURE.COMPLETED")[1]) == failed_over > 0
    # The fakes redeliver some events: egressd absorbed them.
    assert lead(row(out, "repeats egressd's dedupe absorbed (Stripe, PayPal)")[1]) > 0
    # E-mails: exactly one delivered event each too, but for a send a failover made while the
    # app was told it failed (no id to translate Mailgun's event to): shown, not ruled on.
    mailed = lead(row(out, "e-mails: delivered")[1])
    mail_once = row(out, "e-mails with exactly one verified SendGrid delivered event")[1]
    mail_none = lead(row(out, "e-mails sent with no event")[1])
    assert mail_once == f"{mailed - mail_none} / {mailed}" and row(out, "delivered event twice (or more)")[1] == "0"
    assert mail_none <= lead(rows(out, "- of which it had happened")[1][1])
    assert lead(row(out, "- translated from Mailgun's delivered")[1]) > 0
    assert lead(row(out, "repeats egressd's dedupe absorbed (SendGrid, Mailgun)")[1]) > 0
    assert row(out, "webhooks the app refused (signature check)") == ("0", "0")
    assert row(out, "webhooks the providers gave up on") == ("0", "0")
    assert "not within" not in row(out, "every webhook delivered after the traffic in")[1]
    assert "events about payments / e-mails that never happened" not in out
    # Checked with the official SDKs (installed with the test extras).
    assert "stripe.Webhook.construct_event" in out and "EventWebhook.verify_signature" in out


def test_html_report_is_self_contained(small_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, html = small_run
    text = html.read_text()
    assert text.startswith("<!doctype html>")
    assert "<svg" in text and "<polyline" in text and "PASS" in text
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", text, re.IGNORECASE)
    assert not re.search(r"<link\b|<img\b|<iframe\b|@import|url\(", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text
    assert "The e-mail outbox" in text and "accepted by the outbox" in text
    data = json.loads(text.split('<script type="application/json" id="data">', 1)[1].split("</script>", 1)[0])
    outbox = data["egressd"]["outbox"]
    assert data["direct"]["outbox"] is None and data["egressd"]["provider_429_email"] == 0
    kept = ("delivered_later", "failed_over_later", "ambiguous", "dead", "pending")
    assert outbox["accepted"] == sum(outbox[k] for k in kept)
    assert outbox["undelivered_count"] >= len(outbox["undelivered"])
    assert "Webhooks at the shop" in text and "exactly one verified payment_intent.succeeded" in text
    hooks = data["egressd"]["webhooks"]
    assert hooks["pay_once"] == data["egressd"]["payments"]["delivered"] and hooks["pay_twice"] == 0


def test_scale_bounds() -> None:
    with pytest.raises(ValueError):
        Scenario.build(0)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--scale", "100"], capture_output=True, text=True, timeout=30, cwd=ROOT
    )
    assert result.returncode == 2 and "--scale" in result.stderr


@pytest.mark.parametrize("absent", ["demo", "fakes"])
def test_demo_missing_from_the_installation_is_one_line_and_exit_2(absent: str) -> None:
    """The image has neither demo/ nor fakes/ (tests/test_deploy.py checks the real wheel):
    `egressd demo` says so in one line, without a traceback."""
    code = f"import sys; sys.modules[{absent!r}] = None; from proxy.cli import main; raise SystemExit(main(['demo']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [DEMO_MISSING]


def test_scenario_scales_counts_and_keeps_outages_long_enough() -> None:
    full = Scenario.build(1)
    assert (full.payments, full.emails, full.stripe_outage_len) == (2000, 10000, 20.0)
    small = Scenario.build(0.05)
    assert (small.payments, small.emails) == (100, 500)
    assert small.stripe_outage_len >= 5  # outlasts egressd's retries, so failover shows
    assert small.stripe_outage_at <= small.pay_at(small.refused_index) <= small.stripe_outage_at + 5


def test_compress_time_divides_durations_and_multiplies_rates() -> None:
    doc: dict[str, Any] = {
        "upstream": "x",
        "timeouts": {"attempt": "20s", "total": "45s"},
        "retry": {"backoff": {"initial": "250ms", "max": "5s"}, "budget": {"ratio": 0.2, "min_per_second": 5}},
        "rate_limit": {"rate": "600/m", "queue": {"max_wait": "2s"}},
        "circuit_breaker": {"window": "30s", "open_for": "30s"},
        "outbox": {"when": "on_failure", "max_age": "24h", "probe_after": "10s", "concurrency": 16},
    }
    out = compress_time(doc, 8)
    assert out["timeouts"] == {"attempt": "2500ms", "total": "5625ms"}
    assert out["retry"]["backoff"] == {"initial": "31.25ms", "max": "625ms"}
    assert out["retry"]["budget"]["min_per_second"] == 40
    assert out["rate_limit"]["rate"] == "80/s" and out["rate_limit"]["queue"]["max_wait"] == "250ms"
    assert out["circuit_breaker"] == {"window": "3750ms", "open_for": "3750ms"}
    assert out["outbox"] == {"when": "on_failure", "max_age": "10800000ms", "probe_after": "1250ms", "concurrency": 16}
    assert doc["timeouts"]["attempt"] == "20s"  # the input is left alone


def test_simulation_policies_are_valid_and_keep_failover(tmp_path: Path) -> None:
    fakes = {name: FakeServer(name, port=1) for name in ("stripe", "paypal", "sendgrid", "mailgun")}
    docs, changes = simulation_policies(example_policies(), fakes, TIME_FACTOR)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    result = load_policy_dir(tmp_path)
    assert result.ok, result.problems
    by_name = {d["upstream"]: d for d in docs}
    assert by_name["stripe"]["failover"][0]["to"] == "paypal"
    assert by_name["sendgrid"]["failover"][0]["to"] == "mailgun"
    assert "oauth_client_credentials" in by_name["paypal"]["auth"]
    # The e-mail upstreams keep what fails before reaching the provider (issue 14); payments cannot.
    for name in ("sendgrid", "mailgun"):
        assert by_name[name]["outbox"] == {"when": "on_failure", "keep_in_doubt": True, "probe_after": "1250ms"}
    assert "outbox" not in by_name["stripe"] and "outbox" not in by_name["paypal"]
    assert any(c.startswith("sendgrid, mailgun: outbox {when: on_failure") for c in changes)
    assert result.policy_set is not None
    loaded = result.policy_set.by_name()
    assert {n for n, p in loaded.items() if p.outbox is not None} == {"sendgrid", "mailgun"}
    assert loaded["sendgrid"].outbox is not None and loaded["sendgrid"].outbox.probe_after == 1.25
    assert all(d["target"].startswith("http://127.0.0.1:") for d in docs)
    assert any("x 8" in c for c in changes)


async def test_sends_the_outbox_kept_count_once_the_fakes_have_them() -> None:
    """With `when: always` every e-mail is kept and answered 202 at once: the run waits for
    the outbox to deliver them, and counts them from the fakes' ledgers, once each."""
    sc = Scenario.build(0.01)
    through, changes = await run_once("egressd", sc, example_policies(), outbox_when="always")
    assert any(c.startswith("sendgrid, mailgun: outbox {when: always") for c in changes)
    o = through.outbox
    assert o is not None and o.consistent and o.drained
    assert o.accepted == sc.emails
    assert (o.ambiguous, o.dead, o.pending, o.undelivered) == (0, 0, 0, [])
    assert o.delivered_later + o.failed_over_later == sc.emails
    mail = through.mail
    assert (mail.delivered, mail.duplicated, mail.app_errors, mail.savable) == (sc.emails, 0, 0, 0)
    assert through.mail_429 == 0


def _kept(index: int, state: str, effects: int, *, via: str = "", upstream: str = "sendgrid") -> KeptSend:
    return KeptSend(
        index=index,
        id=f"eo_{index}",
        state=state,
        upstream=upstream,
        via=via,
        attempts=1,
        sent_to=(upstream,),
        last_error="HTTP 503" if state != "delivered" else "",
        effects=effects,
        answered=upstream == "sendgrid",
    )


def test_outbox_accounting_lists_every_kept_send_no_provider_has() -> None:
    kept = {
        0: _kept(0, "delivered", 1, via="sendgrid"),
        1: _kept(1, "delivered", 1, via="mailgun"),
        2: _kept(2, "ambiguous", 0),
        3: _kept(3, "dead", 0),
        4: _kept(4, "queued", 0),
        5: _kept(5, "ambiguous", 1),  # it was there after all: delivered, not listed
    }
    # Kept by Mailgun's own outbox inside a failover (the app saw the failover's answer), and
    # kept for SendGrid while the app had given up waiting (it never got the id).
    others = [
        _kept(6, "dead", 0, upstream="mailgun"),
        _kept(-1, "delivered", 0, upstream="mailgun"),
        replace(_kept(8, "queued", 0), answered=False),
    ]
    t = outbox_tally(kept, others, {("sendgrid", "retried"): 3, ("stripe", "other"): 1}, ("sendgrid", "mailgun"))
    assert (t.accepted, t.delivered_later, t.failed_over_later, t.ambiguous, t.dead, t.pending) == (6, 1, 1, 2, 1, 1)
    assert t.consistent
    assert [u.index for u in t.undelivered] == [2, 3, 4, 6, 8]
    assert t.in_failover == {"dead": 1, "delivered": 1} and t.unanswered == {"queued": 1}
    assert t.results == {"retried": 3}

    # The app's view: 202 for every kept send. Lost = never at a provider; a kept send
    # the outbox ended ambiguous or dead is accounted for; one still pending is not.
    outcomes = [Outcome("mail", i, status=202, outbox_id=f"eo_{i}") for i in range(6)]
    outcomes += [Outcome("mail", 6, status=202), Outcome("mail", 7, status=503, failover="refused; reason=ambiguous")]
    tally = _tally(outcomes, Counter({0: 1, 1: 1, 5: 1}), "sendgrid", "mailgun", {6: others[0], **kept})
    assert (tally.delivered, tally.lost, tally.refused, tally.kept_lost, tally.savable) == (3, 5, 1, 3, 1)

    lines = undelivered_lines(t, limit=3)
    assert len(lines) == 4 and lines[-1] == "... and 2 more (egressd outbox list)"
    assert lines[0] == "e-mail #2: eo_2 ambiguous after 1 attempt(s), written to sendgrid; last: HTTP 503"
    every = undelivered_lines(t)
    assert "kept by mailgun's outbox in a failover" in every[3] and "the app gave up before the answer" in every[4]


def test_verdict_fails_on_a_provider_429_at_an_email_upstream() -> None:
    clean = Tally(100, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 2.0)
    result = RunResult("egressd", clean, clean, 0, 0, {}, {}, [], 1.0, 8.0, False)
    assert verdict(result)[0]
    result.provider_429 = result.mail_429 = 1
    ok, why = verdict(result)
    assert not ok and "1 provider 429s on the e-mail upstreams" in why


@pytest.mark.parametrize(
    ("change", "passes"),
    [
        ({}, True),
        ({"pay_none": 1}, False),  # a payment whose success the app never heard of
        ({"pay_twice": 1}, False),  # a success the app was told twice
        ({"drained": False}, False),  # webhooks still under way: the count is not final
        ({"mail_none": 3, "mail_twice": 2}, True),  # the e-mail row is shown, not ruled on
    ],
)
def test_verdict_rules_on_the_payment_webhook_row(change: dict[str, Any], passes: bool) -> None:
    clean = Tally(100, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0, 2.0)
    result = RunResult("egressd", clean, clean, 0, 0, {}, {}, [], 1.0, 8.0, False)
    result.webhooks = replace(WebhookTally(pay_once=100), **change)
    ok, why = verdict(result)
    assert ok is passes
    assert f"{change.get('pay_none', 0) + change.get('pay_twice', 0)} payments without exactly one" in why


def test_webhook_tally_counts_raw_deliveries_per_payment_and_mail() -> None:
    """Per payment (e-mail) that happened: how many verified events reached the shop, raw."""
    seen = ShopWebhooks(
        stripe=[
            StripeDelivery("evt_a", "payment_intent.succeeded", "pi_a", 1000, None),  # payment 0: once
            StripeDelivery("evt_b", "payment_intent.succeeded", "pi_b", 1001, None),  # payment 1: twice
            StripeDelivery("evt_b", "payment_intent.succeeded", "pi_b", 1001, None),
            StripeDelivery("evt_p", "payment_intent.succeeded", "pi_ppf_X", 1003, "paypal"),  # 3: translated
            StripeDelivery("evt_f", "payment_intent.payment_failed", "pi_c", 1004, None),  # not a success
            StripeDelivery("evt_s", "payment_intent.succeeded", "pi_s", 1005, None),  # 5 never happened
        ],
        mail=[
            MailDelivery("sg1", "delivered", 0, None),
            MailDelivery("sg2", "delivered", 1, "mailgun"),
            MailDelivery("sg3", "processed", 2, None),
        ],
    )
    pays = [Outcome("pay", i, status=200) for i in range(6)]
    pays[3].upstream = pays[4].upstream = "paypal"
    pays[2].status = 504  # it happened, but the app was told it failed
    mails = [Outcome("mail", 0, status=202), Outcome("mail", 1, status=202), Outcome("mail", 2, status=504)]
    t = webhook_tally(seen, {}, pays, Counter({0: 1, 1: 1, 2: 1, 3: 1, 4: 1}), Counter({0: 1, 1: 1, 2: 1}), mails)
    assert (t.pay_once, t.pay_twice, t.pay_none, t.pay_none_failed_over, t.pay_none_app_failed) == (2, 1, 2, 1, 1)
    assert (t.pay_translated, t.pay_stray) == (1, 1)
    assert (t.mail_once, t.mail_twice, t.mail_none, t.mail_translated, t.mail_stray) == (2, 0, 1, 1, 0)
    assert t.mail_none_app_failed == 1


async def test_the_shop_checks_every_delivery_in_its_own_process() -> None:
    """The shop's endpoints (a child process): Stripe's and SendGrid's deliveries checked with
    the SDKs, forged ones refused, PayPal's and Mailgun's not understood (404)."""
    import aiohttp
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from demo.blackfriday import signing_key
    from fakes.stripe import stripe_signature

    pem, public = signing_key()
    shop = await ShopProcess("whsec_shop_test", public).start()
    try:
        event = {"id": "evt_1", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1", "amount": 1007}}}
        body = json.dumps(event).encode()
        batch = json.dumps([{"event": "delivered", "sg_event_id": "e1", "email_id": "4"}]).encode()
        key = serialization.load_pem_private_key(pem.encode(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        stamp = str(int(time.time()))
        sig = base64.b64encode(key.sign(stamp.encode() + batch, ec.ECDSA(hashes.SHA256()))).decode()
        sg_headers = {
            "X-Twilio-Email-Event-Webhook-Signature": sig,
            "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
            "X-Egressd-Translated-From": "mailgun",
        }
        async with aiohttp.ClientSession() as http:
            posts = [
                ("/webhooks/stripe", body, {"Stripe-Signature": stripe_signature(body, "whsec_shop_test")}, 200),
                ("/webhooks/stripe", body, {"Stripe-Signature": stripe_signature(body, "whsec_other")}, 400),
                ("/webhooks/stripe", body, {"Stripe-Signature": stripe_signature(body, "whsec_shop_test", 1)}, 400),
                ("/webhooks/sendgrid", batch, sg_headers, 200),
                ("/webhooks/sendgrid", batch.replace(b'"4"', b'"5"'), sg_headers, 400),
                ("/webhooks/paypal", b"{}", {}, 404),
            ]
            for path, data, headers, status in posts:
                async with http.post(shop.url + path, data=data, headers=headers) as r:
                    assert r.status == status, path
        seen = await shop.seen()
    finally:
        await shop.stop()
    assert [(d.payment_intent, d.amount) for d in seen.stripe] == [("pi_1", 1007)]
    assert [(d.event_id, d.email_id, d.translated_from) for d in seen.mail] == [("e1", 4, "mailgun")]
    assert seen.refused == {"stripe": 2, "sendgrid": 1} and seen.unknown == {"/webhooks/paypal": 1}
    assert "stripe.Webhook.construct_event" in seen.verifiers["stripe"]
    assert "EventWebhook" in seen.verifiers["sendgrid"]


def test_the_shop_checks_the_same_schemes_without_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pip install .` brings neither stripe nor sendgrid (test extras): the shop then checks
    the same documented schemes itself, and says so."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from demo.app import sendgrid_check, stripe_check
    from demo.blackfriday import signing_key
    from fakes.stripe import stripe_signature

    monkeypatch.setitem(sys.modules, "stripe", None)
    monkeypatch.setitem(sys.modules, "sendgrid.helpers.eventwebhook", None)
    what, check = stripe_check("whsec_x")
    assert "own" in what and "not installed" in what
    body = b'{"id": "evt_1"}'
    assert check(body, stripe_signature(body, "whsec_x"))
    assert not check(body, stripe_signature(body, "whsec_y"))
    assert not check(body + b" ", stripe_signature(body, "whsec_x"))
    assert not check(body, stripe_signature(body, "whsec_x", int(time.time()) - 301))  # the SDK's 300 s
    assert not check(body, "garbage")
    pem, public = signing_key()
    what, sg = sendgrid_check(public)
    assert "own" in what
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    stamp = str(int(time.time()))
    sig = base64.b64encode(key.sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))).decode()
    assert sg(body, sig, stamp) and not sg(body + b" ", sig, stamp) and not sg(body, "bm9wZQ==", stamp)
