"""SendGrid v3 Mail Send answered by Mailgun (providers.md 6.1-6.2)."""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlencode

from plugins import mail_outbox
from plugins.base import FailoverContext, Refused, Translated, TranslatorRun, WireAnswer, WireRequest
from plugins.forms import FilePart, encode_multipart
from plugins.shapes import json_answer, operation

SENDGRID_MAX_BYTES = 30 * 1024 * 1024
SENDGRID_MAX_RECIPIENTS = 1000
MAILGUN_MAX_MESSAGE = 25 * 1024 * 1024
MAILGUN_MAX_OPTIONS = 16 * 1024
MAILGUN_MAX_RECIPIENTS = 1000
MAILGUN_MAX_TAGS = 3
TOP_MAPPED = frozenset(
    "personalizations from reply_to reply_to_list subject content attachments template_id headers categories "
    "custom_args send_at mail_settings tracking_settings".split()
)
PERS_KEYS = frozenset("to cc bcc subject headers substitutions dynamic_template_data custom_args send_at from".split())


def sendgrid_error(status: int, message: str, field: str | None = None) -> WireAnswer:
    return json_answer(status, {"errors": [{"message": message, "field": field, "help": None}]})


def _addr(obj: Any) -> str:
    if not isinstance(obj, Mapping):
        return ""
    return formataddr((str(obj.get("name") or ""), str(obj.get("email") or "")))


def lossy_fields(body: Mapping[str, Any]) -> list[str]:
    """SendGrid fields (JSON paths, the app's own terms) that have no Mailgun
    equivalent and would be silently dropped."""
    lost = sorted(k for k in body if k not in TOP_MAPPED)
    ms = body.get("mail_settings")
    if isinstance(ms, Mapping):
        lost += [f"mail_settings.{k}" for k in ms if k != "sandbox_mode" and _enabled(ms[k])]
    ts = body.get("tracking_settings")
    if isinstance(ts, Mapping):
        for k, v in ts.items():
            if k == "click_tracking" and isinstance(v, Mapping):
                if v.get("enable_text") is not None:
                    lost.append("tracking_settings.click_tracking.enable_text")
            elif k == "open_tracking" and isinstance(v, Mapping):
                if v.get("substitution_tag"):
                    lost.append("tracking_settings.open_tracking.substitution_tag")
            elif _enabled(v):
                lost.append(f"tracking_settings.{k}")
    cats = body.get("categories")
    if isinstance(cats, list) and len(cats) > MAILGUN_MAX_TAGS:
        lost.append("categories")  # Mailgun keeps the first 3 tags only
    for i, c in enumerate(body.get("content") or []):
        if isinstance(c, Mapping) and c.get("type") not in ("text/plain", "text/html"):
            lost.append(f"content.{i}.type")
    for i, p in enumerate(body.get("personalizations") or []):
        if isinstance(p, Mapping):
            lost += [f"personalizations.{i}.{k}" for k in p if k not in PERS_KEYS]
    return lost


def _enabled(value: Any) -> bool:
    if isinstance(value, Mapping):
        return value.get("enable") is not False
    return bool(value)


def _check_sendgrid_limits(body: Mapping[str, Any], size: int) -> WireAnswer | None:
    """What SendGrid itself would answer for an over-limit request (4.6), or None."""
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers:
        return sendgrid_error(
            400,
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
        )
    if len(pers) > 1000:
        return sendgrid_error(
            400, "The personalizations field may have at most 1000 personalizations.", "personalizations"
        )
    total = 0
    for i, p in enumerate(pers):
        if not isinstance(p, Mapping) or not isinstance(p.get("to"), list) or not p["to"]:
            return sendgrid_error(
                400, "The to array is required for all personalization objects.", f"personalizations.{i}.to"
            )
        total += sum(len(p.get(k) or []) for k in ("to", "cc", "bcc"))
    if total > SENDGRID_MAX_RECIPIENTS:
        return sendgrid_error(400, "The total number of recipients must be no more than 1000.", "personalizations")
    if size > SENDGRID_MAX_BYTES:
        return sendgrid_error(413, "Payload too large")
    if not isinstance(body.get("from"), Mapping) or not body["from"].get("email"):
        return sendgrid_error(400, "The from object must be provided for every email send.", "from")
    cats = body.get("categories")
    if isinstance(cats, list) and len(cats) > 10:
        return sendgrid_error(400, "Too many categories; at most 10 are allowed.", "categories")
    return None


def _files(body: Mapping[str, Any]) -> list[FilePart]:
    out: list[FilePart] = []
    for i, att in enumerate(body.get("attachments") or []):
        if not isinstance(att, Mapping):
            continue
        try:
            data = base64.b64decode(str(att.get("content") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise Refused(
                "unmappable_field", f"attachments.{i}.content is not base64", names=(f"attachments.{i}.content",)
            ) from None
        inline = att.get("disposition") == "inline"
        # Mailgun uses the part's file name as the Content-ID of an inline image.
        filename = str(att.get("content_id") or att.get("filename")) if inline else str(att.get("filename"))
        out.append(FilePart("inline" if inline else "attachment", filename, str(att.get("type") or ""), data))
    return out


def _batchable(pers: list[Any]) -> bool:
    if len(pers) < 2:
        return False
    emails = []
    for p in pers:
        if set(p) - {"to", "subject"} or len(p.get("to") or []) != 1:
            return False
        emails.append(str(p["to"][0].get("email", "")).lower())
    return len(set(emails)) == len(emails)


def _render(text: str, subs: Mapping[str, Any]) -> str:
    for key, value in subs.items():
        text = text.replace(str(key), str(value))
    return text


def _deliverytime(ts: Any) -> str:
    return format_datetime(datetime.fromtimestamp(int(ts), UTC))


def _common_fields(body: Mapping[str, Any], ctx: FailoverContext) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    template = body.get("template_id")
    if template:
        name = ctx.templates.get(str(template))
        if not name:
            raise Refused(
                "no_crosswalk_entry",
                f"template {template} has no Mailgun template in the crosswalk",
                names=("template_id",),
            )
        fields.append(("template", name))
    for c in body.get("content") or []:
        if isinstance(c, Mapping) and c.get("type") == "text/plain":
            fields.append(("text", str(c.get("value"))))
        elif isinstance(c, Mapping) and c.get("type") == "text/html":
            fields.append(("html", str(c.get("value"))))
    for cat in (body.get("categories") or [])[:MAILGUN_MAX_TAGS]:
        fields.append(("o:tag", str(cat)))
    if body.get("reply_to"):
        fields.append(("h:Reply-To", _addr(body["reply_to"])))
    elif body.get("reply_to_list"):
        fields.append(("h:Reply-To", ", ".join(_addr(a) for a in body["reply_to_list"])))
    ms = body.get("mail_settings") or {}
    if isinstance(ms, Mapping) and (ms.get("sandbox_mode") or {}).get("enable") is True:
        fields.append(("o:testmode", "yes"))
    ts = body.get("tracking_settings") or {}
    if isinstance(ts, Mapping):
        for sg, mg in (("click_tracking", "o:tracking-clicks"), ("open_tracking", "o:tracking-opens")):
            v = ts.get(sg)
            if isinstance(v, Mapping) and isinstance(v.get("enable"), bool):
                fields.append((mg, "yes" if v["enable"] else "no"))
    return fields


def build_calls(body: Mapping[str, Any], ctx: FailoverContext) -> list[tuple[list[tuple[str, str]], list[FilePart]]]:
    """SendGrid mail/send body -> one or more Mailgun /messages form bodies (raises Refused)."""
    lost = lossy_fields(body)
    if lost and not ctx.allow_lossy:
        raise Refused("lossy", ", ".join(lost), names=lost)
    pers: list[Any] = list(body["personalizations"])
    files = _files(body)
    common = _common_fields(body, ctx)
    top_subject = str(body.get("subject") or "")
    top_args = {str(k): str(v) for k, v in (body.get("custom_args") or {}).items()}
    top_headers = {str(k): str(v) for k, v in (body.get("headers") or {}).items()}
    calls: list[tuple[list[tuple[str, str]], list[FilePart]]] = []

    def envelope(p: Mapping[str, Any]) -> list[tuple[str, str]]:
        fields = [("from", _addr(p.get("from") or body["from"]))]
        for kind in ("to", "cc", "bcc"):
            for a in p.get(kind) or []:
                fields.append((kind, _addr(a)))
        raw_subs = p.get("substitutions")
        subs: Mapping[str, Any] = raw_subs if isinstance(raw_subs, Mapping) else {}
        subject = str(p.get("subject") or top_subject)
        if subject:
            fields.append(("subject", _render(subject, subs)))
        for name, value in common:
            fields.append((name, _render(value, subs) if name in ("text", "html") else value))
        if p.get("dynamic_template_data") is not None:
            fields.append(("t:variables", json.dumps(p["dynamic_template_data"], separators=(",", ":"))))
        for k, v in {**top_headers, **{str(a): str(b) for a, b in (p.get("headers") or {}).items()}}.items():
            fields.append((f"h:{k}", v))
        for k, v in {**top_args, **{str(a): str(b) for a, b in (p.get("custom_args") or {}).items()}}.items():
            fields.append((f"v:{k}", v))
        send_at = p.get("send_at", body.get("send_at"))
        if send_at is not None:
            fields.append(("o:deliverytime", _deliverytime(send_at)))
        return fields

    if _batchable(pers):
        # One Mailgun batch call; recipient-variables keeps recipients from seeing each other.
        subjects = [str(p.get("subject") or top_subject) for p in pers]
        differ = len(set(subjects)) > 1
        fields = [f for f in envelope({}) if f[0] != "subject"]
        fields.append(("subject", "%recipient.subject%" if differ else subjects[0]))
        variables: dict[str, dict[str, str]] = {}
        for p, subject in zip(pers, subjects, strict=True):
            fields.append(("to", _addr(p["to"][0])))
            variables[str(p["to"][0].get("email"))] = {"subject": subject} if differ else {}
        fields.append(("recipient-variables", json.dumps(variables, separators=(",", ":"))))
        calls.append((fields, files))
    else:
        calls.extend((envelope(p), files) for p in pers)

    for fields, parts in calls:
        options = sum(len(k) + len(v) for k, v in fields if k[:2] in ("o:", "h:", "v:"))
        if options > MAILGUN_MAX_OPTIONS:
            # Mailgun's options come from these SendGrid fields (top level or per personalization).
            raise Refused(
                "fallback_limit", "Mailgun limits o:, h: and v: options to 16 kB", names=("headers", "custom_args")
            )
        if sum(1 for k, _ in fields if k in ("to", "cc", "bcc")) > MAILGUN_MAX_RECIPIENTS:
            raise Refused(
                "fallback_limit", "Mailgun takes at most 1000 recipients per message", names=("personalizations",)
            )
        size = sum(len(v) for _, v in fields) + sum(len(f.data) for f in parts)
        if size > MAILGUN_MAX_MESSAGE:
            raise Refused(
                "fallback_limit",
                "Mailgun messages are limited to 25 MB",
                names=("attachments",) if parts else ("content",),
            )
    return calls


def encode_call(fields: list[tuple[str, str]], files: list[FilePart]) -> tuple[bytes, str]:
    if files:
        return encode_multipart(fields, files)
    return urlencode(fields).encode(), "application/x-www-form-urlencoded"


def translate(request: WireRequest, ctx: FailoverContext) -> TranslatorRun:
    if request.method.upper() != "POST" or request.path.rstrip("/") != "/v3/mail/send":
        raise Refused(
            "unsupported_operation",
            f"{request.method} {request.path} has no Mailgun equivalent",
            names=(operation(request.method, request.path),),
        )
    domain = ctx.target_settings.get("domain")
    if not domain:
        # egressd's configuration, nothing in the app's request: no names.
        raise Refused("fallback_misconfigured", "the Mailgun upstream names no sending domain (provider.domain)")
    try:
        body = json.loads(request.body)
    except ValueError:
        return Translated(sendgrid_error(400, "Bad Request"))
    if not isinstance(body, Mapping):
        return Translated(sendgrid_error(400, "Bad Request"))
    over = _check_sendgrid_limits(body, len(request.body))
    if over is not None:
        return Translated(over)
    calls = build_calls(body, ctx)
    if len(calls) > 1 and not ctx.allow_lossy:
        # SendGrid sends all personalizations or none. Several Mailgun sends cannot be made
        # atomic, and neither provider has an idempotency key: after a partial failure the
        # app's retry would send the first ones again. So a fan-out is opt-in.
        raise Refused(
            "not_atomic",
            f"this mail needs {len(calls)} separate Mailgun sends; one failing after others went out "
            "could not be undone or retried without duplicates (allow_lossy: true fails over anyway)",
            names=("personalizations",),
        )
    ids: list[str] = []
    for fields, files in calls:
        data, ctype = encode_call(fields, files)
        # The domain is a setting, quoted all the same: nothing in it may change the path.
        path = f"/v3/{quote(domain, safe='')}/messages"
        answer = yield WireRequest("POST", path, "", {"Content-Type": ctype}, data)
        if answer.error or answer.status >= 300:
            error = sendgrid_error_from_mailgun(answer)
            if ids:  # only with allow_lossy: the app's retry would resend the first ones
                error = sendgrid_error(
                    500,
                    f"only the first {len(ids)} of {len(calls)} sends went out through the fallback "
                    f"provider before it failed (a retry of the whole mail would send those again): "
                    f"{_message(answer)}",
                )
            return Translated(error)
        reply = answer.json() or {}
        ids.append(str(reply.get("id", "")).strip().strip("<>"))
    ms = body.get("mail_settings") or {}
    sandbox = isinstance(ms, Mapping) and (ms.get("sandbox_mode") or {}).get("enable") is True
    headers = {"X-Message-Id": ids[0] if ids else ""}
    if len(ids) > 1:
        headers["X-Egressd-Message-Ids"] = ",".join(ids)
    # Routing-ledger records, one per Mailgun message, so that Mailgun's events about them
    # reach the app as SendGrid events (plugins/webhooks_mailgun.py) with `sg_message_id` =
    # the id the app was given: the X-Message-Id above, or, for a send the outbox kept
    # (tagged custom_args.egressd_outbox_id, plugins/mail_outbox.py), the outbox id the
    # outbox answered with.
    args = body.get("custom_args")
    outbox_id = args.get(mail_outbox.TAG) if isinstance(args, Mapping) else None
    ledger = tuple(
        (mid, {"kind": "message", "owner": ctx.target, "x_message_id": str(outbox_id or mid), "message_id": mid})
        for mid in ids
        if mid
    )
    return Translated(WireAnswer(200 if sandbox else 202, headers, b""), ledger)


def _message(answer: WireAnswer) -> str:
    body = answer.json()
    if isinstance(body, Mapping) and body.get("message"):
        return str(body["message"])
    return answer.body.decode("utf-8", "replace")[:200] or f"HTTP {answer.status}"


def _guess_field(message: str) -> str | None:
    low = message.lower()
    if low.startswith("from"):
        return "from"
    if low.startswith("to"):
        return "personalizations.0.to"
    if "too many recipients" in low:
        return "personalizations"
    if "date" in low or "deliverytime" in low:
        return "send_at"
    return None


_RETRY_DATE = re.compile(r"try again after (.+)$")


def sendgrid_error_from_mailgun(answer: WireAnswer) -> WireAnswer:
    """A Mailgun error -> the SendGrid error the app's SDK expects (6.2 table)."""
    message = _message(answer)
    status = answer.status
    if answer.error:
        return sendgrid_error(502 if status < 500 else status, f"failover to Mailgun failed: {answer.error}")
    if status in (401, 403) and (status == 401 or "forbidden" in message.lower()):
        return sendgrid_error(500, "upstream provider configuration error")
    if status == 404 and "domain" in message.lower():
        return sendgrid_error(500, "upstream provider configuration error (Mailgun domain)")
    if status == 429:
        headers = {"X-RateLimit-Remaining": "0"}
        m = _RETRY_DATE.search(message)
        if m:
            try:
                headers["X-RateLimit-Reset"] = str(int(parsedate_to_datetime(m.group(1)).timestamp()))
            except (TypeError, ValueError):
                pass
        return json_answer(429, {"errors": [{"field": None, "message": "too many requests"}]}, headers)
    if status == 413:
        return sendgrid_error(413, message)
    if status == 400:
        return sendgrid_error(400, message, _guess_field(message))
    if status == 403:
        return sendgrid_error(403, message)
    return sendgrid_error(500, message)
