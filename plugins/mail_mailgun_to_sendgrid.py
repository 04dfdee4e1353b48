"""Mailgun messages answered by SendGrid v3 Mail Send (providers.md 6.3-6.4)."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, getaddresses, parseaddr, parsedate_to_datetime
from typing import Any

from plugins import mail_outbox
from plugins.base import FailoverContext, Refused, Translated, TranslatorRun, WireAnswer, WireRequest, json_bytes
from plugins.forms import FilePart, parse_form
from plugins.shapes import json_answer, operation, token

_PATH = re.compile(r"^/v3/([^/]+)/messages$")
MAPPED = frozenset(
    "from to cc bcc subject text html template t:variables o:tag o:deliverytime o:testmode o:tracking "
    "o:tracking-clicks o:tracking-opens recipient-variables".split()
)
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in "x-sg-id x-sg-eid received dkim-signature Content-Type Content-Transfer-Encoding To From Subject "
    "Reply-To CC BCC".split()
)
SENDGRID_MAX_RECIPIENTS = 1000
RV = ("recipient-variables",)
SENDGRID_MAX_CUSTOM_ARGS = 10000


def mailgun_error(status: int, message: str) -> WireAnswer:
    return json_answer(status, {"message": message})


def _mailbox(text: str) -> dict[str, str]:
    name, email = parseaddr(text)
    out = {"email": email}
    if name:
        out["name"] = name
    return out


def _yes(value: str) -> bool:
    return value.strip().lower() in ("yes", "true", "1")


def build_mail(fields: list[tuple[str, str]], files: list[FilePart], ctx: FailoverContext) -> dict[str, Any]:
    """Mailgun /messages form -> SendGrid mail/send body (raises Refused)."""
    multi: dict[str, list[str]] = {}
    for k, v in fields:
        multi.setdefault(k, []).append(v)

    def first(name: str) -> str | None:
        vals = multi.get(name)
        return vals[0] if vals else None

    lost: list[str] = []
    headers: dict[str, str] = {}
    custom: dict[str, str] = {}
    reply_to: list[dict[str, str]] = []
    for name, values in multi.items():
        if name in MAPPED:
            continue
        if name.startswith("h:"):
            header = name[2:]
            if header.lower() == "reply-to":
                reply_to += [_mailbox(formatted) for formatted in _split(values)]
            elif header.lower() == "x-mailgun-variables":
                try:
                    data = json.loads(values[0])
                except ValueError:
                    data = None
                if isinstance(data, Mapping):
                    custom.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
                else:
                    lost.append(name)
            elif header.lower() in RESERVED_HEADERS:
                lost.append(name)
            else:
                headers[header] = values[0]
        elif name.startswith("v:"):
            custom[name[2:]] = values[0]
        else:
            lost.append(name)
    if lost and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(sorted(lost)), names=sorted(lost))

    sender = first("from")
    to = [_mailbox(a) for a in _split(multi.get("to", []))]
    if not sender or not to:
        missing = [name for name, value in (("from", sender), ("to", to)) if not value]
        raise Refused("unsupported_operation", "a message needs from and to", names=missing)
    cc = [_mailbox(a) for a in _split(multi.get("cc", []))]
    bcc = [_mailbox(a) for a in _split(multi.get("bcc", []))]
    if len(to) + len(cc) + len(bcc) > SENDGRID_MAX_RECIPIENTS:
        raise Refused(
            "fallback_limit",
            "SendGrid takes at most 1000 recipients per request",
            names=[k for k in ("to", "cc", "bcc") if multi.get(k)],
        )

    mail: dict[str, Any] = {"from": _mailbox(sender)}
    subject = first("subject")
    if subject:
        mail["subject"] = subject
    content = []
    if first("text"):
        content.append({"type": "text/plain", "value": first("text")})
    if first("html"):
        content.append({"type": "text/html", "value": first("html")})
    if content:
        mail["content"] = content
    template = first("template")
    variables: Any = None
    if template:
        sg_template = ctx.templates.get(template)
        if not sg_template:
            raise Refused(
                "no_crosswalk_entry",
                f"template {template} has no SendGrid template in the crosswalk",
                names=("template",),
            )
        mail["template_id"] = sg_template
        if first("t:variables"):
            try:
                variables = json.loads(first("t:variables") or "{}")
            except ValueError:
                raise Refused("unmappable_field", "t:variables is not JSON", names=("t:variables",)) from None

    rv_text = first("recipient-variables")
    if rv_text is not None:
        try:
            rv = json.loads(rv_text)
        except ValueError:
            raise Refused("unmappable_field", "recipient-variables is not JSON", names=RV) from None
        if not isinstance(rv, Mapping):
            raise Refused("unmappable_field", "recipient-variables is not an object", names=RV)
        if template:
            raise Refused("unmappable_field", "recipient-variables with a template", names=(*RV, "template"))
        pers = []
        for box in to:
            subs = {f"%recipient.{k}%": str(v) for k, v in (rv.get(box["email"]) or {}).items()}
            subs["%recipient_email%"] = box["email"]
            subs["%recipient_name%"] = box.get("name", "")
            subs["%recipient%"] = box["email"]
            pers.append({"to": [box], "substitutions": subs})
        mail["personalizations"] = pers
    else:
        p: dict[str, Any] = {"to": to}
        if cc:
            p["cc"] = cc
        if bcc:
            p["bcc"] = bcc
        if variables is not None:
            p["dynamic_template_data"] = variables
        mail["personalizations"] = [p]
    tags = multi.get("o:tag") or []
    if tags:
        mail["categories"] = tags[:10]
    if first("o:deliverytime"):
        try:
            mail["send_at"] = int(parsedate_to_datetime(first("o:deliverytime") or "").timestamp())
        except (TypeError, ValueError):
            raise Refused(
                "unmappable_field", "o:deliverytime is not an RFC 2822 date", names=("o:deliverytime",)
            ) from None
    if first("o:testmode") and _yes(first("o:testmode") or ""):
        mail["mail_settings"] = {"sandbox_mode": {"enable": True}}
    tracking: dict[str, Any] = {}
    both = first("o:tracking")
    clicks = first("o:tracking-clicks") or both
    opens = first("o:tracking-opens") or both
    if clicks is not None:
        tracking["click_tracking"] = {"enable": _yes(clicks)}
    if opens is not None:
        tracking["open_tracking"] = {"enable": _yes(opens)}
    if tracking:
        mail["tracking_settings"] = tracking
    if len(reply_to) == 1:
        mail["reply_to"] = reply_to[0]
    elif reply_to:
        mail["reply_to_list"] = reply_to
    if headers:
        mail["headers"] = headers
    if custom:
        mail["custom_args"] = custom
        if len(json.dumps(custom).encode()) >= SENDGRID_MAX_CUSTOM_ARGS:
            raise Refused(
                "fallback_limit",
                "SendGrid custom_args must be under 10000 bytes",
                names=[k for k in multi if k.startswith("v:") or k.lower() == "h:x-mailgun-variables"],
            )
    attachments = []
    for f in files:
        att: dict[str, Any] = {
            "content": base64.b64encode(f.data).decode(),
            "filename": f.filename,
            "disposition": "inline" if f.name == "inline" else "attachment",
        }
        if f.content_type:
            att["type"] = f.content_type
        if f.name == "inline":
            att["content_id"] = f.filename
        attachments.append(att)
    if attachments:
        mail["attachments"] = attachments
    return mail


def _split(values: list[str]) -> list[str]:
    return [formatted for formatted in (_fmt(n, e) for n, e in getaddresses(values)) if formatted]


def _fmt(name: str, email: str) -> str:
    if not email:
        return ""
    return f'"{name}" <{email}>' if name else email


def translate(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    if request.method.upper() != "POST" or not _PATH.match(request.path.rstrip("/")):
        raise Refused(
            "unsupported_operation",
            f"{request.method} {request.path} has no SendGrid equivalent",
            names=(operation(request.method, request.path, placeholders={2: "domain"}),),
        )
    ctype = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
    fields, files = parse_form(request.body, ctype)
    mail = build_mail(fields, files, ctx)
    answer = yield WireRequest("POST", "/v3/mail/send", "", {"Content-Type": "application/json"}, json_bytes(mail))
    if answer.error or answer.status >= 300:
        return Translated(mailgun_error_from_sendgrid(answer, _PATH.match(request.path.rstrip("/"))))
    sent_id = answer.header("X-Message-Id")
    message_id = sent_id or ("egressd-" + token(ctx.request_id or ctx.derived_key("m"), 20))
    answer_out = json_answer(200, {"id": f"<{message_id}>", "message": "Queued. Thank you."})
    if not sent_id:
        return Translated(answer_out)
    return Translated(answer_out, ((sent_id, _ledger_record(mail, request, sent_id, ctx)),))


def _ledger_record(mail: Mapping[str, Any], request: WireRequest, sent_id: str, ctx: FailoverContext) -> dict[str, Any]:
    """The routing-ledger record of a message failover sent through SendGrid, under its
    `X-Message-Id` (SendGrid's events carry it as the start of `sg_message_id`), so that
    SendGrid's events about it reach the app as Mailgun events (plugins/webhooks_sendgrid.py)
    with `message_id` = the id the app was given: this answer's `<X-Message-Id>`, or, for
    a send the outbox kept (tagged `v:egressd_outbox_id`, plugins/mail_outbox.py), the
    `<outbox id@domain>` the outbox answered with."""
    args = mail.get("custom_args")
    outbox_id = args.get(mail_outbox.TAG) if isinstance(args, Mapping) else None
    match = _PATH.match(request.path.rstrip("/"))
    app_id = f"{outbox_id}@{match.group(1)}" if outbox_id and match else sent_id
    return {"kind": "message", "owner": ctx.target, "message_id": app_id, "x_message_id": sent_id}


def mailgun_error_from_sendgrid(answer: WireAnswer, path_match: re.Match[str] | None) -> WireAnswer:
    """A SendGrid error -> the Mailgun error the app expects (6.4 table)."""
    body = answer.json()
    errors = body.get("errors") if isinstance(body, Mapping) else None
    parts = []
    for e in errors if isinstance(errors, list) else []:
        if isinstance(e, Mapping):
            parts.append(f"{e['field']}: {e.get('message')}" if e.get("field") else str(e.get("message")))
    message = "; ".join(parts) or f"HTTP {answer.status}"
    status = answer.status
    if answer.error:
        return mailgun_error(502 if status < 500 else status, f"failover to SendGrid failed: {answer.error}")
    if status in (401, 403):
        return mailgun_error(500, "upstream provider configuration error")
    if status == 413:
        return mailgun_error(413, "request size exceeds 30MiB limit")
    if status == 429:
        domain = path_match.group(1) if path_match else "domain"
        reset = answer.header("X-RateLimit-Reset")
        when = ""
        if reset and reset.isdigit():
            when = format_datetime(datetime.fromtimestamp(int(reset), UTC))
        return mailgun_error(
            429, f"Domain {domain} is not allowed to send: request limit exceeded, try again after {when}".rstrip()
        )
    if status >= 500:
        return mailgun_error(500, "Internal Server Error")
    return mailgun_error(status if status in (400, 404) else 400, message)
