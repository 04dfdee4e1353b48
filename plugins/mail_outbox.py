"""What the outbox needs from the e-mail providers (contract 7.6, docs/outbox.md).

The tag. A kept send is delivered carrying egressd's id under the name `TAG`:
SendGrid `custom_args.egressd_outbox_id` (custom_args travel into SendGrid's events and
can be searched in its Email Activity API), Mailgun `v:egressd_outbox_id` (a user
variable: it travels into Mailgun's events and webhooks, and its events API filters on
it). The failover translations map one onto the other (custom_args <-> v:), so the tag
survives a SendGrid <-> Mailgun failover under the same name.

The probe. After an ambiguous delivery (a timeout or reset once the send was written, a
5xx, a process killed mid-send) egressd asks before it sends again:

* Mailgun: `GET /v3/{domain}/events?event=accepted&user-variables={"egressd_outbox_id": ID}`
  (the events API; Mailgun keeps events for days and documents the `user-variables`
  filter). An `accepted` item means Mailgun has it.
* SendGrid: `GET /v3/messages?query=unique_args['egressd_outbox_id']="ID"&limit=1` (the
  Email Activity API; it needs SendGrid's "additional email activity history" add-on
  and an API key with Email Activity access: without them SendGrid answers 4xx, the
  verdict is `unknown` and the send stays `ambiguous` for the operator).

Both indexes lag a little behind the send itself, so the worker waits
`outbox.probe_after` (default 60 s) before it asks.

The ids the app gets. Mailgun documents no promise to keep a `Message-Id` header a
sender sets, so egressd does not rely on one: the app gets `<ID@domain>` (Mailgun's id
shape) or SendGrid's `X-Message-Id: ID`, where ID is egressd's outbox id; the provider's
own id, once it has the send, is kept beside it (`/outbox.json`, `provider_id`).
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, urlencode

from plugins.base import WireAnswer, WireRequest, json_bytes

TAG = "egressd_outbox_id"
_MAILGUN_SEND = re.compile(r"^/v3/([^/]+)/messages/?$")
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


def _header(request: WireRequest, name: str) -> str:
    low = name.lower()
    for key, value in request.headers.items():
        if key.lower() == low:
            return value
    return ""


def _probe_headers(request: WireRequest) -> dict[str, str]:
    """The app's credentials (an upstream with its own `auth` block replaces them anyway)."""
    auth = _header(request, "Authorization")
    return {"Accept": "application/json", **({"Authorization": auth} if auth else {})}


# -- SendGrid ------------------------------------------------------------------------------


def sendgrid_accepted(outbox_id: str) -> WireAnswer:
    return WireAnswer(202, {"X-Message-Id": outbox_id}, b"")


def sendgrid_tag(request: WireRequest, outbox_id: str) -> WireRequest:
    if request.method != "POST" or not request.path.startswith("/v3/mail/send"):
        return request
    try:
        body = json.loads(request.body)
    except ValueError:
        return request
    if not isinstance(body, dict):
        return request
    args = body.get("custom_args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return request
    body["custom_args"] = {**args, TAG: outbox_id}
    return WireRequest(request.method, request.path, request.query, dict(request.headers), json_bytes(body))


def sendgrid_message_id(answer: WireAnswer) -> str:
    return answer.header("X-Message-Id") or ""


def sendgrid_probe(request: WireRequest, outbox_id: str) -> WireRequest | None:
    query = urlencode({"query": f"unique_args['{TAG}']=\"{outbox_id}\"", "limit": "1"}, quote_via=quote)
    return WireRequest("GET", "/v3/messages", query, _probe_headers(request))


def sendgrid_probe_verdict(answer: WireAnswer) -> tuple[str, str]:
    if answer.error is not None or answer.status != 200:
        return "unknown", ""
    data = answer.json()
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        return "unknown", ""
    if not messages:
        return "absent", ""
    first = messages[0]
    return "found", str(first.get("msg_id", "")) if isinstance(first, dict) else ""


# -- Mailgun -------------------------------------------------------------------------------


def mailgun_domain(path: str) -> str:
    m = _MAILGUN_SEND.match(path)
    return m.group(1) if m else ""


def mailgun_accepted(outbox_id: str, request: WireRequest) -> WireAnswer:
    domain = mailgun_domain(request.path) or "egressd.invalid"
    body = json_bytes({"id": f"<{outbox_id}@{domain}>", "message": "Queued. Thank you."})
    return WireAnswer(200, {"Content-Type": "application/json"}, body)


def mailgun_tag(request: WireRequest, outbox_id: str) -> WireRequest:
    if request.method != "POST" or not mailgun_domain(request.path):
        return request
    ctype = _header(request, "Content-Type")
    kind = ctype.split(";", 1)[0].strip().lower()
    if kind == "application/x-www-form-urlencoded":
        sep = b"&" if request.body and not request.body.endswith(b"&") else b""
        body = request.body + sep + urlencode({f"v:{TAG}": outbox_id}).encode()
    elif kind == "multipart/form-data":
        m = _BOUNDARY.search(ctype)
        if m is None:
            return request
        closing = f"--{m.group(1)}--".encode()
        at = request.body.rfind(closing)
        if at < 0:
            return request
        part = (f'--{m.group(1)}\r\nContent-Disposition: form-data; name="v:{TAG}"\r\n\r\n{outbox_id}\r\n').encode()
        body = request.body[:at] + part + request.body[at:]
    else:
        return request
    headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
    return WireRequest(request.method, request.path, request.query, headers, body)


def mailgun_message_id(answer: WireAnswer) -> str:
    data = answer.json()
    return str(data.get("id", "")) if isinstance(data, dict) else ""


def mailgun_probe(request: WireRequest, outbox_id: str) -> WireRequest | None:
    domain = mailgun_domain(request.path)
    if not domain:
        return None
    query = urlencode(
        {"event": "accepted", "user-variables": json.dumps({TAG: outbox_id}), "limit": "1"}, quote_via=quote
    )
    return WireRequest("GET", f"/v3/{domain}/events", query, _probe_headers(request))


def mailgun_probe_verdict(answer: WireAnswer) -> tuple[str, str]:
    if answer.error is not None or answer.status != 200:
        return "unknown", ""
    data = answer.json()
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return "unknown", ""
    if not items:
        return "absent", ""
    first = items[0]
    message = first.get("message") if isinstance(first, dict) else None
    headers = message.get("headers") if isinstance(message, dict) else None
    found = headers.get("message-id", "") if isinstance(headers, dict) else ""
    return "found", f"<{found}>" if found and not str(found).startswith("<") else str(found)
