"""The access log: one valid JSON (or text) line per call, secrets redacted."""

from __future__ import annotations

import io
import json

from proxy.events import CallFinished
from proxy.observe.logs import AccessLog, redact_query


def event(**kw: object) -> CallFinished:
    base: dict[str, object] = dict(
        route="stripe", upstream="stripe", method="POST", path="/v1/x", status=200, outcome="success",
        attempts=1, duration=0.0123, request_id="abc123",
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
    assert first["path"] == '/v1/"quoted"\\path?api_key=REDACTED&limit=3&card=REDACTED'
    assert first["failover"] == "used; from=x" and first["cache"] is None
    assert first["duration_ms"] == 12.3 and first["status"] == 200 and first["request_id"] == "abc123"
    assert second["error_code"] == "upstream_timeout" and second["cache"] == "miss"
    assert "sk_live_123" not in out.getvalue() and "4242424242424242" not in out.getvalue()
    for key in ("time", "request_id", "upstream", "method", "path", "status", "attempts", "duration_ms",
                "cache", "failover", "error_code"):
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
