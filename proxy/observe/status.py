"""Data for `/status` and `/status.json`, gathered from pipeline events, and the page.

Recent figures cover the last five minutes (rate-limit use: the last minute). Nothing
here ever holds a header value, a query string, a path or a body, so no secret can reach
the page; the few free-text strings (reload problems, state-backend health) pass through
`scrub()` as well. docs/operations.md ("Status page") documents every field.
"""

from __future__ import annotations

import html
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from proxy.events import (
    CacheResult,
    CallFinished,
    CircuitChanged,
    ConfigReloaded,
    Event,
    FailoverResult,
    PoolConnected,
    RateLimited,
    RateLimitWaited,
    RetryScheduled,
    StateBackendError,
    Tally,
    WebhookResult,
    tally_gains,
)
from proxy.observe.logs import redact_text

WINDOW = 300.0
WEBHOOK_RESULTS = ("received", "delivered", "translated", "duplicate", "rejected", "retried", "dead", "dropped")
USE_WINDOW = 60.0
MAX_SAMPLES = 20_000
MAX_ERRORS = 10
GOOD_OUTCOMES = frozenset({"success", "client_error", "replayed", "cached", "queued"})
#: Content-Security-Policy of `/status`: no script, no fetch, no external anything.
CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
REFRESH_SECONDS = 5

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]*@")
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{4,}")
_TOKENLIKE = re.compile(r"\b(?:sk|pk|rk|whsec|key|tok|SG)[_.\-][A-Za-z0-9_.\-]{8,}\b")


def scrub(text: str, limit: int = 500) -> str:
    """Free text for the page: no URL credentials, bearer tokens, API-key-like or card-like strings."""
    text = _USERINFO.sub(r"\1***@", text)
    text = _BEARER.sub(r"\1 ***", text)
    text = _TOKENLIKE.sub("***", text)
    text = redact_text(text)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def safe_target(url: str) -> str:
    """The upstream's base URL without user info, query or fragment."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "-"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RecentCounter:
    """Events per one-second bucket over the last `window` seconds (bounded memory)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.buckets: deque[list[int]] = deque()  # [second, count]

    def add(self, now: float, n: int = 1) -> None:
        second = int(now)
        buckets = self.buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += n  # nothing new to prune since this bucket began (count() prunes)
        else:
            buckets.append([second, n])
            self._prune(now)

    def count(self, now: float, seconds: float | None = None) -> int:
        self._prune(now)
        since = now - (self.window if seconds is None else seconds)
        return sum(c for s, c in self.buckets if s + 1 > since)

    def _prune(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] + 1 <= now - self.window:
            self.buckets.popleft()


@dataclass
class FailoverTally:
    used: int = 0
    refused: int = 0
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # why refused / failed
    last: float | None = None  # wall time of the latest


@dataclass
class UpstreamStatus:
    # (time, good, duration, overhead or -1.0 when unknown)
    samples: deque[tuple[float, bool, float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    circuit: str = "closed"
    circuit_since: float | None = None
    retries: int = 0
    retries_recent: RecentCounter = field(default_factory=RecentCounter)
    rate_limited: int = 0
    rate_limited_recent: RecentCounter = field(default_factory=RecentCounter)
    rate_waited: int = 0
    admitted: RecentCounter = field(default_factory=lambda: RecentCounter(USE_WINDOW))
    cache: Counter[str] = field(default_factory=Counter)
    failovers: dict[str, FailoverTally] = field(default_factory=dict)  # by target upstream
    last_errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=MAX_ERRORS))
    webhooks: Counter[str] = field(default_factory=Counter)  # inbound events by result, since start
    handshakes: int = 0  # new upstream connections since start (warm or for a call)
    handshakes_recent: RecentCounter = field(default_factory=lambda: RecentCounter(USE_WINDOW))
    handshakes_resumed: int = 0  # of which resumed a TLS session
    handshakes_warm: int = 0  # of which opened by the warm pool


class StatusBoard:
    def __init__(self, *, tallies: Callable[[], Iterable[Tally]] | None = None) -> None:
        # Calls admitted by a rate limiter without waiting come as tallies of the bus
        # (proxy/events.py), read at most once a second and whenever a snapshot is made.
        self._tallies = tallies
        self._tallies_seen: dict[Tally, int] = {}
        self._next_tally_read = 0.0
        self.upstreams: dict[str, UpstreamStatus] = {}
        self.reloads: deque[dict[str, Any]] = deque(maxlen=5)
        self.backend_errors: deque[dict[str, Any]] = deque(maxlen=MAX_ERRORS)
        self.backend_error_count = 0
        self.started = time.time()

    # Attempt-level events are not shown here; leaving them out keeps them off its path.
    interests = (
        CallFinished,
        CircuitChanged,
        RetryScheduled,
        RateLimited,
        RateLimitWaited,
        CacheResult,
        FailoverResult,
        ConfigReloaded,
        StateBackendError,
        WebhookResult,
        PoolConnected,
    )

    def _get(self, name: str) -> UpstreamStatus:
        st = self.upstreams.get(name)
        if st is None:
            st = self.upstreams[name] = UpstreamStatus()
        return st

    def _read_tallies(self, now: float) -> None:
        """Add what the zero-wait tallies gained since the last read to `admitted`."""
        self._next_tally_read = now + 1.0
        if self._tallies is None:
            return
        for event, gained in tally_gains(self._tallies(), self._tallies_seen):
            if type(event) is RateLimitWaited and event.seconds == 0.0:
                self._get(event.upstream).admitted.add(now, gained)

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, CallFinished):
            if now >= self._next_tally_read:
                self._read_tallies(now)
            if event.route == "-":
                return  # unknown upstream: a client must not create entries here
            st = self._get(event.route)
            overhead = event.overhead if event.overhead is not None else -1.0
            st.samples.append((now, event.outcome in GOOD_OUTCOMES, event.duration, overhead))
            if event.error_code or event.outcome == "upstream_error":
                # Codes and statuses only: never the path, query, headers, detail or body.
                st.last_errors.append(
                    {
                        "time": round(time.time(), 3),
                        "code": event.error_code or "upstream_error",
                        "status": event.status,
                        "method": event.method if event.method.isalpha() else "-",
                        "upstream": event.upstream,
                        "failover": event.failover,
                    }
                )
        elif isinstance(event, PoolConnected):
            st = self._get(event.upstream)
            st.handshakes += 1
            st.handshakes_recent.add(now)
            st.handshakes_resumed += event.resumed
            st.handshakes_warm += event.warm
        elif isinstance(event, CircuitChanged):
            st = self._get(event.upstream)
            st.circuit = event.state
            st.circuit_since = round(time.time(), 3)
        elif isinstance(event, RetryScheduled):
            st = self._get(event.upstream)
            st.retries += 1
            st.retries_recent.add(now)
        elif isinstance(event, RateLimited):
            st = self._get(event.upstream)
            st.rate_limited += 1
            st.rate_limited_recent.add(now)
        elif isinstance(event, RateLimitWaited):
            st = self._get(event.upstream)
            st.admitted.add(now)
            if event.seconds > 0:
                st.rate_waited += 1
        elif isinstance(event, CacheResult):
            self._get(event.upstream).cache[event.result] += 1
        elif isinstance(event, FailoverResult):
            st = self._get(event.source)
            tally = st.failovers.get(event.target)
            if tally is None:
                tally = st.failovers[event.target] = FailoverTally()
            if event.result == "used":
                tally.used += 1
            elif event.result == "refused":
                tally.refused += 1
            else:
                tally.failed += 1
            if event.result != "used":
                tally.reasons[event.reason or "unknown"] += 1
            tally.last = round(time.time(), 3)
        elif isinstance(event, ConfigReloaded):
            self.reloads.append(
                {
                    "time": round(time.time(), 3),
                    "result": event.result,
                    "version": event.version,
                    "problems": [scrub(p) for p in event.problems[:20]],
                }
            )
        elif isinstance(event, WebhookResult):
            self._get(event.upstream).webhooks[event.result] += event.n
        elif isinstance(event, StateBackendError):
            # The error text is left out: a driver message may quote a URL or a value.
            self.backend_error_count += 1
            self.backend_errors.append(
                {"time": round(time.time(), 3), "backend": event.backend, "operation": event.operation}
            )

    def upstream_snapshot(
        self,
        name: str,
        stages: dict[str, dict[str, Any]] | None = None,
        pool: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Everything `/status.json` says about one upstream; `stages` holds the stages' own
        `snapshot()` results by stage name (circuit_breaker, rate_limit), `pool` the pool's
        settings and `Transport.pool_stats()` (its connections now)."""
        stages = stages or {}
        now = time.monotonic()
        self._read_tallies(now)
        st = self._get(name)
        cutoff = now - WINDOW
        while st.samples and st.samples[0][0] < cutoff:
            st.samples.popleft()
        n = len(st.samples)
        durations = sorted(d for _, _, d, _ in st.samples)
        overheads = sorted(o for _, _, _, o in st.samples if o >= 0)
        good = sum(1 for _, ok, _, _ in st.samples if ok)
        hits = st.cache.get("hit", 0) + st.cache.get("stale", 0)
        lookups = hits + st.cache.get("miss", 0)
        cb = stages.get("circuit_breaker")
        circuit: dict[str, Any] | None = None
        if cb is not None:
            circuit = {k: v for k, v in cb.items() if k != "state"}
        rl = stages.get("rate_limit")
        rate_limit: dict[str, Any] | None = None
        if rl is not None:
            rate = float(rl.get("rate_per_second") or 0.0)
            admitted = st.admitted.count(now) / USE_WINDOW
            rate_limit = {
                "rate_per_second": round(rate, 3),
                "burst": rl.get("burst"),
                "admitted_per_second_1m": round(admitted, 3),
                "use_1m": round(admitted / rate, 4) if rate > 0 else None,
                "queue_depth": rl.get("waiting", 0),
                "queue_max_size": rl.get("queue_max_size"),
                "queue_max_wait": rl.get("queue_max_wait"),
                "paused_for": round(float(rl.get("paused_for") or 0.0), 3),
                "waited": st.rate_waited,
                "rejected": st.rate_limited,
                "rejected_5m": st.rate_limited_recent.count(now),
            }
        return {
            # The state backend's view when the upstream has a breaker (shared with Redis);
            # "none" without one.
            "circuit": str(cb.get("state", st.circuit)) if cb is not None else "none",
            "circuit_since": st.circuit_since,
            "circuit_breaker": circuit,
            "calls_5m": n,
            "success_rate_5m": round(good / n, 4) if n else None,
            "p50_ms": round(_pct(durations, 0.5) * 1000, 2) if n else None,
            "p99_ms": round(_pct(durations, 0.99) * 1000, 2) if n else None,
            # egressd's own share of those calls (CallFinished.overhead)
            "overhead_p50_ms": round(_pct(overheads, 0.5) * 1000, 3) if overheads else None,
            "overhead_p99_ms": round(_pct(overheads, 0.99) * 1000, 3) if overheads else None,
            "pool": {
                **(pool or {}),
                "handshakes": st.handshakes,
                "handshakes_1m": st.handshakes_recent.count(now),
                "handshakes_resumed": st.handshakes_resumed,
                "handshakes_warm": st.handshakes_warm,
            },
            "retries": st.retries,
            "retries_5m": st.retries_recent.count(now),
            "rate_limit": rate_limit,
            "rate_limited": st.rate_limited,
            "cache_hit_rate": round(hits / lookups, 4) if lookups else None,
            "cache": dict(st.cache),
            "failovers": {
                target: {
                    "used": t.used,
                    "refused": t.refused,
                    "failed": t.failed,
                    "reasons": dict(t.reasons),
                    "last": t.last,
                }
                for target, t in sorted(st.failovers.items())
            },
            "last_errors": list(reversed(st.last_errors)),
        }

    def webhook_counts(self, name: str) -> dict[str, int]:
        """Inbound webhook events of one upstream by result, since this process started."""
        st = self._get(name)
        return {r: int(st.webhooks.get(r, 0)) for r in WEBHOOK_RESULTS}

    def clock_snapshot(self) -> dict[str, float]:
        return {"generated_at": round(time.time(), 3), "started_at": round(self.started, 3)}

    def backend_snapshot(self) -> dict[str, Any]:
        return {"errors": self.backend_error_count, "recent_errors": list(reversed(self.backend_errors))}


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------
_STYLE = """
:root{--fg:#1d2125;--mut:#5c6670;--line:#e3e6ea;--bg:#f6f7f9;--card:#fff;--ok:#176b2c;--warn:#8a5a00;--bad:#b00020}
*{box-sizing:border-box}
body{font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--fg);background:var(--bg)}
header{background:#20262d;color:#fff;padding:.75rem 1rem}
header h1{font-size:1.15rem;margin:0 0 .25rem}
header .meta{display:flex;flex-wrap:wrap;gap:.25rem 1rem;font-size:.85rem;color:#cfd6dd}
header .meta b{color:#fff;font-weight:600}
header .meta .s-ok,header .meta .s-success,header .meta .s-initial{color:#8fe3a5}
header .meta .s-failure,header .meta .s-down{color:#ff9c9c}
header .meta .s-degraded,header .meta .s-unknown{color:#ffd27a}
main{padding:.75rem;max-width:1400px;margin:0 auto}
.grid{display:grid;gap:.75rem;grid-template-columns:repeat(auto-fill,minmax(min(100%,400px),1fr))}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.75rem;min-width:0}
.card h2{font-size:1.05rem;margin:0;display:flex;align-items:center;gap:.5rem;flex-wrap:wrap}
.card .sub{color:var(--mut);font-size:.8rem;overflow-wrap:anywhere;margin:.15rem 0 .5rem}
.badge{font-size:.75rem;font-weight:700;padding:.1rem .5rem;border-radius:999px;text-transform:uppercase;
letter-spacing:.03em;border:1px solid currentColor}
.s-closed,.s-ok,.s-success,.s-initial{color:var(--ok)}
.s-half_open,.s-degraded,.s-none{color:var(--warn)}
.s-open,.s-failure,.s-down{color:var(--bad)}
.s-none{color:var(--mut)}
dl{display:grid;grid-template-columns:repeat(auto-fill,minmax(140px,1fr));gap:.4rem .75rem;margin:.25rem 0}
dl div{min-width:0}
dt{font-size:.72rem;color:var(--mut);text-transform:uppercase;letter-spacing:.03em}
dd{margin:0;font-variant-numeric:tabular-nums;overflow-wrap:anywhere}
.bar{height:4px;background:var(--line);border-radius:2px;margin-top:2px}
.bar i{display:block;height:4px;border-radius:2px;background:var(--ok)}
.bar i.hot{background:var(--bad)}
h3{font-size:.8rem;text-transform:uppercase;letter-spacing:.03em;color:var(--mut);margin:.75rem 0 .25rem}
table{border-collapse:collapse;width:100%;font-size:.82rem}
td,th{text-align:left;padding:.2rem .35rem;border-top:1px solid var(--line);vertical-align:top}
td{overflow-wrap:break-word}
tr.more td{border-top:0;padding-top:0;color:var(--mut);font-size:.78rem;overflow-wrap:anywhere}
th,.nw{white-space:nowrap}
th{font-weight:600;color:var(--mut)}
.note{background:#fff4f4;border:1px solid #f0c4c8;color:var(--bad);border-radius:8px;
padding:.5rem .75rem;margin:0 0 .75rem}
.note ul{margin:.25rem 0 0;padding-left:1.2rem}
.note li{overflow-wrap:anywhere}
.empty{color:var(--mut);font-size:.85rem}
footer{color:var(--mut);font-size:.75rem;padding:0 1rem 1rem;text-align:center}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: Any, suffix: str = "") -> str:
    return "-" if value is None else _e(value) + suffix


def _pct_text(value: Any) -> str:
    return "-" if value is None else f"{float(value) * 100:.1f}%"


def _clock(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return "-"
    return time.strftime("%H:%M:%S", time.gmtime(ts)) + "Z"


def _ago(ts: Any, now: float) -> str:
    if not isinstance(ts, int | float):
        return "-"
    seconds = max(0, int(now - ts))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _state_class(state: str) -> str:
    return "s-" + re.sub(r"[^a-z_]", "", state.split(":", 1)[0].lower())


def _bar(fraction: Any, hot_above: float = 0.9) -> str:
    if not isinstance(fraction, int | float):
        return ""
    width = max(0.0, min(1.0, float(fraction))) * 100
    hot = " class=hot" if fraction > hot_above else ""
    return f"<div class=bar><i{hot} style='width:{width:.0f}%'></i></div>"


def _item(label: str, value: str, extra: str = "") -> str:
    return f"<div><dt>{_e(label)}</dt><dd>{value}{extra}</dd></div>"


def _upstream_card(name: str, up: dict[str, Any], now: float) -> str:
    circuit = str(up.get("circuit", "none"))
    since = f" <span class=sub>since {_clock(up['circuit_since'])}</span>" if up.get("circuit_since") else ""
    items = [
        _item("calls (5m)", _fmt(up.get("calls_5m", 0))),
        _item("success (5m)", _pct_text(up.get("success_rate_5m"))),
        _item("p50 / p99", f"{_fmt(up.get('p50_ms'))} / {_fmt(up.get('p99_ms'), ' ms')}"),
        _item("retries (5m / all)", f"{_fmt(up.get('retries_5m', 0))} / {_fmt(up.get('retries', 0))}"),
        _item(
            "egressd's own p50 / p99",
            f"{_fmt(up.get('overhead_p50_ms'))} / {_fmt(up.get('overhead_p99_ms'), ' ms')}",
        ),
    ]
    pool = up.get("pool")
    if isinstance(pool, dict):
        warm = f" (min {_e(pool['min_warm'])})" if pool.get("min_warm") else ""
        items.append(
            _item(
                "connections open / idle / warm",
                f"{_fmt(pool.get('open', 0))} / {_fmt(pool.get('idle', 0))} / {_fmt(pool.get('warm', 0))}{warm}",
            )
        )
        resumed = pool.get("handshakes_resumed", 0)
        items.append(
            _item(
                "handshakes (1m / all)",
                f"{_fmt(pool.get('handshakes_1m', 0))} / {_fmt(pool.get('handshakes', 0))}"
                + (f" ({_e(resumed)} resumed)" if resumed else ""),
            )
        )
        backoff = pool.get("backoff_seconds") or 0
        if backoff:
            items.append(_item("warm-up backing off", f"{float(backoff):.1f} s"))
    rl = up.get("rate_limit")
    if isinstance(rl, dict):
        use = rl.get("use_1m")
        items.append(
            _item(
                "rate-limit use (1m)",
                f"{_pct_text(use)} of {_fmt(rl.get('rate_per_second'), '/s')}",
                _bar(use),
            )
        )
        queue_max = rl.get("queue_max_size")
        items.append(_item("queue", f"{_fmt(rl.get('queue_depth', 0))} / {_fmt(queue_max)}"))
        items.append(_item("rate-limited (5m / all)", f"{_fmt(rl.get('rejected_5m'))} / {_fmt(rl.get('rejected'))}"))
        paused = rl.get("paused_for") or 0
        items.append(_item("paused by upstream", f"{float(paused):.1f} s" if paused else "no"))
    else:
        items.append(_item("rate limit", "none"))
    items.append(_item("cache hit rate", _pct_text(up.get("cache_hit_rate"))))
    outbox = up.get("outbox")
    if isinstance(outbox, dict):
        items.append(
            _item(
                "outbox pending",
                f"{_fmt(outbox.get('pending', 0))} (oldest {_fmt(outbox.get('oldest_seconds'), ' s')})",
            )
        )
        items.append(
            _item(
                "outbox doubt / ambiguous / dead",
                " / ".join(_fmt(outbox.get(k, 0)) for k in ("in_doubt", "ambiguous", "dead")),
            )
        )
        done = outbox.get("deliveries") or {}
        items.append(
            _item(
                "outbox delivered / failed over",
                f"{_fmt(done.get('delivered', 0))} / {_fmt(done.get('failed_over', 0))}",
            )
        )
    hooks = up.get("webhooks")
    if isinstance(hooks, dict):
        items.append(
            _item(
                "webhooks received / delivered",
                f"{_fmt(hooks.get('received', 0))} / "
                f"{_fmt(int(hooks.get('delivered', 0)) + int(hooks.get('translated', 0)))}",
            )
        )
        items.append(
            _item(
                "webhooks pending / dead",
                f"{_fmt(hooks.get('pending', 0))} (oldest {_fmt(hooks.get('oldest_seconds'), ' s')})"
                f" / {_fmt(hooks.get('dead', 0))}",
            )
        )

    failovers = up.get("failovers") or {}
    if failovers:
        rows = []
        for target, t in failovers.items():
            reasons = ", ".join(f"{_e(r)} \u00d7{_e(n)}" for r, n in sorted(t.get("reasons", {}).items()))
            rows.append(
                f"<tr><td class=nw>&rarr; {_e(target)}</td><td>{_e(t.get('used', 0))}</td>"
                f"<td>{_e(t.get('refused', 0))}</td><td>{_e(t.get('failed', 0))}</td></tr>"
            )
            if reasons:
                rows.append(f"<tr class=more><td colspan=4>reasons: {reasons}</td></tr>")
        failover_html = (
            "<table><tr><th>to</th><th>used</th><th>refused</th><th>failed</th></tr>" + "".join(rows) + "</table>"
        )
    else:
        failover_html = "<p class=empty>none</p>"

    errors = up.get("last_errors") or []
    if errors:
        rows = []
        for err in errors[:5]:
            status, when = err.get("status"), err.get("time")
            rows.append(
                f"<tr><td class=nw>{_clock(when)}<br><span class=sub>{_ago(when, now)}</span></td>"
                f"<td><b>{_e(err.get('code'))}</b></td><td>{_e(status) if status else '-'}</td>"
                f"<td>{_e(err.get('method', '-'))}</td></tr>"
            )
            if err.get("failover"):
                rows.append(f"<tr class=more><td colspan=4>failover: {_e(err['failover'])}</td></tr>")
        errors_html = (
            "<table><tr><th>time (UTC)</th><th>code</th><th>status</th><th>method</th></tr>"
            + "".join(rows)
            + "</table>"
        )
    else:
        errors_html = "<p class=empty>none in memory</p>"

    provider = up.get("provider")
    sub = _e(up.get("target", "")) + (f" &middot; provider {_e(provider)}" if provider else "")
    return (
        f"<section class=card id='u-{_e(name)}'><h2>{_e(name)}"
        f"<span class='badge {_state_class(circuit)}'>circuit {_e(circuit.replace('_', '-'))}</span>{since}</h2>"
        f"<p class=sub>{sub}</p><dl>{''.join(items)}</dl>"
        f"<h3>Failovers</h3>{failover_html}<h3>Last errors</h3>{errors_html}</section>"
    )


def render_html(data: dict[str, Any]) -> str:
    """A self-contained page (no external assets, no script) that refreshes itself."""
    now = float(data.get("generated_at") or time.time())
    backend = data.get("state_backend") or {}
    health = str(backend.get("health", "ok"))
    reload = data.get("last_reload") or {}
    result = str(reload.get("result", "-"))
    ready = "draining" if data.get("draining") else ("ready" if data.get("ready") else "not ready")
    meta = [
        f"<span>policy set <b>{_fmt(data.get('policy_version'))}</b></span>",
        f"<span>last reload <b class='{_state_class(result)}'>{_e(result)}</b> "
        f"{_e(_ago(reload.get('time'), now))}</span>",
        f"<span>state backend <b>{_e(backend.get('name', 'memory'))}</b> "
        f"(<b class='{_state_class(health)}'>{_e(health)}</b>)</span>",
        f"<span>{_e(ready)} &middot; {_fmt(data.get('in_flight', 0))} in flight</span>",
    ]
    notes = []
    if result == "failure":
        problems = "".join(f"<li>{_e(p)}</li>" for p in reload.get("problems") or [])
        notes.append(
            "<div class=note><b>The last policy reload failed</b>; the previous set "
            f"({_fmt(reload.get('version'))}) keeps serving.<ul>{problems}</ul></div>"
        )
    if health != "ok":
        notes.append(f"<div class=note><b>State backend {_e(backend.get('name'))}:</b> {_e(health)}</div>")
    upstreams = data.get("upstreams") or {}
    # Trouble first: open circuits, then half-open, then the rest (each group by name).
    order = {"open": 0, "half_open": 1}
    ranked = sorted(upstreams.items(), key=lambda item: (order.get(str(item[1].get("circuit")), 2), item[0]))
    cards = "".join(_upstream_card(name, up, now) for name, up in ranked)
    if not cards:
        cards = "<p class=empty>no upstreams loaded</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="referrer" content="no-referrer">
<title>egressd status</title>
<style>{_STYLE}</style></head><body>
<header><h1>egressd status</h1><div class=meta>{"".join(meta)}</div></header>
<main>{"".join(notes)}<div class=grid>{cards}</div></main>
<footer>generated {_clock(now)} &middot; refreshes every {REFRESH_SECONDS} s &middot;
recent figures: last 5 minutes (rate-limit use: last minute) &middot; same data: /status.json</footer>
</body></html>
"""
