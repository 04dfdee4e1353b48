"""A fake Mailgun messages API, see providers.md section 5.

``POST /v3/{domain}/messages`` with ``Authorization: Basic base64(api:KEY)`` and a
``multipart/form-data`` or ``application/x-www-form-urlencoded`` body: 200
``{"id": "<...@domain>", "message": "Queued. Thank you."}``.  Errors are
``{"message": "..."}``; 401 is the plain text ``Forbidden``; unknown domains (when
``domains`` is given) are 404 ``Domain not found: ...``.

``GET /v3/{domain}/events?event=accepted&user-variables={"NAME": "VALUE"}`` is a small
part of the events API: an ``accepted`` event for every message of that domain whose
user variables (``v:NAME`` fields) hold all the given pairs, as
``{"items": [{"event", "id", "timestamp", "message": {"headers": {"message-id"}},
"user-variables"}], "paging": {}}``.  egressd's outbox asks it before it resends a send
in doubt.

Side effect: ``message.queued`` per accepted request; ``data`` holds every form field
(lists of strings; files as ``{filename, content_type, size}``).  Its ``key`` is the
``h:X-Idempotency-Key`` form field when present (Mailgun does not dedupe on it).

Webhooks (opt-in, ``webhooks={"url": ...}``; fakes/webhooks.py): a ``delivered`` event per
recipient of every message queued, one JSON POST each, ``{"signature": {"timestamp",
"token", "signature"}, "event-data": {...}}`` as Mailgun sends them (providers.md 5.5): the
signature is the hex HMAC-SHA256 of ``timestamp + token`` keyed with
``webhook_signing_key``, made anew for every try (the ``event-data`` bytes stay the same);
``event-data`` holds ``id``, ``timestamp``, ``event``, ``recipient``, ``tags``,
``message.headers.message-id`` (the id the send was answered with, without ``<>``),
``user-variables`` (the ``v:`` fields) and ``delivery-status``. mailgun's
``SecurityGuard.verify_webhook`` accepts them.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import web

from .faults import Faults
from .server import LEDGER_KEY, RESET_HOOKS_KEY, Ledger, current_record, new_fake_app, note_body, side_effect_point
from .signing import mailgun_signature
from .webhooks import WebhookSettings, install_webhooks

__all__ = ["DEFAULT_WEBHOOK_SIGNING_KEY", "mailgun_signature", "make_mailgun_app"]

DEFAULT_WEBHOOK_SIGNING_KEY = "fake-mailgun-webhook-signing-key"
_BARE_ADDR = re.compile(r"<\s*([^<>\s]+)\s*>")

MAX_REQUEST = int(52.4 * 1024 * 1024)
MAX_OPTIONS = 16 * 1024
_ADDR_RE = re.compile(r"^\s*(?:[^<>]*<\s*[^@\s<>]+@[^@\s<>]+\s*>|[^@\s<>,]+@[^@\s<>,]+)\s*$")


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def mailgun_error_response(request: web.Request, status: int, message: str) -> web.Response:
    if status == 401:
        return web.Response(status=401, text="Forbidden", content_type="text/plain")
    if status == 429:
        message = "Domain is not allowed to send: request limit exceeded, try again later"
    return _json(status, {"message": message})


def _split_addresses(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        # commas separate addresses, except inside a quoted display name
        parts = re.split(r",(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", v)
        out.extend(p.strip() for p in parts if p.strip())
    return out


def make_mailgun_app(
    faults: Faults | None = None,
    *,
    ledger: Ledger | None = None,
    api_keys: set[str] | None = None,
    domains: set[str] | None = None,
    webhooks: WebhookSettings | Mapping[str, Any] | None = None,
    webhook_signing_key: str = DEFAULT_WEBHOOK_SIGNING_KEY,
) -> web.Application:
    """The fake Mailgun.  ``api_keys``: accept only these (default: any non-empty key);
    ``domains``: the sending domains that exist (default: any); ``webhooks``: where and how to
    send ``delivered`` events (default: none sent), signed with ``webhook_signing_key``."""
    app = new_fake_app("mailgun", mailgun_error_response, faults=faults, ledger=ledger, client_max_size=MAX_REQUEST + 1)
    led = app[LEDGER_KEY]

    spec = {"scheme": "mailgun", "key": webhook_signing_key}
    sender = install_webhooks(app, "mailgun", lambda: spec, webhooks, app[RESET_HOOKS_KEY])

    async def send(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user = key = ""
        if auth.startswith("Basic "):
            try:
                user, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user = key = ""
        if user != "api" or not key or (api_keys is not None and key not in api_keys):
            return web.Response(status=401, text="Forbidden", content_type="text/plain")
        domain = request.match_info["domain"]
        if domains is not None and domain not in domains:
            return _json(404, {"message": f"Domain not found: {domain}"})
        if (request.content_length or 0) > MAX_REQUEST:
            return _json(413, {"message": "request size exceeds 52.4MiB limit"})
        ctype = request.content_type
        if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return _json(
                400, {"message": "Content-Type must be multipart/form-data or application/x-www-form-urlencoded"}
            )
        try:
            if ctype == "application/x-www-form-urlencoded":
                raw = await request.read()
                note_body(request, raw)
            form = await request.post()
        except web.HTTPRequestEntityTooLarge:
            return _json(413, {"message": "request size exceeds 52.4MiB limit"})
        fields: dict[str, list[Any]] = {}
        for name, value in form.items():
            if isinstance(value, web.FileField):
                data = value.file.read()
                fields.setdefault(name, []).append(
                    {"filename": value.filename, "content_type": value.content_type, "size": len(data)}
                )
            else:
                fields.setdefault(name, []).append(str(value))

        def first(name: str) -> str | None:
            vals = fields.get(name)
            return vals[0] if vals and isinstance(vals[0], str) else None

        if not first("from"):
            return _json(400, {"message": "from parameter is missing"})
        if not _ADDR_RE.match(first("from") or ""):
            return _json(400, {"message": "from parameter is not a valid address. please check documentation"})
        to = _split_addresses(v for v in fields.get("to", []) if isinstance(v, str))
        if not to:
            return _json(400, {"message": "to parameter is missing"})
        recipients = list(to)
        for kind in ("to", "cc", "bcc"):
            addrs = _split_addresses(v for v in fields.get(kind, []) if isinstance(v, str))
            if kind != "to":
                recipients += addrs
            for a in addrs:
                if not _ADDR_RE.match(a):
                    return _json(
                        400, {"message": f"{kind} parameter is not a valid address. please check documentation"}
                    )
        if len(recipients) > 1000:
            return _json(400, {"message": "Too many recipients, max is 1000"})
        has_template = bool(first("template"))
        if not (first("text") or first("html") or first("amp-html") or has_template):
            return _json(400, {"message": "Need at least one of 'text' or 'html' parameters specified"})
        if first("html") and has_template:
            return _json(400, {"message": "Only one parameters 'html' or 'template' is allowed"})
        opt_size = sum(
            len(n) + sum(len(v) for v in vals if isinstance(v, str))
            for n, vals in fields.items()
            if n[:2] in ("o:", "h:", "v:")
        )
        if opt_size > MAX_OPTIONS:
            return _json(
                400, {"message": "Send options (parameters starting with o:, h:, or v:) are limited to 16 kB total"}
            )
        rv = first("recipient-variables")
        if rv is not None:
            try:
                if not isinstance(json.loads(rv), dict):
                    raise ValueError
            except ValueError:
                return _json(400, {"message": "'recipient-variables' parameter is not a valid JSON"})
        tv = first("t:variables")
        if tv is not None:
            try:
                json.loads(tv)
            except ValueError:
                return _json(400, {"message": "'t:variables' parameter is not a valid JSON"})
        dt = first("o:deliverytime")
        if dt is not None:
            try:
                when = parsedate_to_datetime(dt).timestamp()
            except (TypeError, ValueError):
                return _json(400, {"message": f"{dt} is not an RFC-2822 compliant date"})
            if when > time.time() + 3 * 86400:
                return _json(400, {"message": "o:deliverytime may be at most 3 days in the future"})
        await side_effect_point(request)
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        msg_id = f"<{stamp}.{secrets.token_hex(8)}@{domain}>"
        rec = current_record(request)
        led.record(
            "message.queued",
            msg_id,
            key=first("h:X-Idempotency-Key"),
            request_id=rec.request_id if rec else None,
            domain=domain,
            to=to,
            recipients=recipients,
            subject=first("subject"),
            fields=fields,
        )
        variables = {n[2:]: v[0] for n, v in fields.items() if n.startswith("v:") and v and isinstance(v[0], str)}
        events.setdefault(domain, []).append(
            {
                "event": "accepted",
                "id": secrets.token_urlsafe(16),
                "timestamp": time.time(),
                "message": {"headers": {"message-id": msg_id.strip("<>"), "subject": first("subject")}},
                "recipient": to[0],
                "user-variables": variables,
            }
        )
        if sender.enabled:
            tags = [t for t in fields.get("o:tag", []) if isinstance(t, str)]
            for address in recipients:
                m = _BARE_ADDR.search(address)
                email = (m.group(1) if m else address).strip().lower()
                event_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
                event_data = {
                    "id": event_id,
                    "timestamp": round(time.time(), 6),
                    "log-level": "info",
                    "event": "delivered",
                    "recipient": email,
                    "recipient-domain": email.rpartition("@")[2],
                    "tags": tags,
                    "envelope": {"sender": first("from"), "transport": "smtp", "targets": email},
                    "message": {
                        "headers": {
                            "message-id": msg_id.strip("<>"),
                            "to": ", ".join(to),
                            "from": first("from"),
                            "subject": first("subject"),
                        },
                        "attachments": [],
                        "size": 0,
                    },
                    "user-variables": variables,
                    "delivery-status": {
                        "code": 250,
                        "message": "OK",
                        "description": "",
                        "attempt-no": 1,
                        "tls": True,
                        "mx-host": "mx." + email.rpartition("@")[2],
                    },
                    "flags": {"is-routed": False, "is-authenticated": True, "is-test-mode": False},
                }
                sender.send(event_id, "delivered", json.dumps(event_data, indent=2).encode(), ref=msg_id)
        return _json(200, {"id": msg_id, "message": "Queued. Thank you."})

    events: dict[str, list[dict[str, Any]]] = {}

    async def list_events(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Basic "):
            return web.Response(status=401, text="Forbidden", content_type="text/plain")
        parsed: Any = {}
        raw = request.query.get("user-variables")
        if raw is not None:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            return _json(400, {"message": "user-variables must be a JSON object"})
        wanted: dict[str, Any] = parsed
        kind = request.query.get("event")
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), 300))
        except ValueError:
            return _json(400, {"message": "limit must be a number"})
        found = [
            e
            for e in events.get(request.match_info["domain"], [])
            if (kind is None or e["event"] == kind)
            and all(str(e["user-variables"].get(k)) == str(v) for k, v in wanted.items())
        ]
        return _json(200, {"items": found[:limit], "paging": {}})

    app.router.add_post("/v3/{domain}/messages", send)
    app.router.add_get("/v3/{domain}/events", list_events)
    return app
