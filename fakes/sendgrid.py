"""A fake SendGrid v3 Mail Send API, see providers.md section 4.

``POST /v3/mail/send`` with ``Authorization: Bearer SG.<key>`` and a JSON body: 202 with an
empty body and ``X-Message-Id``; 200 when ``mail_settings.sandbox_mode.enable`` is true
(nothing sent).  Validation failures are 400 ``{"errors": [{"message", "field", "help"}]}``;
the limits of providers.md 4.6 are enforced.  Every response carries
``X-RateLimit-Limit/Remaining/Reset``.

``GET /v3/messages?query=unique_args['NAME']="VALUE"&limit=N`` is a small part of the Email
Activity API: the messages whose ``custom_args`` (top level or in a personalization) hold
NAME=VALUE, as ``{"messages": [{"msg_id", "status", "to_email", "subject", ...}]}`` (400
for any other query).  egressd's outbox asks it before it resends a send in doubt.

Side effects: ``mail.sent`` (one per accepted request; ``data`` holds the recipients,
subject, custom_args, categories and message id) and ``mail.sandboxed``.  SendGrid has no
idempotency key, so ``key`` is None.

Webhooks (opt-in, ``webhooks={"url": ...}``; fakes/webhooks.py), SendGrid's Event Webhook:
a ``delivered`` event per recipient of every mail sent, collected for ``webhook_batch``
seconds (or ``webhook_batch_size`` events) and POSTed as one JSON array, each event with
``email``, ``timestamp``, ``event``, ``sg_event_id``, ``sg_message_id``
(``<X-Message-Id>.<filter>``), ``smtp-id``, ``category``, ``response`` and the mail's
``custom_args`` as top-level fields. Signed as the Signed Event Webhook is (providers.md
4.8): ``X-Twilio-Email-Event-Webhook-Signature`` = base64 ECDSA P-256/SHA-256 over
``timestamp + body``, ``X-Twilio-Email-Event-Webhook-Timestamp``, anew for every try, with
``webhook_key`` (a private key; default: one made for the app). Its public key, as SendGrid
shows it (base64 DER), is ``app[SENDGRID_WEBHOOKS].public_key``; sendgrid's
``EventWebhook(public_key).verify_signature`` accepts the POSTs.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
import secrets
import string
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .faults import Faults
from .server import (
    LEDGER_KEY,
    RESET_HOOKS_KEY,
    Ledger,
    current_record,
    new_fake_app,
    new_id,
    note_body,
    side_effect_point,
)
from .signing import SignSpec, pem, sign
from .webhooks import WebhookSender, WebhookSettings, install_webhooks

__all__ = ["SENDGRID_WEBHOOKS", "SendGridError", "SendGridWebhooks", "make_sendgrid_app"]

_ACTIVITY_QUERY = re.compile(r"""\s*unique_args\['([^']+)'\]\s*=\s*"([^"]*)"\s*""")

MAX_BYTES = 30 * 1024 * 1024
HELP = "http://sendgrid.com/docs/API_Reference/Web_API_v3/Mail/errors.html"
_EMAIL_RE = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")
RESERVED_HEADERS = frozenset(
    h.lower()
    for h in (
        "x-sg-id x-sg-eid received dkim-signature Content-Type Content-Transfer-Encoding To From "
        "Subject Reply-To CC BCC"
    ).split()
)


class SendGridError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, help: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"errors": [{"message": message, "field": field, "help": help}]}


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")


def sendgrid_error_response(request: web.Request, status: int, message: str) -> web.Response:
    if status == 429:
        message = "too many requests"
    if status >= 500:
        return _json(status, {"errors": [{"message": message, "field": None, "help": None}]})
    return _json(status, SendGridError(status, message).body)


def _bad(message: str, field: str | None = None, anchor: str | None = None) -> SendGridError:
    return SendGridError(400, message, field, f"{HELP}#{anchor}" if anchor else None)


def _address(obj: Any, field: str, *, name_rules: bool = True) -> str:
    if not isinstance(obj, dict) or "email" not in obj:
        raise _bad("The email parameter is required.", f"{field}.email")
    email = obj["email"]
    if not isinstance(email, str) or not _EMAIL_RE.match(email):
        raise _bad("Does not contain a valid address.", f"{field}.email", "message.personalizations")
    name = obj.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _bad("The name must be a string.", f"{field}.name")
        if name_rules and (";" in name or "," in name):
            raise _bad(
                "Names may not include ';' or ','; put the name in quotes to use these characters.",
                f"{field}.name",
            )
    return email.lower()


def validate_mail(body: Any) -> dict[str, Any]:
    """Check a mail/send body against SendGrid's rules; return a summary of what is sent."""
    if not isinstance(body, dict):
        raise _bad("Bad Request", None)
    template = body.get("template_id")
    pers = body.get("personalizations")
    if not isinstance(pers, list) or not pers:
        raise _bad(
            "The personalizations field is required and must have at least one personalization.",
            "personalizations",
            "message.personalizations",
        )
    if len(pers) > 1000:
        raise _bad("The personalizations field may have at most 1000 personalizations.", "personalizations")
    recipients: list[str] = []
    all_subjects = True
    for i, p in enumerate(pers):
        field = f"personalizations.{i}"
        if not isinstance(p, dict):
            raise _bad("Invalid personalization.", field)
        to = p.get("to")
        if not isinstance(to, list) or not to:
            raise _bad(
                "The to array is required for all personalization objects, and must have at least one email "
                "object with a valid email address.",
                f"{field}.to",
                "message.personalizations.to",
            )
        seen: set[str] = set()
        for kind in ("to", "cc", "bcc"):
            lst = p.get(kind, [])
            if not isinstance(lst, list):
                raise _bad(f"The {kind} field must be an array.", f"{field}.{kind}")
            if len(lst) > 1000:
                raise _bad(f"The {kind} array may have at most 1000 addresses.", f"{field}.{kind}")
            for j, addr in enumerate(lst):
                email = _address(addr, f"{field}.{kind}.{j}")
                if email in seen:
                    raise _bad(
                        "Each email address in the personalization block should be unique between to, cc, and "
                        "bcc. We found the first duplicate instance of [" + email + "] in the "
                        f"personalizations.{i}.{kind} field.",
                        f"{field}.{kind}",
                        "message.recipient-errors",
                    )
                seen.add(email)
                recipients.append(email)
        if not p.get("subject"):
            all_subjects = False
        headers = p.get("headers")
        if headers is not None:
            if not isinstance(headers, dict):
                raise _bad("The headers must be an object.", f"{field}.headers")
            for h in headers:
                if str(h).lower() in RESERVED_HEADERS:
                    raise _bad(f"The header {h} is reserved and cannot be set.", f"{field}.headers")
        if "custom_args" in p:
            _custom_args(p["custom_args"], f"{field}.custom_args")
        if "send_at" in p:
            _send_at(p["send_at"], f"{field}.send_at")
        subs = p.get("substitutions")
        if isinstance(subs, dict) and len(subs) > 10000:
            raise _bad("Too many substitutions.", f"{field}.substitutions")
    if len(recipients) > 1000:
        raise _bad(
            "The total number of recipients must be no more than 1000. This includes all recipients defined "
            "within the to, cc, and bcc parameters, across each object that you include in the "
            "personalizations array.",
            "personalizations",
            "message.recipient-errors",
        )
    frm = body.get("from")
    if frm is None:
        raise _bad(
            "The from object must be provided for every email send. It is an object that requires the "
            "email parameter, but may also contain a name parameter.",
            "from",
            "message.from",
        )
    from_email = _address(frm, "from")
    if any(ord(c) > 127 for c in json.dumps(frm, ensure_ascii=False)):
        raise _bad("The from email does not contain a valid address.", "from.email", "message.from")
    if "reply_to" in body and "reply_to_list" in body:
        raise _bad("The reply_to and reply_to_list fields are mutually exclusive.", "reply_to", "message.reply_to")
    if "reply_to" in body:
        _address(body["reply_to"], "reply_to")
    if "reply_to_list" in body:
        rtl = body["reply_to_list"]
        if not isinstance(rtl, list) or len(rtl) > 1000:
            raise _bad("The reply_to_list may have at most 1000 addresses.", "reply_to_list")
        emails = [_address(a, f"reply_to_list.{k}") for k, a in enumerate(rtl)]
        if len(set(emails)) != len(emails):
            raise _bad("The reply_to_list addresses must be unique.", "reply_to_list")
    subject = body.get("subject")
    if subject is not None and (not isinstance(subject, str) or subject == ""):
        raise _bad("The subject must be at least one character.", "subject", "message.subject")
    if not template and not subject and not all_subjects:
        raise _bad(
            "The subject is required. You can get around this requirement if you use a template with a subject "
            "defined or if every personalization has a subject defined.",
            "subject",
            "message.subject",
        )
    content = body.get("content")
    if content is None and not template:
        raise _bad(
            "Unless a valid template_id is provided, the content parameter is required. There must be at least "
            "one defined content block. We typically suggest both text/plain and text/html blocks are included, "
            "but only one block is required.",
            "content",
            "message.content",
        )
    if content is not None:
        if not isinstance(content, list) or not content:
            raise _bad("The content value must be an array of at least one content block.", "content")
        types_seen: set[str] = set()
        for k, c in enumerate(content):
            if not isinstance(c, dict) or not c.get("type"):
                raise _bad("The content type is required.", f"content.{k}.type", "message.content.type")
            if not isinstance(c.get("value"), str) or c["value"] == "":
                raise _bad(
                    "The content value must be a string at least one character in length.",
                    f"content.{k}.value",
                    "message.content.value",
                )
            if c["type"] in ("text/plain", "text/html"):
                if c["type"] in types_seen:
                    raise _bad(f"Only one {c['type']} content block is allowed.", f"content.{k}.type")
                types_seen.add(c["type"])
    for k, att in enumerate(body.get("attachments") or []):
        if not isinstance(att, dict) or not att.get("content"):
            raise _bad("The attachment content is required.", f"attachments.{k}.content", "message.attachments")
        if not att.get("filename"):
            raise _bad("The attachment filename is required.", f"attachments.{k}.filename", "message.attachments")
        if att.get("disposition", "attachment") not in ("attachment", "inline"):
            raise _bad("The disposition must be attachment or inline.", f"attachments.{k}.disposition")
    cats = body.get("categories")
    if cats is not None:
        if not isinstance(cats, list) or len(cats) > 10:
            raise _bad("Too many categories; at most 10 are allowed.", "categories", "message.categories")
        if len(set(map(str, cats))) != len(cats):
            raise _bad("The categories must be unique.", "categories", "message.categories")
        for c in cats:
            if not isinstance(c, str) or len(c) > 255:
                raise _bad("A category must be a string of at most 255 characters.", "categories")
    if "custom_args" in body:
        _custom_args(body["custom_args"], "custom_args")
    if "send_at" in body:
        _send_at(body["send_at"], "send_at")
    if "ip_pool_name" in body:
        pool = body["ip_pool_name"]
        if not isinstance(pool, str) or not 2 <= len(pool) <= 64:
            raise _bad("The ip_pool_name must be between 2 and 64 characters.", "ip_pool_name")
    asm = body.get("asm")
    if asm is not None and (not isinstance(asm, dict) or "group_id" not in asm):
        raise _bad("The asm group_id is required.", "asm.group_id")
    sandbox = False
    ms = body.get("mail_settings")
    if isinstance(ms, dict) and isinstance(ms.get("sandbox_mode"), dict):
        enable = ms["sandbox_mode"].get("enable")
        if enable is not None and not isinstance(enable, bool):
            raise _bad("The sandbox_mode enable value must be a boolean.", "mail_settings.sandbox_mode.enable")
        sandbox = enable is True
    return {
        "from": from_email,
        "to": recipients,
        "subject": subject or (pers[0].get("subject") if isinstance(pers[0], dict) else None),
        "template_id": template,
        "custom_args": body.get("custom_args") or (pers[0].get("custom_args") if isinstance(pers[0], dict) else None),
        "categories": cats or [],
        "personalizations": len(pers),
        "sandbox": sandbox,
    }


def _custom_args(args: Any, field: str) -> None:
    if not isinstance(args, dict):
        raise _bad("The custom_args must be an object.", field, "message.custom_args")
    for v in args.values():
        if not isinstance(v, str):
            raise _bad("Custom args values must be strings.", field, "message.custom_args")
    if len(json.dumps(args).encode()) >= 10000:
        raise _bad("Custom args must be less than 10000 bytes.", field, "message.custom_args")


def _send_at(value: Any, field: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad("The send_at must be a unix timestamp.", field, "message.send_at")
    if value > time.time() + 72 * 3600:
        raise _bad("The send_at may be at most 72 hours in the future.", field, "message.send_at")


class SendGridWebhooks:
    """SendGrid's Event Webhook: ``delivered`` events collected into batches, signed with
    the account's ECDSA P-256 key (see the module docstring)."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey | None = None,
        *,
        batch: float = 1.0,
        batch_size: int = 100,
    ) -> None:
        if batch < 0 or batch_size < 1:
            raise ValueError("webhook_batch must not be negative and webhook_batch_size at least 1")
        self.sender: WebhookSender | None = None  # set by make_sendgrid_app
        self.key = key or ec.generate_private_key(ec.SECP256R1())
        if not isinstance(self.key.curve, ec.SECP256R1):
            raise ValueError("webhook_key must be a P-256 (prime256v1) key")
        self.batch = batch
        self.batch_size = batch_size
        self._waiting: list[dict[str, Any]] = []
        self._timer = False

    @property
    def public_key(self) -> str:
        """The verification key, as SendGrid shows it: base64 of the DER public key."""
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def spec(self) -> SignSpec:
        return {"scheme": "sendgrid", "key": pem(self.key)}

    def sign(self, body: bytes) -> tuple[bytes, dict[str, str]]:
        """The body and headers of one POST of ``body``, signed now."""
        return sign(self.spec(), body)

    def delivered(self, msg_id: str, summary: Mapping[str, Any]) -> None:
        """Events for a mail just sent (nothing when webhooks are off)."""
        if self.sender is None or not self.sender.enabled:
            return
        now = int(time.time())
        args = summary.get("custom_args") or {}
        for email in summary.get("to") or []:
            event: dict[str, Any] = {
                str(k): v for k, v in args.items() if k not in ("email", "event", "sg_event_id", "sg_message_id")
            }
            event.update(
                {
                    "email": email,
                    "timestamp": now,
                    "smtp-id": f"<{msg_id}@ismtpd0001p1lon1.sendgrid.net>",
                    "event": "delivered",
                    "category": list(summary.get("categories") or []),
                    "sg_event_id": base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("="),
                    "sg_message_id": f"{msg_id}.filterdrecv-5645d9c87f-abcde-1-6462A1F3-2.0",
                    "response": "250 2.0.0 OK",
                    "tls": 1,
                    "ip": "168.245.0.1",
                }
            )
            self._waiting.append(event)
        if len(self._waiting) >= self.batch_size:
            self.flush()
        elif self._waiting and not self._timer:
            self._timer = True
            self.sender.spawn(self._flush_later())

    async def _flush_later(self) -> None:
        try:
            await asyncio.sleep(self.batch)
        finally:
            self._timer = False
        self.flush()

    def flush(self) -> None:
        """POST what is waiting, in batches of at most ``batch_size`` events."""
        if self.sender is None:
            return
        while self._waiting:
            batch, self._waiting = self._waiting[: self.batch_size], self._waiting[self.batch_size :]
            batch_id = "sgb_" + secrets.token_hex(8)
            body = json.dumps(batch).encode()
            self.sender.send(batch_id, "delivered", body, ref=",".join(str(e["sg_event_id"]) for e in batch))

    def reset(self) -> None:
        self._waiting.clear()


SENDGRID_WEBHOOKS = web.AppKey("sendgrid_webhooks", SendGridWebhooks)


def make_sendgrid_app(
    faults: Faults | None = None,
    *,
    ledger: Ledger | None = None,
    api_keys: set[str] | None = None,
    rate_limit: int = 600,
    webhooks: WebhookSettings | Mapping[str, Any] | None = None,
    webhook_key: ec.EllipticCurvePrivateKey | None = None,
    webhook_batch: float = 1.0,
    webhook_batch_size: int = 100,
) -> web.Application:
    """The fake SendGrid.  ``api_keys``: accept only these (default: any ``SG.`` key);
    ``rate_limit``: the value advertised in ``X-RateLimit-Limit``; ``webhooks``: where and how
    to send ``delivered`` events (default: none sent), batched every ``webhook_batch``
    seconds or ``webhook_batch_size`` events, signed with ``webhook_key``."""
    app = new_fake_app("sendgrid", sendgrid_error_response, faults=faults, ledger=ledger)
    led = app[LEDGER_KEY]
    hooks = SendGridWebhooks(webhook_key, batch=webhook_batch, batch_size=webhook_batch_size)
    hooks.sender = install_webhooks(app, "sendgrid", hooks.spec, webhooks, app[RESET_HOOKS_KEY])
    app[SENDGRID_WEBHOOKS] = hooks
    app[RESET_HOOKS_KEY].append(hooks.reset)
    window: dict[str, float] = {"start": time.time(), "used": 0}

    async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/__fake__/") or "X-RateLimit-Limit" in response.headers:
            return
        now = time.time()
        if now - window["start"] >= 60:
            window["start"], window["used"] = now, 0
        window["used"] += 1
        response.headers["X-RateLimit-Limit"] = str(rate_limit)
        response.headers["X-RateLimit-Remaining"] = str(max(0, rate_limit - int(window["used"])))
        response.headers["X-RateLimit-Reset"] = str(int(window["start"] + 60))

    app.on_response_prepare.append(add_rate_headers)

    async def send(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth:
            return _json(401, SendGridError(401, "Permission denied, wrong credentials").body)
        key = auth[7:].strip() if auth.startswith("Bearer ") else ""
        if not key.startswith("SG.") or (api_keys is not None and key not in api_keys):
            return _json(
                401, SendGridError(401, "The provided authorization grant is invalid, expired, or revoked").body
            )
        raw = await request.read()
        note_body(request, raw)
        if len(raw) > MAX_BYTES:
            return _json(413, SendGridError(413, "Payload too large").body)
        if request.headers.get("Content-Encoding", "").lower() == "gzip" and raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        try:
            body = json.loads(raw)
        except ValueError:
            return _json(400, _bad("Bad Request", None).body)
        try:
            summary = validate_mail(body)
        except SendGridError as exc:
            return _json(exc.status, exc.body)
        await side_effect_point(request)
        msg_id = new_id("", 22, string.ascii_letters + string.digits + "-_")
        rec = current_record(request)
        rid = rec.request_id if rec else None
        if summary["sandbox"]:
            led.record("mail.sandboxed", msg_id, request_id=rid, **summary)
            resp = web.Response(status=200)
        else:
            led.record("mail.sent", msg_id, request_id=rid, **summary)
            index(msg_id, body, summary)
            hooks.delivered(msg_id, summary)
            resp = web.Response(status=202)
        resp.headers["X-Message-Id"] = msg_id
        return resp

    # Email Activity: custom_args name=value -> the messages carrying it.
    activity: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def index(msg_id: str, body: dict[str, Any], summary: dict[str, Any]) -> None:
        args: dict[str, str] = dict(body.get("custom_args") or {})
        for p in body.get("personalizations") or []:
            if isinstance(p, dict):
                args.update(p.get("custom_args") or {})
        item = {
            "from_email": summary.get("from"),
            "msg_id": msg_id,
            "subject": summary.get("subject"),
            "to_email": (summary.get("to") or [None])[0],
            "status": "processed",
            "opens_count": 0,
            "clicks_count": 0,
            "last_event_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for k, v in args.items():
            activity.setdefault((str(k), str(v)), []).append(item)

    async def messages(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer SG."):
            return _json(401, SendGridError(401, "Permission denied, wrong credentials").body)
        m = _ACTIVITY_QUERY.fullmatch(request.query.get("query", ""))
        if m is None:
            return _json(400, _bad("invalid query", "query").body)
        try:
            limit = max(1, min(int(request.query.get("limit", "10")), 1000))
        except ValueError:
            return _json(400, _bad("invalid limit", "limit").body)
        return _json(200, {"messages": activity.get((m.group(1), m.group(2)), [])[:limit]})

    app.router.add_post("/v3/mail/send", send)
    app.router.add_get("/v3/messages", messages)
    return app
