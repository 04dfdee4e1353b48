"""Plumbing shared by every fake: the ledger, the fault middleware, the ``/__fake__/``
control API, and :class:`FakeServer` which runs an app on ``127.0.0.1:<free port>``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import secrets
import socket
import ssl
import string
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web
from multidict import CIMultiDict

from .faults import DEFAULT_GARBAGE, Fault, FaultError, FaultHit, Faults, parse_fault_specs
from .webhooks import WEBHOOKS_KEY, WebhookSender

__all__ = [
    "FAKE_NAMES",
    "FakeServer",
    "Ledger",
    "RecordedRequest",
    "SideEffect",
    "make_app",
    "running_fakes",
    "start_fakes",
    "stop_fakes",
]

FAKE_NAMES: tuple[str, ...] = ("stripe", "paypal", "sendgrid", "mailgun", "echo")
CONTROL_PREFIX = "/__fake__/"
DEFAULT_MAX_BODY = 64 * 1024 * 1024

ErrorFactory = Callable[[web.Request, int, str], web.Response]
"""Builds a response in the provider's own error shape: ``(request, status, message)``."""


# ----------------------------------------------------------------------------------------
# Ledger
# ----------------------------------------------------------------------------------------
@dataclass
class RecordedRequest:
    """One request a fake received (control paths excluded)."""

    seq: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    t: float  # time.time() when received
    body: bytes | None = None  # set by handlers that read the body
    status: int | None = None  # what went on the wire; None for resets/hangs/garbage
    fault: str | None = None  # fault kind applied, if any
    processed: bool = False  # the handler ran (side effects may have happened)
    replayed: bool = False  # answered from the provider's idempotency store

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers.items():
            if k.lower() == low:
                return v
        return None

    @property
    def idempotency_key(self) -> str | None:
        return self.header("Idempotency-Key") or self.header("PayPal-Request-Id")

    @property
    def request_id(self) -> str | None:
        return self.header("X-Request-Id")

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, list[str]]:
        return parse_qs((self.body or b"").decode("utf-8", "replace"), keep_blank_values=True)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "seq": self.seq,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": dict(self.headers),
            "t": self.t,
            "status": self.status,
            "fault": self.fault,
            "processed": self.processed,
            "replayed": self.replayed,
            "idempotency_key": self.idempotency_key,
            "request_id": self.request_id,
            "body_len": None if self.body is None else len(self.body),
            "body": None,
        }
        if self.body is not None:
            try:
                out["body"] = self.body.decode("utf-8")
            except UnicodeDecodeError:
                out["body_b64"] = base64.b64encode(self.body).decode("ascii")
        return out


@dataclass
class SideEffect:
    """Something the fake provider 'did': a charge, a refund, an e-mail, ..."""

    kind: str  # e.g. "payment_intent.created", "mail.sent"
    object_id: str | None = None
    key: str | None = None  # the idempotency key of the request that caused it
    request_id: str | None = None  # X-Request-Id of that request
    t: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "object_id": self.object_id,
            "key": self.key,
            "request_id": self.request_id,
            "t": self.t,
            "data": self.data,
        }


class Ledger:
    """Everything a fake received and did, for exactly-once assertions.

    ``requests`` lists every request (control paths excluded); ``side_effects`` lists
    every side effect.  ``count()``, ``counts()`` and ``counts_by_key()`` summarise them.
    """

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.requests: list[RecordedRequest] = []
        self.side_effects: list[SideEffect] = []
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    def record_request(self, request: web.BaseRequest) -> RecordedRequest:
        rec = RecordedRequest(
            seq=next(self._seq),
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers={k: v for k, v in request.headers.items()},
            t=time.time(),
        )
        with self._lock:
            self.requests.append(rec)
        return rec

    def record(
        self,
        kind: str,
        object_id: str | None = None,
        *,
        key: str | None = None,
        request_id: str | None = None,
        **data: Any,
    ) -> SideEffect:
        eff = SideEffect(kind, object_id, key, request_id, data=data)
        with self._lock:
            self.side_effects.append(eff)
        return eff

    def count(self, kind: str | None = None, *, key: str | None = None) -> int:
        """Side effects of ``kind`` (all when None), optionally only those caused under ``key``."""
        return sum(
            1 for e in list(self.side_effects) if (kind is None or e.kind == kind) and (key is None or e.key == key)
        )

    def counts(self) -> dict[str, int]:
        return dict(Counter(e.kind for e in list(self.side_effects)))

    def counts_by_key(self, kind: str) -> dict[str, int]:
        """``{idempotency key: n}`` for side effects of ``kind`` (keyless ones under ``""``)."""
        return dict(Counter(e.key or "" for e in list(self.side_effects) if e.kind == kind))

    def effects(self, kind: str | None = None) -> list[SideEffect]:
        return [e for e in list(self.side_effects) if kind is None or e.kind == kind]

    def requests_to(self, path_prefix: str = "/", method: str | None = None) -> list[RecordedRequest]:
        return [
            r
            for r in list(self.requests)
            if r.path.startswith(path_prefix) and (method is None or r.method == method.upper())
        ]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.side_effects.clear()

    def to_json(self) -> dict[str, Any]:
        kinds = {e.kind for e in list(self.side_effects)}
        return {
            "name": self.name,
            "requests": [r.to_dict() for r in list(self.requests)],
            "side_effects": [e.to_dict() for e in list(self.side_effects)],
            "counts": self.counts(),
            "counts_by_key": {k: self.counts_by_key(k) for k in sorted(kinds)},
        }


# ----------------------------------------------------------------------------------------
# App keys and per-request helpers
# ----------------------------------------------------------------------------------------
LEDGER_KEY = web.AppKey("fake_ledger", Ledger)
FAULTS_KEY = web.AppKey("fake_faults", Faults)
NAME_KEY = web.AppKey("fake_name", str)
ERROR_KEY: web.AppKey[ErrorFactory] = web.AppKey("fake_error_factory")
RESET_HOOKS_KEY: web.AppKey[list[Callable[[], None]]] = web.AppKey("fake_reset_hooks")
SHUTDOWN_KEY = web.AppKey("fake_shutdown", asyncio.Event)

_ALNUM = string.ascii_letters + string.digits
_RECORD = "fake_record"
_PAUSE = "fake_pause"
BODY_FAULT = "fake_body_fault"
"""Request key: the drip/reset_mid_body/truncate :class:`Fault` to apply to a body the
handler streams itself (see echo ``/bytes``)."""


def current_record(request: web.Request) -> RecordedRequest | None:
    rec = request.get(_RECORD)
    return rec if isinstance(rec, RecordedRequest) else None


def ledger_of(request: web.Request) -> Ledger:
    return request.app[LEDGER_KEY]


def note_body(request: web.Request, body: bytes) -> None:
    """Store the request body on the ledger record (handlers call this after reading)."""
    rec = current_record(request)
    if rec is not None:
        rec.body = body


def note_replayed(request: web.Request) -> None:
    rec = current_record(request)
    if rec is not None:
        rec.replayed = True


async def wait_or_shutdown(app: web.Application, seconds: float) -> bool:
    """Sleep ``seconds``; return early (True) if the server is shutting down."""
    ev = app.get(SHUTDOWN_KEY)
    if ev is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(ev.wait(), timeout=max(0.0, seconds))
    except TimeoutError:
        return False
    return True


async def side_effect_point(request: web.Request) -> None:
    """Handlers call this right before performing a side effect (while holding any
    idempotency lock); a ``delay`` fault with ``phase="during"`` sleeps here."""
    pause = request.pop(_PAUSE, None)
    if isinstance(pause, (int, float)) and pause > 0:
        await wait_or_shutdown(request.app, float(pause))


def new_id(prefix: str = "", length: int = 24, alphabet: str = _ALNUM) -> str:
    """A random id like Stripe's ``pi_3Q...`` or PayPal's ``5O190127TN364715T``."""
    return prefix + "".join(secrets.choice(alphabet) for _ in range(length))


# ----------------------------------------------------------------------------------------
# Raw-socket tricks
# ----------------------------------------------------------------------------------------
def abort_connection(request: web.BaseRequest, *, rst: bool = True) -> None:
    """Close the client connection abruptly (TCP RST when ``rst``)."""
    tr = request.transport
    if tr is None:
        return
    if rst:
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tr.abort()
    else:
        tr.close()


async def flush_transport(request: web.BaseRequest, max_wait: float = 2.0) -> None:
    """Wait until the transport's user-space write buffer is empty, then a little more
    so the kernel puts the bytes on the wire before a reset discards them."""
    tr = request.transport
    if tr is None:
        return
    for _ in range(int(max_wait / 0.002)):
        if tr.is_closing() or tr.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.02)


def _gone() -> web.StreamResponse:
    """A response returned after the connection was killed; aiohttp fails to write it
    (ConnectionError, which it swallows)."""
    return web.Response(status=599, text="")


def _retry_after_value(fault: Fault, computed: float | None) -> str | None:
    if computed is not None:
        return str(max(1, int(computed + 0.999)))
    return fault.retry_after_header()


def fault_response(request: web.Request, hit: FaultHit, status: int) -> web.StreamResponse:
    fault = hit.fault
    factory = request.app[ERROR_KEY]
    if fault.body is not None:
        text = fault.body
        ctype = "text/plain"
        with contextlib.suppress(ValueError):
            json.loads(text)
            ctype = "application/json"
        resp: web.Response = web.Response(status=status, text=text, content_type=ctype)
    else:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        msg = f"{phrase} (injected fault)"
        if hit.kind == "rate_limit":
            msg = "Too many requests hit the API too quickly (injected rate limit)."
        resp = factory(request, status, msg)
        resp.set_status(status)
    retry_after = _retry_after_value(fault, hit.retry_after)
    if retry_after is not None:
        resp.headers["Retry-After"] = retry_after
    if hit.kind == "rate_limit":
        resp.headers["X-RateLimit-Limit"] = str(int(fault.rate))
        resp.headers["X-RateLimit-Remaining"] = "0"
        resp.headers["X-RateLimit-Reset"] = str(int(time.time() + (hit.retry_after or 1.0)) + 1)
    if fault.should_retry is not None:
        resp.headers["Stripe-Should-Retry"] = "true" if fault.should_retry else "false"
    for k, v in fault.headers.items():
        resp.headers[k] = v
    return resp


def _response_body(resp: web.StreamResponse) -> bytes | None:
    if isinstance(resp, web.Response) and not resp.prepared:
        body = resp.body
        if body is None:
            return b""
        if isinstance(body, (bytes, bytearray)):
            return bytes(body)
    return None


def _copy_headers(resp: web.StreamResponse) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in resp.headers.items():
        if k.lower() in ("content-length", "transfer-encoding"):
            continue
        out.add(k, v)
    return out


async def mangle_body(request: web.Request, resp: web.StreamResponse, fault: Fault) -> web.StreamResponse:
    """Send ``resp`` dripped, cut by a reset, or truncated, per ``fault``."""
    body = _response_body(resp)
    if body is None:  # already streamed by the handler, or a payload we cannot split
        return resp
    out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=_copy_headers(resp))
    if fault.kind == "drip":
        out.content_length = len(body)
        await out.prepare(request)
        for i in range(0, len(body), fault.chunk_size):
            await out.write(body[i : i + fault.chunk_size])
            if await wait_or_shutdown(request.app, fault.interval):
                abort_connection(request)
                return out
        await out.write_eof()
        return out
    if fault.kind == "reset_mid_body":
        declared = len(body) if len(body) > 1 else len(body) + 64
        cut = fault.after_bytes if fault.after_bytes is not None else len(body) // 2
        cut = max(0, min(cut, len(body), declared - 1))
        out.content_length = declared
        await out.prepare(request)
        if cut:
            await out.write(body[:cut])
        await flush_transport(request)
        abort_connection(request, rst=True)
        return out
    # truncate
    out.content_length = len(body) + max(1, fault.extra_bytes)
    await out.prepare(request)
    if body:
        await out.write(body)
    await flush_transport(request)
    abort_connection(request, rst=False)
    return out


# ----------------------------------------------------------------------------------------
# Middleware
# ----------------------------------------------------------------------------------------
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _run_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
    rec = current_record(request)
    if rec is not None:
        rec.processed = True
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = request.app[ERROR_KEY](request, exc.status, exc.reason or "Error")
        resp.set_status(exc.status)
        if "Allow" in exc.headers:
            resp.headers["Allow"] = exc.headers["Allow"]
        return resp


@web.middleware
async def fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(CONTROL_PREFIX):
        return await handler(request)
    ledger = request.app[LEDGER_KEY]
    rec = ledger.record_request(request)
    request[_RECORD] = rec
    hit = request.app[FAULTS_KEY].match(request.method, request.path)
    if hit is None:
        resp = await _run_handler(request, handler)
        rec.status = resp.status
        return resp
    rec.fault = hit.kind
    return await _apply(request, handler, hit, rec)


async def _apply(request: web.Request, handler: Handler, hit: FaultHit, rec: RecordedRequest) -> web.StreamResponse:
    fault = hit.fault
    kind = hit.kind
    app = request.app

    if kind == "delay":
        if fault.phase == "before":
            if await wait_or_shutdown(app, fault.seconds):
                abort_connection(request)
                return _gone()
            resp = await _run_handler(request, handler)
        elif fault.phase == "during":
            request[_PAUSE] = fault.seconds
            resp = await _run_handler(request, handler)
            if request.pop(_PAUSE, None) is not None and not resp.prepared:
                # the handler had no side-effect point: pause before answering
                await wait_or_shutdown(app, fault.seconds)
        else:
            resp = await _run_handler(request, handler)
            if not resp.prepared and await wait_or_shutdown(app, fault.seconds):
                abort_connection(request)
                return _gone()
        rec.status = resp.status
        return resp

    if kind in ("drip", "reset_mid_body", "truncate"):
        request[BODY_FAULT] = fault
        resp = await _run_handler(request, handler)
        rec.status = resp.status
        return await mangle_body(request, resp, fault)

    fail_by_reset = kind in ("reset", "hang", "garbage") or (kind in ("outage", "random") and fault.mode == "reset")
    if fault.processed and kind != "rate_limit":
        resp = await _run_handler(request, handler)
        if resp.prepared:  # streamed already; nothing more we can do
            return resp

    if not fail_by_reset:
        out = fault_response(request, hit, fault.status)
        rec.status = out.status
        return out

    if kind == "hang":
        await wait_or_shutdown(app, fault.seconds)
        abort_connection(request)
        return _gone()
    if kind == "garbage":
        tr = request.transport
        if tr is not None:
            data = fault.data.encode("latin-1") if fault.data is not None else None
            tr.write(data if data is not None else DEFAULT_GARBAGE)
            await flush_transport(request)
        abort_connection(request, rst=False)
        return _gone()
    abort_connection(request, rst=True)
    return _gone()


# ----------------------------------------------------------------------------------------
# Control API
# ----------------------------------------------------------------------------------------
def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, default=str))


async def _get_ledger(request: web.Request) -> web.Response:
    return _json(request.app[LEDGER_KEY].to_json())


async def _reset(request: web.Request) -> web.Response:
    what: dict[str, Any] = {}
    if request.can_read_body:
        raw = await request.read()
        if raw.strip():
            try:
                parsed = json.loads(raw)
            except ValueError:
                return _json({"error": "body must be JSON"}, 400)
            if not isinstance(parsed, dict):
                return _json({"error": "body must be a JSON object"}, 400)
            what = parsed
    reset_fake(request.app, **{k: bool(v) for k, v in what.items() if k in ("ledger", "faults", "state")})
    return _json({"ok": True})


def reset_fake(app: web.Application, *, ledger: bool = True, faults: bool = True, state: bool = True) -> None:
    """Clear a fake's ledger, faults and provider state (stored objects, idempotency keys)."""
    if ledger:
        app[LEDGER_KEY].reset()
    if faults:
        app[FAULTS_KEY].clear()
    if state:
        for hook in app[RESET_HOOKS_KEY]:
            hook()


async def _get_faults(request: web.Request) -> web.Response:
    return _json({"faults": request.app[FAULTS_KEY].to_json()})


async def _post_faults(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
        faults, replace = parse_fault_specs(payload)
    except (ValueError, FaultError) as exc:
        return _json({"error": str(exc)}, 400)
    store = request.app[FAULTS_KEY]
    if replace:
        store.set(*faults)
    else:
        for f in faults:
            store.add(f)
    return _json({"added": [f.to_dict() for f in faults], "faults": store.to_json()})


async def _delete_faults(request: web.Request) -> web.Response:
    fid = request.match_info.get("fid")
    store = request.app[FAULTS_KEY]
    if fid is None:
        store.clear()
        return _json({"ok": True})
    try:
        removed = store.remove(int(fid))
    except ValueError:
        removed = False
    return _json({"ok": removed}, 200 if removed else 404)


async def _health(request: web.Request) -> web.Response:
    return _json({"ok": True, "name": request.app[NAME_KEY]})


def new_fake_app(
    name: str,
    error_factory: ErrorFactory,
    *,
    faults: Faults | None = None,
    ledger: Ledger | None = None,
    client_max_size: int = DEFAULT_MAX_BODY,
) -> web.Application:
    """An app with the fault middleware and ``/__fake__/`` routes; providers add routes."""
    app = web.Application(middlewares=[fault_middleware], client_max_size=client_max_size)
    app[NAME_KEY] = name
    app[LEDGER_KEY] = ledger if ledger is not None else Ledger(name)
    app[FAULTS_KEY] = faults if faults is not None else Faults()
    app[ERROR_KEY] = error_factory
    app[RESET_HOOKS_KEY] = []
    shutdown = asyncio.Event()
    app[SHUTDOWN_KEY] = shutdown

    async def _on_startup(_: web.Application) -> None:
        shutdown.clear()

    async def _on_shutdown(_: web.Application) -> None:
        shutdown.set()

    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    app.router.add_get("/__fake__/ledger", _get_ledger)
    app.router.add_post("/__fake__/reset", _reset)
    app.router.add_get("/__fake__/faults", _get_faults)
    app.router.add_post("/__fake__/faults", _post_faults)
    app.router.add_delete("/__fake__/faults", _delete_faults)
    app.router.add_delete("/__fake__/faults/{fid}", _delete_faults)
    app.router.add_get("/__fake__/health", _health)
    return app


# ----------------------------------------------------------------------------------------
# Registry and servers
# ----------------------------------------------------------------------------------------
def make_app(
    name: str, faults: Faults | None = None, *, ledger: Ledger | None = None, **options: Any
) -> web.Application:
    """Build the fake called ``name`` (one of :data:`FAKE_NAMES`)."""
    if name == "stripe":
        from .stripe import make_stripe_app

        return make_stripe_app(faults, ledger=ledger, **options)
    if name == "paypal":
        from .paypal import make_paypal_app

        return make_paypal_app(faults, ledger=ledger, **options)
    if name == "sendgrid":
        from .sendgrid import make_sendgrid_app

        return make_sendgrid_app(faults, ledger=ledger, **options)
    if name == "mailgun":
        from .mailgun import make_mailgun_app

        return make_mailgun_app(faults, ledger=ledger, **options)
    if name == "echo":
        from .echo import make_echo_app

        return make_echo_app(faults, ledger=ledger, **options)
    raise ValueError(f"unknown fake {name!r}; one of {', '.join(FAKE_NAMES)}")


class FakeServer:
    """Runs a fake on ``host:port`` (default ``127.0.0.1`` and a free port).

    ``async with FakeServer("stripe") as fake: ... fake.url ... fake.ledger ... fake.faults``

    ``listeners=N``: N listening sockets on the port (SO_REUSEPORT, where the platform has it),
    for fakes that share a busy event loop and must accept bursts of new connections.
    """

    def __init__(
        self,
        app: web.Application | str = "echo",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        ledger: Ledger | None = None,
        shutdown_timeout: float = 2.0,
        ssl_context: ssl.SSLContext | None = None,
        listeners: int = 1,
        **options: Any,
    ) -> None:
        if listeners < 1:
            raise ValueError("listeners must be at least 1")
        self.listeners = listeners
        if isinstance(app, str):
            app = make_app(app, faults, ledger=ledger, **options)
        elif faults is not None or ledger is not None or options:
            raise TypeError("faults/ledger/options apply only when the fake is given by name")
        self.app = app
        self.host = host
        self._port = port
        self._shutdown_timeout = shutdown_timeout
        # Served over TLS when given (a server-side context with a certificate loaded, e.g.
        # from `trustme`): `url` is then https:// (bench/provider_latency.py).
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    @property
    def name(self) -> str:
        return self.app.get(NAME_KEY, "app")

    @property
    def ledger(self) -> Ledger:
        return self.app[LEDGER_KEY]

    @property
    def faults(self) -> Faults:
        return self.app[FAULTS_KEY]

    @property
    def webhooks(self) -> WebhookSender:
        """The fake's webhook sender (fakes/webhooks.py); off until ``.settings.url`` is set.
        The echo fake has none (KeyError)."""
        return self.app[WEBHOOKS_KEY]

    @property
    def port(self) -> int:
        """The bound port; stays valid after ``stop()`` (a later ``start()`` reuses it, so a
        test can take a fake down for connection-refused errors and bring it back)."""
        if self._port == 0:
            raise RuntimeError("server not started")
        return self._port

    @property
    def running(self) -> bool:
        return self._runner is not None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def url_for(self, path: str) -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    def reset(self) -> None:
        """Clear ledger, faults and provider state."""
        reset_fake(self.app)

    async def start(self) -> FakeServer:
        if self._runner is not None:
            return self
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        many = self.listeners > 1 and hasattr(socket, "SO_REUSEPORT")
        try:
            site = web.TCPSite(
                runner,
                self.host,
                self._port,
                reuse_address=True,
                reuse_port=many or None,
                ssl_context=self.ssl_context,
            )
            await site.start()
            port = int(runner.addresses[0][1])
            # More listening sockets on the same port (SO_REUSEPORT: the kernel spreads new
            # connections over them). uvloop accepts about one connection per listening
            # socket per turn of a busy event loop, so a burst of new connections to one
            # fake sharing the loop with a busy proxy waits seconds to be accepted.
            for _ in range(self.listeners - 1 if many else 0):
                await web.TCPSite(
                    runner, self.host, port, reuse_address=True, reuse_port=True, ssl_context=self.ssl_context
                ).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = port
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        where = self.url if self._runner is not None else "stopped"
        return f"<FakeServer {self.name} {where}>"


async def start_fakes(
    names: Iterable[str] = ("stripe", "paypal", "sendgrid", "mailgun"),
    *,
    host: str = "127.0.0.1",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, FakeServer]:
    """Start several fakes, each on its own free port; ``{name: FakeServer}``."""
    servers: dict[str, FakeServer] = {}
    try:
        for name in names:
            opts = dict((options or {}).get(name, {}))
            servers[name] = await FakeServer(name, host=host, **opts).start()
    except BaseException:
        await stop_fakes(servers)
        raise
    return servers


async def stop_fakes(servers: Mapping[str, FakeServer] | Iterable[FakeServer]) -> None:
    items = list(servers.values()) if isinstance(servers, Mapping) else list(servers)
    await asyncio.gather(*(s.stop() for s in items), return_exceptions=True)


@contextlib.asynccontextmanager
async def running_fakes(
    names: Iterable[str] = ("stripe", "paypal", "sendgrid", "mailgun"),
    *,
    host: str = "127.0.0.1",
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> AsyncIterator[dict[str, FakeServer]]:
    """``async with running_fakes() as fakes: fakes["stripe"].url``"""
    servers = await start_fakes(names, host=host, options=options)
    try:
        yield servers
    finally:
        await stop_fakes(servers)
