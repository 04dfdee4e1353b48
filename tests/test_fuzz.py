"""Property tests (hypothesis): routing never lets a dot-segment through, policy documents
with the right shape but any values load or fail cleanly, and what loads also builds.

tests/test_config.py fuzzes arbitrary text and arbitrary key trees; tests/test_units.py
the duration/size/rate parsers; tests/test_plugins_property.py a translation. These add
the request-target checks and schema-directed documents.
"""

from __future__ import annotations

import tempfile
import unicodedata
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.clock import RealClock
from proxy.config.loader import LoadResult, load_policy_dir
from proxy.config.units import format_duration, format_size, parse_duration, parse_size
from proxy.errors import ProxyError
from proxy.events import EventBus
from proxy.routing import check_path, split_target
from proxy.runtime import Runtime
from proxy.state.memory import MemoryState

# -- routing ---------------------------------------------------------------------------------

_DOTS = {".", ".."}
# Pieces that make traversal likely: dots in every encoding, separators, escapes, and odd text.
_pieces = st.sampled_from(
    [".", "..", "%2e", "%2E", "%252e", "%25252e", "%c0%ae", "%ef%bc%8e", "\uff0e", ";", ";x", "/", "//",
     "%2f", "%2F", "\\", "%5c", "%", "%%", "%2", "%zz", "%00", "%0d%0a", "\x00", "\t", "a", "b", "v1", "x-y",
     "é", "%c3%a9", "~", "+", "=", "?", "#", "@", ":"]
)  # fmt: skip
_paths = st.builds(lambda parts: "/" + "".join(parts), st.lists(_pieces, max_size=12))


def decoded_forms(path: str) -> list[str]:
    """The path as a lenient server might read it, after 0..4 rounds of percent-decoding."""
    forms = [path]
    for _ in range(4):
        nxt = unquote(forms[-1], errors="replace")
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    return forms


def has_dot_segment(text: str) -> bool:
    for segment in text.split("/"):
        for form in (segment, unicodedata.normalize("NFKC", segment)):
            if form in _DOTS or form.split(";", 1)[0] in _DOTS:
                return True
    return False


@settings(max_examples=2000, deadline=None)
@given(path=st.one_of(_paths, st.text(max_size=60).map(lambda t: "/" + t)))
@example(path="/a/%25252e%25252e/b")
@example(path="/a/%c0%ae%c0%ae/b")
@example(path="/a/..;/b")
def test_check_path_never_accepts_a_dot_segment(path: str) -> None:
    try:
        check_path(path)
    except ProxyError as exc:
        assert exc.code == "bad_request" and exc.status == 400
        return
    for form in decoded_forms(path):
        assert not has_dot_segment(form), (path, form)
        assert "\\" not in form, (path, form)
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in form), (path, form)
    assert "//" not in path.rstrip("/") or path == "/"


@settings(max_examples=1000, deadline=None)
@given(
    name=st.one_of(st.sampled_from(["stripe", "a", "mail-2", "A", "-x", "x_y", ""]), st.text(max_size=8)),
    rest=st.one_of(_paths, st.text(max_size=40)),
    query=st.one_of(st.none(), st.text(max_size=20)),
    fixed=st.sampled_from([None, "pinned"]),
)
def test_split_target_raises_only_proxy_errors(name: str, rest: str, query: str | None, fixed: str | None) -> None:
    raw = "/" + name + rest + ("" if query is None else "?" + query)
    try:
        target = split_target(raw, fixed)
    except ProxyError as exc:
        assert exc.code in ("bad_request", "unknown_upstream")
        return
    assert target.path.startswith("/")
    if fixed is None:
        # The prefix routed on is exactly the one the upstream path was cut from.
        assert raw.partition("?")[0] == "/" + target.upstream + (target.path if target.path != "/" else "") or (
            raw.partition("?")[0] == "/" + target.upstream + "/"
        )
    else:
        assert target.upstream == "pinned"
    for form in decoded_forms(target.path):
        assert not has_dot_segment(form)


# -- schema-directed policy documents ---------------------------------------------------------

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=12),
    st.lists(st.integers(0, 600), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip
_durations = st.one_of(st.sampled_from(["0", "0s", "250ms", "2s", "5m", "24h", "1d", "-1s", "1e400s", "s", "3"]), _junk)
_sizes = st.one_of(st.sampled_from(["1KiB", "10MiB", "1GiB", "0", "1.5KiB", "-1MiB", "1e30GiB", "10XB"]), _junk)
_rates = st.one_of(st.sampled_from(["100/s", "0.5/s", "5/m", "1/h", "0/s", "-1/s", "1e400/s", "10/d"]), _junk)
_codes = st.lists(
    st.one_of(
        st.sampled_from([429, 500, 503, "connect_error", "timeout", "exhausted", "circuit_open", 99, "x"]), _junk
    ),
    max_size=4,
)


def _maybe(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


_policy = st.fixed_dictionaries(
    {
        "upstream": st.one_of(st.sampled_from(["api", "stripe", "b"]), st.text(max_size=6)),
        "target": st.one_of(
            st.sampled_from(["https://api.example.com", "http://127.0.0.1:1/v2", "ftp://x", "https://", "http://a b"]),
            st.text(max_size=15),
        ),
    },
    optional={
        "provider": st.one_of(st.sampled_from(["generic", "stripe", "paypal", "sendgrid", "nope"]), _junk),
        "timeouts": _maybe(connect=_durations, attempt=_durations, total=_durations),
        "limits": _maybe(max_body=_sizes, max_concurrency=_junk),
        "rate_limit": _maybe(
            rate=_rates,
            burst=_junk,
            shared=_junk,
            queue=_maybe(max_wait=_durations, max_size=_junk),
            respect_upstream=_junk,
        ),
        "retry": _maybe(
            attempts=_junk,
            on=_codes,
            retry_after=st.sampled_from(["honor", "ignore", "x"]),
            backoff=_maybe(initial=_durations, max=_durations, multiplier=_junk, jitter=_junk),
            budget=_maybe(ratio=_junk, min_per_second=_junk),
        ),
        "idempotency": _maybe(header=_junk, generate=_junk, replay_ttl=_durations, fingerprint_window=_durations),
        "cache": _maybe(
            ttl=_durations, methods=_junk, max_entries=_junk, max_entry_size=_sizes, stale_if_error=_durations
        ),
        "circuit_breaker": _maybe(
            window=_durations, min_requests=_junk, failure_rate=_junk, open_for=_durations, half_open_requests=_junk
        ),
        "failover": st.lists(_maybe(to=st.sampled_from(["api", "b", "zz"]), on=_codes), max_size=2),
        "headers": _maybe(add=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2), remove=_junk),
        "auth": st.one_of(
            _maybe(bearer=st.one_of(st.sampled_from(["tok", "${env:T}", "${file:/nonexistent}", "a\nb"]), _junk)),
            _maybe(basic=_maybe(username=_junk, password=_junk)),
        ),
        "tls": _maybe(verify=_junk, ca_file=_junk),
        "listen": st.one_of(st.sampled_from(["127.0.0.1:0", "127.0.0.1:99999", "nohost", ":80"]), _junk),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(_policy, min_size=1, max_size=3))
def test_schema_shaped_documents_load_or_fail_cleanly_and_what_loads_builds(docs: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "p.yaml").write_text(yaml.safe_dump_all(docs))
        result = load_policy_dir(tmp, secrets="lenient", environ={"T": "tok"})
    assert isinstance(result, LoadResult)
    assert result.ok == (result.policy_set is not None)
    for problem in result.problems:
        text = str(problem)
        assert "\n" not in text and "internal error" not in text and "Traceback" not in text
    if result.policy_set is not None:
        clock = RealClock()
        try:
            Runtime(clock, EventBus(), MemoryState(clock)).build(result.policy_set)
        except LookupError:
            pass  # an unknown provider plugin: `run` reports it as a start-up error


@settings(max_examples=300, deadline=None)
@given(seconds=st.floats(min_value=0, max_value=10**7, allow_nan=False).map(lambda x: round(x, 3)))
def test_format_duration_parses_back(seconds: float) -> None:
    assert abs(parse_duration(format_duration(seconds)) - seconds) <= max(1e-3, seconds * 1e-9)


@given(size=st.integers(min_value=0, max_value=2**40))
def test_format_size_parses_back(size: int) -> None:
    assert parse_size(format_size(size)) == size
