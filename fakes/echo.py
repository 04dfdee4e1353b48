"""A generic test upstream.

* ``GET /bytes/{n}`` streams ``n`` bytes (byte ``i`` is ``i % 256``) in ``?chunk=`` sized
  chunks (default 64 KiB) with a Content-Length, never holding them in memory.
* ``POST|PUT /upload`` consumes the body as a stream: ``{"received": n, "sha256": hex}``.
* ``GET /status/{code}``: answers that status (JSON ``{"status": code}``).
* ``GET /delay/{seconds}``: answers after ``seconds``.
* ``GET /cache/{seconds}``: ``Cache-Control: public, max-age=seconds`` and a body with a
  counter ``n`` that grows on every request that reaches the fake.
* anything else: ``{method, path, query, headers, body_len, body_sha256}``.

Side effects: ``echo.<METHOD>`` for every unsafe request (POST, PUT, PATCH, DELETE), with
its ``Idempotency-Key`` (or ``PayPal-Request-Id``) as key, and ``echo.upload``.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from aiohttp import web

from .faults import Fault, Faults
from .server import (
    BODY_FAULT,
    LEDGER_KEY,
    RESET_HOOKS_KEY,
    Ledger,
    abort_connection,
    current_record,
    flush_transport,
    new_fake_app,
    side_effect_point,
    wait_or_shutdown,
)

__all__ = ["make_echo_app", "pattern_bytes"]

CHUNK = 64 * 1024
_PATTERN = bytes(range(256)) * (CHUNK // 256 * 4)


def pattern_bytes(start: int, length: int) -> bytes:
    """The bytes ``/bytes/{n}`` sends at offsets ``start .. start+length``."""
    out = bytearray()
    while length > 0:
        off = start % 256
        take = min(length, len(_PATTERN) - off)
        out += _PATTERN[off : off + take]
        start += take
        length -= take
    return bytes(out)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def echo_error_response(request: web.Request, status: int, message: str) -> web.Response:
    return _json(status, {"error": {"type": "fake_error", "status": status, "message": message}})


UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def make_echo_app(faults: Faults | None = None, *, ledger: Ledger | None = None) -> web.Application:
    """The generic echo upstream."""
    app = new_fake_app("echo", echo_error_response, faults=faults, ledger=ledger, client_max_size=2**62)
    led = app[LEDGER_KEY]
    counters: dict[str, int] = {}

    def effect(request: web.Request, kind: str, **data: Any) -> None:
        rec = current_record(request)
        key = request.headers.get("Idempotency-Key") or request.headers.get("PayPal-Request-Id")
        led.record(kind, None, key=key, request_id=rec.request_id if rec else None, **data)

    async def consume(request: web.Request) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    async def echo(request: web.Request) -> web.StreamResponse:
        n, digest = await consume(request)
        if request.method in UNSAFE:
            await side_effect_point(request)
            effect(request, f"echo.{request.method}", path=request.path, body_len=n)
        query: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query.setdefault(k, []).append(v)
        body = {
            "method": request.method,
            "path": request.path,
            "query": query,
            "headers": {k: v for k, v in request.headers.items()},
            "body_len": n,
            "body_sha256": digest,
        }
        if request.method == "HEAD":
            return web.Response(status=200, content_type="application/json")
        return _json(200, body)

    async def upload(request: web.Request) -> web.StreamResponse:
        n, digest = await consume(request)
        await side_effect_point(request)
        effect(request, "echo.upload", body_len=n, sha256=digest)
        return _json(200, {"received": n, "sha256": digest})

    async def stream_bytes(request: web.Request) -> web.StreamResponse:
        try:
            n = int(request.match_info["n"])
            chunk = int(request.query.get("chunk", CHUNK))
        except ValueError:
            return echo_error_response(request, 400, "n and chunk must be integers")
        if n < 0 or chunk < 1:
            return echo_error_response(request, 400, "n must be >= 0 and chunk >= 1")
        fault = request.get(BODY_FAULT)
        fault = fault if isinstance(fault, Fault) else None
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        cut: int | None = None
        if fault is not None and fault.kind == "drip":
            chunk = fault.chunk_size
        elif fault is not None and fault.kind == "reset_mid_body":
            cut = fault.after_bytes if fault.after_bytes is not None else n // 2
        elif fault is not None and fault.kind == "truncate":
            cut = n
        resp.content_length = n + (max(1, fault.extra_bytes) if fault is not None and fault.kind == "truncate" else 0)
        await resp.prepare(request)
        sent = 0
        limit = n if cut is None else min(cut, n)
        while sent < limit:
            size = min(chunk, limit - sent)
            await resp.write(pattern_bytes(sent, size))
            sent += size
            if fault is not None and fault.kind == "drip" and await wait_or_shutdown(request.app, fault.interval):
                abort_connection(request)
                return resp
        if fault is not None and fault.kind in ("reset_mid_body", "truncate"):
            await flush_transport(request)
            abort_connection(request, rst=fault.kind == "reset_mid_body")
            return resp
        await resp.write_eof()
        return resp

    async def status(request: web.Request) -> web.StreamResponse:
        try:
            code = int(request.match_info["code"])
        except ValueError:
            return echo_error_response(request, 400, "code must be an integer")
        if not 100 <= code <= 599:
            return echo_error_response(request, 400, "code must be within 100..599")
        if code in (204, 304) or code < 200:
            return web.Response(status=code)
        headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else None
        return _json(code, {"status": code}, headers)

    async def delay(request: web.Request) -> web.StreamResponse:
        try:
            seconds = float(request.match_info["seconds"])
        except ValueError:
            return echo_error_response(request, 400, "seconds must be a number")
        start = time.monotonic()
        await wait_or_shutdown(request.app, seconds)
        return _json(200, {"delayed": round(time.monotonic() - start, 3)})

    async def cache(request: web.Request) -> web.StreamResponse:
        seconds = request.match_info["seconds"]
        if not seconds.isdigit():
            return echo_error_response(request, 400, "seconds must be an integer")
        counters[request.path] = counters.get(request.path, 0) + 1
        return _json(
            200,
            {"path": request.path, "n": counters[request.path], "generated_at": time.time()},
            {"Cache-Control": f"public, max-age={seconds}"},
        )

    app[RESET_HOOKS_KEY].append(counters.clear)
    r = app.router
    r.add_get("/bytes/{n}", stream_bytes)
    r.add_post("/upload", upload)
    r.add_put("/upload", upload)
    r.add_route("*", "/status/{code}", status)
    r.add_get("/delay/{seconds}", delay)
    r.add_get("/cache/{seconds}", cache)
    r.add_route("*", "/{tail:.*}", echo)
    return app
