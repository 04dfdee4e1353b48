"""The command line as a user meets it: check, schema, run (signals, reload), demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def egressd(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw
    )


FALLBACK_SECRETS = ("MAILGUN_API_KEY", "PAYPAL_CLIENT_ID", "PAYPAL_CLIENT_SECRET")


def test_check_accepts_the_shipped_policies() -> None:
    """Without the fallbacks' secrets: valid, one warning per unset variable."""
    env = {k: v for k, v in os.environ.items() if k not in FALLBACK_SECRETS}
    result = egressd("check", "policies", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok: 5 upstream(s): mailgun, paypal, sendgrid, stripe, stripe-files\n"
    assert result.stderr.splitlines() == [
        "policies/mailgun.yaml:20: warning: upstream mailgun: auth.basic.password: "
        "environment variable MAILGUN_API_KEY is not set (an error for egressd run)",
        "policies/paypal.yaml:25: warning: upstream paypal: auth.oauth_client_credentials.client_id: "
        "environment variable PAYPAL_CLIENT_ID is not set (an error for egressd run)",
        "policies/paypal.yaml:26: warning: upstream paypal: auth.oauth_client_credentials.client_secret: "
        "environment variable PAYPAL_CLIENT_SECRET is not set (an error for egressd run)",
    ]
    given = {**env, **dict.fromkeys(FALLBACK_SECRETS, "x-fake")}
    result = egressd("check", "policies", env=given)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr


def test_run_refuses_the_shipped_policies_without_the_fallback_secrets() -> None:
    env = {k: v for k, v in os.environ.items() if k not in FALLBACK_SECRETS}
    result = egressd(
        "run", "--policies", "policies", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", env=env, timeout=20
    )
    assert result.returncode == 1
    for name in FALLBACK_SECRETS:
        assert f"environment variable {name} is not set" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_one_line_per_problem_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "upstream: api\ntarget: https://api.example.com\nretry:\n  attemps: 3\ntimeouts:\n  total: 5x\n"
    )
    (tmp_path / "broken.yml").write_text("upstream: [unclosed\n")
    result = egressd("check", str(tmp_path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert any(re.match(r".*bad\.yaml:4: upstream api: retry\.attemps: unknown field", line) for line in lines), lines
    assert any(re.match(r".*bad\.yaml:6: upstream api: timeouts\.total: .*5x", line) for line in lines), lines
    assert any(re.match(r".*broken\.yml:\d+: ", line) for line in lines), lines


def test_schema_is_json_schema() -> None:
    result = egressd("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "upstream" in schema["properties"] and "retry" in schema["properties"]


def test_demo_runs_offline_and_succeeds() -> None:
    result = egressd("demo", "--quiet", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    for mechanism in ("retries", "retry safety", "idempotent replay", "cache", "circuit breaker", "rate limit queue"):
        assert mechanism in result.stdout


def _wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 15) -> list[str]:
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no line matching {pattern!r} in {lines}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.timeout(60)
def test_run_port_zero_reload_sighup_and_sigterm(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("upstream: alpha\ntarget: http://127.0.0.1:9\n")
    env = {**os.environ, "EGRESSD_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--policies",
            str(policies),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--drain",
            "2",
        ],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        lines = _wait_for_line(proc, r"main listening on")
        addresses = {}
        for line in lines:
            record = json.loads(line)
            if "listening" in record["msg"]:
                addresses[record["listener"]] = record["address"]
        admin = "http://" + addresses["admin"]
        assert _get(admin + "/readyz")[0] == 200
        # A broken set is rejected whole; the old one keeps serving.
        (policies / "b.yaml").write_text("upstream: beta\ntarget: nope\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for_line(proc, r"reload rejected")
        status = json.loads(_get(admin + "/status.json")[1])
        assert list(status["upstreams"]) == ["alpha"]
        # A valid change is picked up by the watcher within 2 s, without a signal.
        (policies / "b.yaml").write_text("upstream: beta\ntarget: http://127.0.0.1:9\n")
        _wait_for_line(proc, r"policies reloaded", timeout=5)
        status = json.loads(_get(admin + "/status.json")[1])
        assert sorted(status["upstreams"]) == ["alpha", "beta"]
        metrics = _get(admin + "/metrics")[1]
        assert 'egressd_config_reloads_total{result="failure"} 1.0' in metrics
        assert 'egressd_config_reloads_total{result="success"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_run_refuses_unset_secret(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "upstream: alpha\ntarget: http://127.0.0.1:9\nauth:\n  bearer: ${env:EGRESSD_TEST_UNSET_SECRET}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EGRESSD_TEST_UNSET_SECRET"}
    result = egressd(
        "run", "--policies", str(tmp_path), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", env=env, timeout=20
    )
    assert result.returncode == 1
    assert "EGRESSD_TEST_UNSET_SECRET" in result.stderr
    assert "Traceback" not in result.stderr
    check = egressd("check", str(tmp_path), env=env)
    assert check.returncode == 0  # a warning for check
    assert "warning" in check.stderr


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_run_rejects_bad_header_timeout(tmp_path: Path, value: str) -> None:
    (tmp_path / "a.yaml").write_text("upstream: alpha\ntarget: http://127.0.0.1:9\n")
    result = egressd("run", "--policies", str(tmp_path), "--header-timeout", value, timeout=20)
    assert result.returncode == 2
    assert "egressd:" in result.stderr and "Traceback" not in result.stderr
