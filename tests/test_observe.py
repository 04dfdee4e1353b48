"""The access log: one valid JSON (or text) line per call, secrets redacted."""

from __future__ import annotations

import io
import json

import pytest

from proxy.events import CallFinished
from proxy.observe.logs import AccessLog, redact_query, redact_text


def event(**kw: object) -> CallFinished:
    base: dict[str, object] = dict(
        route="stripe",
        upstream="stripe",
        method="POST",
        path="/v1/x",
        status=200,
        outcome="success",
        attempts=1,
        duration=0.0123,
        request_id="abc123",
    )
    base.update(kw)
    return CallFinished(**base)  # type: ignore[arg-type]


def test_json_lines_are_valid_and_complete() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out, fmt="json")
    log(event(path='/v1/"quoted"\\path?api_key=sk_live_123&limit=3&card=4242424242424242', failover="used; from=x"))
    log(event(status=504, outcome="proxy_error", error_code="upstream_timeout", detail="timeout", cache="miss"))
    log.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["path"] == '/v1/"quoted"\\path?api_key=REDACTED&limit=3&card=REDACTED-4242'
    assert first["failover"] == "used; from=x" and first["cache"] is None
    assert first["duration_ms"] == 12.3 and first["status"] == 200 and first["request_id"] == "abc123"
    assert second["error_code"] == "upstream_timeout" and second["cache"] == "miss"
    assert "sk_live_123" not in out.getvalue() and "4242424242424242" not in out.getvalue()
    for key in (
        "time",
        "request_id",
        "upstream",
        "method",
        "path",
        "status",
        "attempts",
        "duration_ms",
        "cache",
        "failover",
        "error_code",
    ):
        assert key in first


def test_text_format() -> None:
    out = io.StringIO()
    log = AccessLog(stream=out, fmt="text")
    log(event())
    log.flush()
    line = out.getvalue().strip()
    assert "egressd.access" in line and "status=200" in line and "upstream=stripe" in line


def test_redact_query_keeps_keys() -> None:
    assert redact_query("token=abc&page=2&password=x") == "token=REDACTED&page=2&password=REDACTED"
    assert redact_query("") == ""


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        # contract 7.4 names, whole or as the last part after _ - . (7.7), any case
        ("pwd=hunter2&jwt=eyJ.x.y&PASSWD=a", "pwd=REDACTED&jwt=REDACTED&PASSWD=REDACTED"),
        (
            "x_api_key=1&stripe-key=2&cfg.secret=3&SIG=4&auth=5&code=6",
            "x_api_key=REDACTED&stripe-key=REDACTED&cfg.secret=REDACTED&SIG=REDACTED&auth=REDACTED&code=REDACTED",
        ),
        (
            "access_token=t&apikey=k&signature=s&page=2",
            "access_token=REDACTED&apikey=REDACTED&signature=REDACTED&page=2",
        ),
        # card numbers split by dots, spaces (also URL-encoded) or dashes keep their last four digits
        ("n=4111.1111.1111.1111", "n=REDACTED-1111"),
        ("n=4000+0566+5566+5556&m=5555-5555-5555-4444", "n=REDACTED-5556&m=REDACTED-4444"),
        ("n=4000%200566%205566%205556", "n=REDACTED-5556"),
        # digit runs that fail the Luhn check (order ids, millisecond timestamps) stay
        ("order=1234567812345678&ts=1764747600123", "order=1234567812345678&ts=1764747600123"),
    ],
)
def test_redaction_rules(query: str, logged: str) -> None:
    assert redact_query(query) == logged


def test_card_numbers_in_the_path_keep_four_digits() -> None:
    assert redact_text("/v1/cards/4242424242424242/x") == "/v1/cards/REDACTED-4242/x"
    assert redact_text("/v1/charges/ch_1234") == "/v1/charges/ch_1234"
