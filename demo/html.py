"""`egressd demo --html FILE`: a self-contained report (inline CSS and SVG, no external assets)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

from demo.blackfriday import WEBHOOK_REDELIVER, WebhookTally, undelivered_lines, webhook_verifiers

if TYPE_CHECKING:
    from demo.blackfriday import RunResult, Scenario

COLORS = {
    "stripe": "#635bff",
    "paypal": "#0070e0",
    "sendgrid": "#0d9488",
    "mailgun": "#c02126",
    "429": "#f59e0b",
    "direct": "#9ca3af",
    "egressd": "#059669",
}
LABELS = {
    "stripe": "Stripe charges",
    "paypal": "PayPal captures",
    "sendgrid": "SendGrid sent",
    "mailgun": "Mailgun queued",
    "429": "429s answered",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:980px;
padding:16px;color:#111827;background:#fff}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{padding:4px 8px;border-bottom:1px solid #e5e7eb;text-align:right}
th:first-child,td:first-child{text-align:left}
td.bad{color:#b91c1c;font-weight:600}td.good{color:#047857;font-weight:600}
.verdict{padding:8px 12px;border-radius:6px;font-weight:600}
.ok{background:#d1fae5}.fail{background:#fee2e2}
ul{font-size:.9rem}svg{max-width:100%;height:auto}
.legend span{display:inline-block;margin-right:14px;font-size:.85rem}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
"""


def _bars(title: str, groups: list[tuple[str, float, float]], unit: str = "") -> str:
    """Grouped horizontal bars: one group per metric, direct (grey) vs egressd (green)."""
    width, label_w, row_h = 720, 230, 20
    height = 30 + len(groups) * (2 * row_h + 14)
    top = max([1.0, *(max(d, t) for _, d, t in groups)])
    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="0" y="16" font-size="14" font-weight="600">{escape(title)}</text>',
    ]
    y = 30
    for name, d, t in groups:
        parts.append(f'<text x="0" y="{y + row_h + 4}" font-size="12">{escape(name)}</text>')
        for value, key in ((d, "direct"), (t, "egressd")):
            w = (width - label_w - 90) * value / top
            parts.append(
                f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{row_h - 4}" fill="{COLORS[key]}"/>'
                f'<text x="{label_w + w + 4:.1f}" y="{y + row_h - 8}" font-size="11">{value:g}{unit}</text>'
            )
            y += row_h
        y += 14
    parts.append("</svg>")
    return "".join(parts)


def _timeline(title: str, run: RunResult, sc: Scenario, length: int) -> str:
    """Side effects per simulated second at each provider, 429s, and the fault windows."""
    width, height, left, bottom = 900, 260, 44, 26
    series = run.timeline
    top = max([1, *(max(v, default=0) for v in series.values())])
    plot_w, plot_h = width - left - 10, height - bottom - 30

    def x(s: float) -> float:
        return left + plot_w * s / length

    def y(v: float) -> float:
        return 30 + plot_h * (1 - v / top)

    parts = [
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}">',
        f'<text x="0" y="16" font-size="14" font-weight="600">{escape(title)}</text>',
    ]
    for n, (label, start, end) in enumerate(sc.windows()):
        if start < length:
            band = plot_h / 2
            parts.append(
                f'<rect x="{x(start):.1f}" y="{30 + n * band:.1f}" width="{x(min(end, length)) - x(start):.1f}" '
                f'height="{band:.1f}" fill="{("#fee2e2", "#fef3c7")[n % 2]}"/><text x="{x(start) + 3:.1f}" '
                f'y="{42 + n * band:.1f}" font-size="11" fill="#7f1d1d">{escape(label)}</text>'
            )
    parts.append(
        f'<line x1="{left}" y1="{30 + plot_h}" x2="{width - 10}" y2="{30 + plot_h}" stroke="#6b7280"/>'
        f'<line x1="{left}" y1="30" x2="{left}" y2="{30 + plot_h}" stroke="#6b7280"/>'
        f'<text x="{left - 4}" y="36" font-size="11" text-anchor="end">{top}</text>'
        f'<text x="{left - 4}" y="{30 + plot_h}" font-size="11" text-anchor="end">0</text>'
    )
    step = max(1, round(length / 10 / 10) * 10) if length > 20 else max(1, length // 5)
    for s in range(0, length + 1, step):
        parts.append(f'<text x="{x(s):.1f}" y="{height - 8}" font-size="11" text-anchor="middle">{s} s</text>')
    for name, values in series.items():
        if not any(values):
            continue
        points = " ".join(f"{x(i + 0.5):.1f},{y(v):.1f}" for i, v in enumerate(values))
        dash = ' stroke-dasharray="4 3"' if name == "429" else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="{COLORS[name]}" stroke-width="1.8"{dash}/>')
    parts.append("</svg>")
    legend = "".join(
        f'<span><i style="background:{COLORS[n]}"></i>{escape(LABELS[n])}</span>' for n in series if any(series[n])
    )
    return "".join(parts) + f'<div class="legend">{legend} (per simulated second)</div>'


def _outbox_section(sc: Scenario, through: RunResult) -> list[str]:
    """What the e-mail outbox kept and what became of it, with every undelivered send (bounded)."""
    o = through.outbox
    if o is None:
        return []
    parts = [
        "<h2>The e-mail outbox</h2>",
        f"<p>Through egressd, {o.accepted} e-mails were kept by the outbox and answered 202 "
        f"(<code>X-Egressd-Outbox: queued</code>): {o.delivered_later} delivered later, "
        f"{o.failed_over_later} failed over later to Mailgun, {o.ambiguous} ambiguous, {o.dead} dead, "
        f"{o.pending} still pending"
        + "".join(
            f"; {what} {sum(unseen.values())} ({', '.join(f'{n} {state}' for state, n in sorted(unseen.items()))})"
            for what, unseen in (
                ("kept while the app gave up before the 202:", o.unanswered),
                ("kept by Mailgun's own outbox in a failover:", o.in_failover),
            )
            if unseen
        )
        + ". "
        + (
            f"The run waited {o.drain_wall * sc.k:.0f} simulated seconds after the traffic for it to empty."
            if o.drained
            else f"It was not empty after {o.drain_bound * sc.k:.0f} simulated seconds of waiting."
        )
        + "</p>",
    ]
    lines = undelivered_lines(o)
    if lines:
        parts.append(f"<p>Kept and not at any provider ({len(o.undelivered)}):</p><ul>")
        parts += [f"<li>{escape(line)}</li>" for line in lines]
        parts.append("</ul>")
    elif o.accepted or o.unanswered or o.in_failover:
        parts.append("<p>Every e-mail the outbox kept was delivered.</p>")
    else:
        parts.append("<p>No send failed before reaching SendGrid or Mailgun, so the outbox kept none.</p>")
    return parts


def _webhook_section(direct: RunResult, through: RunResult) -> list[str]:
    """What the shop's webhook endpoints got, per payment and per e-mail, in both runs."""
    d, t = direct.webhooks or WebhookTally(), through.webhooks or WebhookTally()
    verifiers = webhook_verifiers(t) or webhook_verifiers(d)
    return [
        "<h2>Webhooks at the shop</h2>",
        "<p>The shop fulfils orders from Stripe's <code>payment_intent.succeeded</code> webhook and keeps its mail "
        "records from SendGrid's Event Webhook; it has those two endpoints only, and checks every delivery "
        f"({escape(verifiers)}). The fakes send their events as the providers do and deliver "
        f"{WEBHOOK_REDELIVER:.0%} of them twice (providers deliver at least once). Counts are raw: the shop "
        "deduplicates nothing.</p>",
        "<ul>",
        f"<li>Directly: {d.pay_once} of {direct.pay.delivered} payments that happened got exactly one verified "
        f"<code>payment_intent.succeeded</code>, {d.pay_twice} got it twice or more, {d.pay_none} none; "
        f"{d.mail_once} of {direct.mail.delivered} e-mails got exactly one <code>delivered</code> event.</li>",
        f"<li>Through egressd: {t.pay_once} of {through.pay.delivered} payments got exactly one ({t.pay_twice} twice, "
        f"{t.pay_none} none), {t.pay_translated} of them translated from PayPal's "
        f"<code>PAYMENT.CAPTURE.COMPLETED</code> after a failover (the app has no PayPal endpoint); "
        f"{t.mail_once} of {through.mail.delivered} e-mails got exactly one <code>delivered</code> event, "
        f"{t.mail_translated} translated from Mailgun's. egressd absorbed {t.absorbed_pay + t.absorbed_mail} provider "
        "redeliveries (verified, recognised by event id, answered 200, not delivered again).</li>",
        "</ul>",
    ]


def render_html(
    sc: Scenario,
    direct: RunResult,
    through: RunResult,
    rows: list[tuple[str, str, str]],
    notes: list[str],
    part1: list[tuple[str, str, str, bool]],
    verdict: tuple[bool, str],
    definitions: list[str],
    data_json: str,
) -> str:
    ok, why = verdict
    safe_json = data_json.replace("</", "<\\/")

    def cell(text: str, good: bool | None = None) -> str:
        cls = "" if good is None else (' class="good"' if good else ' class="bad"')
        return f"<td{cls}>{escape(text)}</td>"

    length = max([1, *(len(v) for r in (direct, through) for v in r.timeline.values())])
    table = ["<table><tr><th></th><th>direct, naive client</th><th>through egressd</th></tr>"]
    for name, d, t in rows:
        indent = ' style="padding-left:24px"' if name.startswith(" ") else ""
        table.append(f"<tr><td{indent}>{escape(name.strip())}</td>{cell(d)}{cell(t)}</tr>")
    table.append("</table>")
    mech = ["<table><tr><th>mechanism</th><th>what we did</th><th>what happened</th><th>result</th></tr>"]
    for name, action, observed, good in part1:
        mech.append(
            f"<tr><td>{escape(name)}</td><td>{escape(action)}</td><td>{escape(observed)}</td>"
            f"{cell('ok' if good else 'FAILED', good)}</tr>"
        )
    mech.append("</table>")
    outcome_chart = _bars(
        "What happened to the shop's calls",
        [
            ("payments delivered", direct.pay.delivered, through.pay.delivered),
            ("payments duplicated", direct.pay.duplicated, through.pay.duplicated),
            ("payments lost", direct.pay.lost, through.pay.lost),
            ("e-mails delivered", direct.mail.delivered, through.mail.delivered),
            ("e-mails duplicated", direct.mail.duplicated, through.mail.duplicated),
            ("e-mails lost", direct.mail.lost, through.mail.lost),
            ("e-mails kept by the outbox", 0, through.outbox.accepted if through.outbox else 0),
            (
                "payments: exactly one webhook",
                direct.webhooks.pay_once if direct.webhooks else 0,
                through.webhooks.pay_once if through.webhooks else 0,
            ),
            (
                "e-mails: exactly one webhook",
                direct.webhooks.mail_once if direct.webhooks else 0,
                through.webhooks.mail_once if through.webhooks else 0,
            ),
            ("provider 429s", direct.provider_429, through.provider_429),
        ],
    )
    latency_chart = _bars(
        "p99 latency (simulated seconds)",
        [
            ("payments p99", round(direct.pay.p99, 2), round(through.pay.p99, 2)),
            ("e-mails p99", round(direct.mail.p99, 2), round(through.mail.p99, 2)),
        ],
        " s",
    )
    outbox = _outbox_section(sc, through)
    legend = (
        '<div class="legend"><span><i style="background:#9ca3af"></i>direct, naive client</span>'
        '<span><i style="background:#059669"></i>through egressd</span></div>'
    )
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            "<title>egressd demo: Black-Friday simulation</title>",
            f"<style>{CSS}</style></head><body>",
            "<h1>egressd demo: Black-Friday simulation</h1>",
            f'<p class="verdict {"ok" if ok else "fail"}">{"PASS" if ok else "FAIL"}: {escape(why)}</p>',
            "<h2>The scenario</h2><ul>",
            *(f"<li>{escape(line)}</li>" for line in [*sc.describe(), *notes]),
            "</ul><h2>Results</h2>",
            *table,
            legend,
            outcome_chart,
            latency_chart,
            *outbox,
            *_webhook_section(direct, through),
            "<h2>Over time</h2>",
            _timeline("Direct, naive client", direct, sc, length),
            _timeline("Through egressd", through, sc, length),
            "<h2>Definitions</h2><ul>",
            *(f"<li>{escape(line)}</li>" for line in definitions),
            "</ul><h2>Part 1: resilience mechanisms</h2>",
            *mech,
            f'<script type="application/json" id="data">{safe_json}</script>',
            "</body></html>",
        ]
    )
