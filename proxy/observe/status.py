"""Data for `/status` and `/status.json`, gathered from pipeline events.

Recent figures cover the last five minutes. Nothing here ever holds a header value,
a query string or a body, so no secret can reach the page.
"""

from __future__ import annotations

import html
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from proxy.events import (
    CacheResult,
    CallFinished,
    CircuitChanged,
    ConfigReloaded,
    Event,
    FailoverResult,
    RateLimited,
    RateLimitWaited,
    RetryScheduled,
    StateBackendError,
)

WINDOW = 300.0
MAX_SAMPLES = 20_000
GOOD_OUTCOMES = frozenset({"success", "client_error", "replayed", "cached"})


@dataclass
class UpstreamStatus:
    samples: deque[tuple[float, bool, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    circuit: str = "closed"
    retries: int = 0
    rate_limited: int = 0
    rate_waited: int = 0
    cache: Counter[str] = field(default_factory=Counter)
    failovers: Counter[str] = field(default_factory=Counter)  # "to:result"
    last_errors: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=10))


class StatusBoard:
    def __init__(self) -> None:
        self.upstreams: dict[str, UpstreamStatus] = {}
        self.reloads: deque[dict[str, Any]] = deque(maxlen=5)
        self.backend_errors: deque[dict[str, Any]] = deque(maxlen=10)
        self.started = time.time()

    def _get(self, name: str) -> UpstreamStatus:
        st = self.upstreams.get(name)
        if st is None:
            st = self.upstreams[name] = UpstreamStatus()
        return st

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        if isinstance(event, CallFinished):
            st = self._get(event.route)
            st.samples.append((now, event.outcome in GOOD_OUTCOMES, event.duration))
            if event.error_code:
                st.last_errors.append(
                    {
                        "time": time.time(),
                        "code": event.error_code,
                        "status": event.status,
                        "request_id": event.request_id,
                    }
                )
        elif isinstance(event, CircuitChanged):
            self._get(event.upstream).circuit = event.state
        elif isinstance(event, RetryScheduled):
            self._get(event.upstream).retries += 1
        elif isinstance(event, RateLimited):
            self._get(event.upstream).rate_limited += 1
        elif isinstance(event, RateLimitWaited):
            if event.seconds > 0:
                self._get(event.upstream).rate_waited += 1
        elif isinstance(event, CacheResult):
            self._get(event.upstream).cache[event.result] += 1
        elif isinstance(event, FailoverResult):
            self._get(event.source).failovers[f"{event.target}:{event.result}"] += 1
        elif isinstance(event, ConfigReloaded):
            self.reloads.append(
                {
                    "time": time.time(),
                    "result": event.result,
                    "version": event.version,
                    "problems": list(event.problems),
                }
            )
        elif isinstance(event, StateBackendError):
            self.backend_errors.append({"time": time.time(), "backend": event.backend, "operation": event.operation})

    def upstream_snapshot(self, name: str) -> dict[str, Any]:
        st = self._get(name)
        cutoff = time.monotonic() - WINDOW
        while st.samples and st.samples[0][0] < cutoff:
            st.samples.popleft()
        n = len(st.samples)
        durations = sorted(d for _, _, d in st.samples)
        good = sum(1 for _, ok, _ in st.samples if ok)
        hits = st.cache.get("hit", 0) + st.cache.get("stale", 0)
        lookups = hits + st.cache.get("miss", 0)
        return {
            "circuit": st.circuit,
            "calls_5m": n,
            "success_rate_5m": round(good / n, 4) if n else None,
            "p50_ms": round(_pct(durations, 0.5) * 1000, 2) if n else None,
            "p99_ms": round(_pct(durations, 0.99) * 1000, 2) if n else None,
            "retries": st.retries,
            "rate_limited": st.rate_limited,
            "rate_waited": st.rate_waited,
            "cache_hit_rate": round(hits / lookups, 4) if lookups else None,
            "failovers": dict(st.failovers),
            "last_errors": list(st.last_errors),
        }


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def render_html(data: dict[str, Any]) -> str:
    """A self-contained page (no external assets) that refreshes itself."""
    rows = []
    for name, up in data.get("upstreams", {}).items():
        circuit = html.escape(str(up.get("circuit")))
        rate = up.get("success_rate_5m")
        failovers = ", ".join(f"{html.escape(k)}={v}" for k, v in up.get("failovers", {}).items()) or "-"
        errors = ", ".join(html.escape(str(e["code"])) for e in up.get("last_errors", [])[-3:]) or "-"
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td class='c-{circuit}'>{circuit}</td>"
            f"<td>{html.escape(str(up.get('target', '')))}</td>"
            f"<td>{up.get('calls_5m', 0)}</td><td>{'-' if rate is None else f'{rate * 100:.1f}%'}</td>"
            f"<td>{_fmt(up.get('p50_ms'))} / {_fmt(up.get('p99_ms'))}</td>"
            f"<td>{up.get('retries', 0)}</td><td>{up.get('rate_limited', 0)}</td>"
            f"<td>{_fmt(up.get('cache_hit_rate'))}</td><td>{failovers}</td><td>{errors}</td></tr>"
        )
    backend = data.get("state_backend", {})
    reload = data.get("last_reload") or {}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="5">
<title>egressd status</title>
<style>
body{{font-family:system-ui,sans-serif;margin:1rem;color:#222}}
table{{border-collapse:collapse;width:100%;font-size:.9rem}}
th,td{{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left}}
th{{background:#f4f4f4}}
.c-closed{{color:#176117}} .c-half_open{{color:#9a6700}} .c-open{{color:#b00020;font-weight:bold}}
.wrap{{overflow-x:auto}} .meta{{color:#555;font-size:.85rem}}
</style></head><body>
<h1>egressd</h1>
<p class="meta">policy set {html.escape(str(data.get("policy_version")))} &middot;
last reload: {html.escape(str(reload.get("result", "-")))} &middot;
state backend: {html.escape(str(backend.get("name", "memory")))} ({html.escape(str(backend.get("health", "ok")))})
&middot; draining: {html.escape(str(data.get("draining", False)))}</p>
<div class="wrap"><table>
<tr><th>upstream</th><th>circuit</th><th>target</th><th>calls (5m)</th><th>success</th><th>p50 / p99 ms</th>
<th>retries</th><th>rate-limited</th><th>cache hit rate</th><th>failovers</th><th>last errors</th></tr>
{"".join(rows)}
</table></div></body></html>
"""


def _fmt(value: Any) -> str:
    return "-" if value is None else html.escape(str(value))
