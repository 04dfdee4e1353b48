"""Failover plans that could never be used fail `egressd check` (and `run`, and reloads);
5xx failover on sends a 5xx leaves ambiguous, with no circuit breaker, is a warning
(contract 7.4 last bullet, 7.7 "check warnings")."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plugins.registry import load_plugin
from proxy.config.loader import LoadResult, load_policy_dir

ROOT = Path(__file__).resolve().parent.parent

SENDGRID = """
upstream: sendgrid
target: https://api.sendgrid.com
provider: sendgrid
circuit_breaker: {min_requests: 10}
failover:
  - to: mailgun
    on: [circuit_open, connect_error, 503]
"""
SENDGRID_NO_CB = SENDGRID.replace("circuit_breaker: {min_requests: 10}\n", "")
MAILGUN = """
upstream: mailgun
target: https://api.mailgun.net
provider: {name: mailgun, domain: mg.example.com}
auth:
  basic: {username: api, password: key-proxy}
"""
STRIPE = """
upstream: stripe
target: https://api.stripe.com
provider: stripe
failover:
  - to: paypal
    on: [circuit_open, exhausted, 503]
"""
PAYPAL = """
upstream: paypal
target: https://api-m.sandbox.paypal.com
provider: paypal
auth:
  oauth_client_credentials:
    token_url: https://api-m.sandbox.paypal.com/v1/oauth2/token
    client_id: id
    client_secret: secret
"""

NO_AUTH_MAILGUN = (
    "sendgrid.yaml:6: upstream sendgrid: failover[0].to: fallback upstream 'mailgun' has no auth block: "
    "egressd cannot call it with the app's SendGrid key; add "
    'auth: {basic: {username: api, password: "${env:MAILGUN_API_KEY}"}} '
    "to upstream mailgun at mailgun.yaml:1 (docs/providers.md)"
)
NO_DOMAIN = (
    "sendgrid.yaml:6: upstream sendgrid: failover[0].to: fallback upstream 'mailgun' has no provider.domain: "
    "failed-over mail is sent to /v3/DOMAIN/messages, so egressd needs Mailgun's sending domain; "
    "write provider: {name: mailgun, domain: mg.example.com} in upstream mailgun at mailgun.yaml:1 "
    "(docs/providers.md)"
)


def absolute(line: str, directory: Path) -> str:
    """A line written with bare file names, as check prints it for files in `directory`."""
    return re.sub(r"\b([a-z]+\.yaml)", lambda m: f"{directory}/{m.group(1)}", line)


def write(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text).lstrip("\n"))


def load(directory: Path, files: dict[str, str]) -> tuple[LoadResult, list[str]]:
    write(directory, files)
    result = load_policy_dir(directory, environ={})
    return result, [str(p).replace(f"{directory}/", "") for p in result.problems]


# ---- errors: a plan that could never be used ---------------------------------------------


def test_fallback_without_auth(tmp_path: Path) -> None:
    mailgun = MAILGUN.replace("auth:\n  basic: {username: api, password: key-proxy}\n", "")
    result, got = load(tmp_path, {"sendgrid.yaml": SENDGRID, "mailgun.yaml": mailgun})
    assert got == [NO_AUTH_MAILGUN]
    assert not result.ok and result.policy_set is None


def test_fallback_without_auth_names_the_credentials_each_provider_takes(tmp_path: Path) -> None:
    paypal = PAYPAL[: PAYPAL.index("auth:")]
    _, got = load(tmp_path, {"stripe.yaml": STRIPE, "paypal.yaml": paypal})
    assert got == [
        "stripe.yaml:5: upstream stripe: failover[0].to: fallback upstream 'paypal' has no auth block: "
        "egressd cannot call it with the app's Stripe key; add auth: {oauth_client_credentials: "
        "{token_url: https://api-m.sandbox.paypal.com/v1/oauth2/token, "
        'client_id: "${env:PAYPAL_CLIENT_ID}", client_secret: "${env:PAYPAL_CLIENT_SECRET}"}} '
        "to upstream paypal at paypal.yaml:1 (docs/providers.md)"
    ]


@pytest.mark.parametrize("fallback", ["mailgun", "paypal"])
def test_the_auth_hint_is_yaml_that_loads(tmp_path: Path, fallback: str) -> None:
    """What the message says to add can be pasted as it is."""
    primary, text = (SENDGRID, MAILGUN) if fallback == "mailgun" else (STRIPE, PAYPAL)
    bare = text[: text.index("auth:")]
    _, got = load(tmp_path, {"primary.yaml": primary, "fallback.yaml": bare})
    (line,) = got
    hint = line.split("; add ", 1)[1].split(" to upstream", 1)[0]
    write(tmp_path, {"fallback.yaml": bare + hint + "\n"})
    env = {"MAILGUN_API_KEY": "k", "PAYPAL_CLIENT_ID": "i", "PAYPAL_CLIENT_SECRET": "s"}
    result = load_policy_dir(tmp_path, environ=env)
    assert result.ok and result.problems == (), [str(p) for p in result.problems]
    assert result.policy_set is not None and result.policy_set.by_name()[fallback].auth is not None


def test_pair_no_plugin_translates(tmp_path: Path) -> None:
    stripe = STRIPE.replace("to: paypal", "to: sendgrid")
    sendgrid = SENDGRID.replace("circuit_breaker", "auth: {bearer: SG.proxy}\ncircuit_breaker")
    result, got = load(tmp_path, {"stripe.yaml": stripe, "sendgrid.yaml": sendgrid, "mailgun.yaml": MAILGUN})
    assert got == [
        "stripe.yaml:5: upstream stripe: failover[0].to: fallback upstream 'sendgrid' is a sendgrid upstream "
        "and no installed plugin translates stripe calls into sendgrid calls: every failover to it would be "
        "refused (no_translation); stripe calls fail over only to a paypal upstream: name one in to: or "
        "remove this rule (docs/providers.md)"
    ]
    assert result.policy_set is None


def test_generic_to_generic_is_not_translated(tmp_path: Path) -> None:
    """The runtime has no same-shape failover: `generic` translates to nothing, so the
    failover stage would refuse every call (`no_translation`)."""
    text = """
    upstream: api
    target: https://api.example.com
    circuit_breaker: {}
    failover:
      - to: api2
        on: [circuit_open]
    ---
    upstream: api2
    target: https://api2.example.com
    auth: {bearer: k}
    """
    _, got = load(tmp_path, {"p.yaml": text})
    assert got == [
        "p.yaml:5: upstream api: failover[0].to: fallback upstream 'api2' is a generic upstream and no "
        "installed plugin translates generic calls into generic calls: every failover to it would be refused "
        "(no_translation); generic calls can fail over to no provider: remove this rule (docs/providers.md)"
    ]


def test_mailgun_fallback_without_domain(tmp_path: Path) -> None:
    mailgun = MAILGUN.replace("provider: {name: mailgun, domain: mg.example.com}", "provider: mailgun")
    result, got = load(tmp_path, {"sendgrid.yaml": SENDGRID, "mailgun.yaml": mailgun})
    assert got == [NO_DOMAIN]
    assert result.policy_set is None


def test_mailgun_without_domain_is_fine_when_nothing_fails_over_to_it(tmp_path: Path) -> None:
    result, got = load(tmp_path, {"mailgun.yaml": MAILGUN.replace(", domain: mg.example.com", "")})
    assert got == [] and result.ok


def test_every_problem_of_one_fallback_is_reported(tmp_path: Path) -> None:
    mailgun = "upstream: mailgun\ntarget: https://api.mailgun.net\nprovider: mailgun\n"
    _, got = load(tmp_path, {"sendgrid.yaml": SENDGRID, "mailgun.yaml": mailgun})
    assert got == [NO_AUTH_MAILGUN, NO_DOMAIN]


@pytest.mark.parametrize(
    ("source", "target"), list(itertools.product(["stripe", "paypal", "sendgrid", "mailgun", "generic"], repeat=2))
)
def test_check_and_runtime_agree_on_every_provider_pair(tmp_path: Path, source: str, target: str) -> None:
    """The check asks the plugins exactly what the failover stage asks them."""
    translated = {("stripe", "paypal"), ("paypal", "stripe"), ("sendgrid", "mailgun"), ("mailgun", "sendgrid")}
    runtime = load_plugin(source).failover_to(load_plugin(target, {"domain": "mg.example.com"})) is not None
    assert runtime == ((source, target) in translated)
    text = f"""
    upstream: a
    target: https://a.example
    provider: {source}
    circuit_breaker: {{}}
    failover:
      - to: b
        on: [circuit_open]
    ---
    upstream: b
    target: https://b.example
    provider: {{name: {target}, domain: mg.example.com}}
    auth: {{bearer: k}}
    """
    result, got = load(tmp_path, {"p.yaml": text})
    assert result.ok == runtime, got
    assert len(got) == (0 if runtime else 1) and all("(no_translation)" in line for line in got), got


# ---- the warning: 5xx failover of ambiguous sends without a circuit breaker --------------


def warning(file: str, line: int, upstream: str, who: str, statuses: str, first: str) -> str:
    return (
        f"{file}:{line}: warning: upstream {upstream}: failover[0].on: {statuses} never fails a send over: "
        f"{who} does not deduplicate sends on a key, so a send answered {first} may have gone out and egressd "
        "refuses its failover (reason=ambiguous); add a circuit_breaker block: sends then fail over once it "
        "opens (circuit_open) (docs/providers.md)"
    )


def test_5xx_failover_of_sendgrid_without_circuit_breaker_warns(tmp_path: Path) -> None:
    sendgrid = SENDGRID_NO_CB.replace("503]", "502, 503]")
    result, got = load(tmp_path, {"sendgrid.yaml": sendgrid, "mailgun.yaml": MAILGUN})
    assert got == [warning("sendgrid.yaml", 6, "sendgrid", "SendGrid", "502, 503", "502")]
    assert result.ok and result.policy_set is not None  # a warning: the set is served


def test_5xx_failover_of_mailgun_without_circuit_breaker_warns(tmp_path: Path) -> None:
    mailgun = MAILGUN + "failover:\n  - to: sendgrid\n    on: [500]\n"
    sendgrid = "upstream: sendgrid\ntarget: https://api.sendgrid.com\nprovider: sendgrid\nauth: {bearer: SG.x}\n"
    result, got = load(tmp_path, {"sendgrid.yaml": sendgrid, "mailgun.yaml": mailgun})
    assert got == [warning("mailgun.yaml", 8, "mailgun", "Mailgun", "500", "500")]
    assert result.ok


def test_5xx_failover_of_generic_without_upstream_dedupes_warns(tmp_path: Path) -> None:
    text = """
    upstream: api
    target: https://api.example.com
    failover:
      - to: stripe
        on: [503]
    ---
    upstream: stripe
    target: https://api.stripe.com
    provider: stripe
    auth: {bearer: sk_test_proxy}
    """
    _, got = load(tmp_path, {"p.yaml": text})
    assert (
        warning("p.yaml", 5, "api", "upstream api (generic, without idempotency.upstream_dedupes: true)", "503", "503")
        in got
    )
    assert any("(no_translation)" in line for line in got)  # generic translates to nothing anyway


def test_upstream_dedupes_false_makes_stripe_sends_unsafe(tmp_path: Path) -> None:
    stripe = STRIPE + "idempotency: {upstream_dedupes: false}\n"
    _, got = load(tmp_path, {"stripe.yaml": stripe, "paypal.yaml": PAYPAL})
    assert got == [
        warning("stripe.yaml", 6, "stripe", "upstream stripe (idempotency.upstream_dedupes: false)", "503", "503")
    ]


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"sendgrid.yaml": SENDGRID, "mailgun.yaml": MAILGUN}, "a circuit breaker"),
        (
            {"sendgrid.yaml": SENDGRID_NO_CB + "idempotency: {upstream_dedupes: true}\n", "mailgun.yaml": MAILGUN},
            "the upstream dedupes",
        ),
        (
            {"sendgrid.yaml": SENDGRID_NO_CB.replace("503]", "429, exhausted]"), "mailgun.yaml": MAILGUN},
            "no 5xx listed",
        ),
        ({"stripe.yaml": STRIPE, "paypal.yaml": PAYPAL}, "Stripe dedupes on its key"),
    ],
    ids=["circuit_breaker", "upstream_dedupes", "no-5xx", "stripe"],
)
def test_a_usable_plan_passes_without_warning(tmp_path: Path, files: dict[str, str], why: str) -> None:
    result, got = load(tmp_path, files)
    assert got == [], why
    assert result.ok and result.policy_set is not None


# ---- through the command line ------------------------------------------------------------


def egressd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def test_check_fails_a_dead_plan_with_one_line_per_problem(tmp_path: Path) -> None:
    mailgun = "upstream: mailgun\ntarget: https://api.mailgun.net\nprovider: mailgun\n"
    write(tmp_path, {"sendgrid.yaml": SENDGRID, "mailgun.yaml": mailgun})
    result = egressd("check", str(tmp_path))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [absolute(NO_AUTH_MAILGUN, tmp_path), absolute(NO_DOMAIN, tmp_path)]


def test_check_warns_and_passes(tmp_path: Path) -> None:
    write(tmp_path, {"sendgrid.yaml": SENDGRID_NO_CB, "mailgun.yaml": MAILGUN})
    result = egressd("check", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok: 2 upstream(s): mailgun, sendgrid\n"
    assert result.stderr.splitlines() == [
        absolute(warning("sendgrid.yaml", 6, "sendgrid", "SendGrid", "503", "503"), tmp_path)
    ]


def test_run_refuses_a_dead_plan(tmp_path: Path) -> None:
    mailgun = MAILGUN.replace("auth:\n  basic: {username: api, password: key-proxy}\n", "")
    write(tmp_path, {"sendgrid.yaml": SENDGRID, "mailgun.yaml": mailgun})
    args = ("run", "--policies", str(tmp_path), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    result = egressd(*args, "--log-format", "text", "--data-dir", "none")
    assert result.returncode == 1
    assert "failover[0].to: fallback upstream 'mailgun' has no auth block" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
