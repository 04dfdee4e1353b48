"""`egressd demo`: the Black-Friday simulation at a small scale, its report and its HTML file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from demo.blackfriday import TIME_FACTOR, Scenario, compress_time, simulation_policies
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
    # The naive direct run duplicates or loses.
    direct_bad = sum(lead(d) for d, _ in dupes) + sum(lead(d) for d, _ in rows(out, "lost (never happened)"))
    assert direct_bad > 0
    assert "simulated time runs 8x faster" in out


def test_html_report_is_self_contained(small_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, html = small_run
    text = html.read_text()
    assert text.startswith("<!doctype html>")
    assert "<svg" in text and "<polyline" in text and "PASS" in text
    assert not re.search(r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//""", text, re.IGNORECASE)
    assert not re.search(r"<link\b|<img\b|<iframe\b|@import|url\(", text, re.IGNORECASE)
    assert "http://" not in text and "https://" not in text


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
        assert by_name[name]["outbox"] == {"when": "on_failure", "probe_after": "1250ms"}
    assert "outbox" not in by_name["stripe"] and "outbox" not in by_name["paypal"]
    assert any(c.startswith("sendgrid, mailgun: outbox {when: on_failure") for c in changes)
    assert result.policy_set is not None
    loaded = result.policy_set.by_name()
    assert {n for n, p in loaded.items() if p.outbox is not None} == {"sendgrid", "mailgun"}
    assert loaded["sendgrid"].outbox is not None and loaded["sendgrid"].outbox.probe_after == 1.25
    assert all(d["target"].startswith("http://127.0.0.1:") for d in docs)
    assert any("x 8" in c for c in changes)
