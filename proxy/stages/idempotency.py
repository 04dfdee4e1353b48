"""Idempotency keys and proxy-side replay for unsafe calls (POST, PATCH).

* Key: the app's, from the policy's `header` (`Idempotency-Key`; PayPal names its own,
  `PayPal-Request-Id`). Without one and with `generate`, a uuid4 is put in that header
  and in `call.idempotency_key`, so every retry and failover below sends the same key.
* Replay (`replay_ttl` > 0, app keys only): the ledger record is scoped by upstream,
  configuration, credentials hash and key. A completed repeat with the same request
  fingerprint (method, path, query, body) gets the stored answer with
  `Idempotent-Replayed: true`; a different fingerprint gets 422 `idempotency_mismatch`;
  a repeat while the first is in flight waits for it (until its own deadline).
* Fingerprint window (`fingerprint_window` > 0): keyless calls identical in method,
  path + query, credentials hash and body count as one for that long after the first
  completed (generated keys do not count as app keys).

What is stored: any answer except 5xx, 429 and proxy-made ones (`error_code`), up to
`limits.max_body` bytes. Anything else (and a connection failure) releases the record,
so the app's own retry runs for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from multidict import CIMultiDict

from proxy.credentials import credentials_hash
from proxy.errors import ProxyError
from proxy.events import IdempotencyResult
from proxy.model import UNSAFE_METHODS, Call, Response
from proxy.pipeline import Handler, Stage, StageContext
from proxy.stages.cache import buffer_answer, from_snapshot, snapshot
from proxy.state.base import StoredResponse, state_key
from proxy.state.memory_records import SCOPE_SEP

REPLAYED_HEADER = "Idempotent-Replayed"
POLL_MIN = 0.01
POLL_MAX = 0.2
LOCK_MARGIN = 5.0  # an owner's record outlives its deadline by this much


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def complete_answer(response: Response) -> bool:
    """An answer worth keeping: the upstream decided (not 5xx, not 429, not proxy-made)."""
    return response.error_code is None and response.status < 500 and response.status != 429


class IdempotencyStage:
    name = "idempotency"

    def __init__(self, ctx: StageContext) -> None:
        cfg = ctx.policy.idempotency
        assert cfg is not None
        self.cfg = cfg
        self.policy = ctx.policy
        self.clock = ctx.clock
        self.events = ctx.events
        self.state = ctx.state
        self.upstream = ctx.policy.upstream
        self.max_body = ctx.policy.limits.max_body
        self.scope = state_key(self.upstream, "idem", ctx.policy.fingerprint("idempotency"))
        limit = getattr(ctx.state, "limit_scope", None)
        if callable(limit):
            limit(self.scope, cfg.max_entries)
        # Same-process waiters wake at once when the owner finishes (others poll).
        self._local: dict[str, asyncio.Event] = {}

    def _emit(self, result: str) -> None:
        self.events.emit(IdempotencyResult(self.upstream, result))

    async def __call__(self, call: Call, nxt: Handler) -> Response:
        if call.method not in UNSAFE_METHODS:
            return await nxt(call)
        header = self.cfg.header
        app_key = call.headers.get(header) or None
        key = app_key or call.idempotency_key
        if key is None and self.cfg.generate:
            key = str(uuid.uuid4())
            self._emit("generated")
        if key is not None:
            if call.headers.get(header) != key:
                headers = CIMultiDict(call.headers)
                headers[header] = key
                call = call.with_headers(headers)
            if call.idempotency_key != key:
                call = call.replace(idempotency_key=key)

        if app_key is not None and self.cfg.replay_ttl > 0:
            body = await call.body.read()
            creds = credentials_hash(call.headers, self.policy)
            record = f"{self.scope}{SCOPE_SEP}k:{_digest(creds, app_key)}"
            fingerprint = _digest(call.method, call.path, call.query, body)
            return await self._guarded(call, nxt, record, fingerprint, self.cfg.replay_ttl, "replayed")
        if app_key is None and self.cfg.fingerprint_window > 0:
            body = await call.body.read()
            creds = credentials_hash(call.headers, self.policy)
            fingerprint = _digest(call.method, call.path, call.query, creds, body)
            record = f"{self.scope}{SCOPE_SEP}w:{fingerprint}"
            return await self._guarded(
                call, nxt, record, fingerprint, self.cfg.fingerprint_window, "fingerprint_duplicate"
            )
        return await nxt(call)

    async def _guarded(
        self, call: Call, nxt: Handler, record: str, fingerprint: str, ttl: float, replay_result: str
    ) -> Response:
        delay = POLL_MIN
        joined = False
        while True:
            lock_ttl = max(call.deadline - self.clock.now(), 0.0) + LOCK_MARGIN
            claim = await self.state.idem_claim(record, fingerprint, ttl=ttl, lock_ttl=lock_ttl)
            if claim.state == "new":
                return await self._own(call, nxt, record, ttl)
            if claim.state == "completed" and claim.response is not None:
                self._emit(replay_result)
                return self._replay(claim.response, replay_result)
            if claim.state == "mismatch":
                self._emit("mismatch")
                raise ProxyError(
                    "idempotency_mismatch",
                    f"{self.cfg.header} was already used with a different request "
                    "(method, path or body); use a new key for a new request",
                )
            # in flight elsewhere: wait for its result
            if not joined:
                joined = True
                self._emit("joined")
            remaining = call.deadline - self.clock.now()
            if remaining <= 0:
                raise ProxyError(
                    "upstream_timeout", "an earlier call with the same idempotency key is still in flight"
                )
            await self._wait(record, min(delay, remaining))
            delay = min(delay * 2, POLL_MAX)

    async def _wait(self, record: str, seconds: float) -> None:
        event = self._local.get(record)
        if event is None:
            await self.clock.sleep(seconds)
            return
        sleeper = asyncio.ensure_future(self.clock.sleep(seconds))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, waker):
                if not task.done():
                    task.cancel()

    async def _own(self, call: Call, nxt: Handler, record: str, ttl: float) -> Response:
        event = asyncio.Event()
        self._local[record] = event
        stored = False
        try:
            response = await nxt(call)
            if complete_answer(response):
                body = await buffer_answer(response, self.max_body)
                if body is not None:
                    await self.state.idem_complete(
                        record, snapshot(response, body, self.clock.wall()), ttl=ttl
                    )
                    stored = True
            return response
        finally:
            if not stored:
                await asyncio.shield(self.state.idem_release(record))
            event.set()
            if self._local.get(record) is event:
                del self._local[record]

    def _replay(self, stored: StoredResponse, result: str) -> Response:
        response = from_snapshot(stored, upstream=self.upstream)
        response.headers[REPLAYED_HEADER] = "true"
        response.notes["outcome"] = "replayed"
        response.notes["idempotency"] = result
        return response


def build(ctx: StageContext) -> Stage | None:
    if ctx.policy.idempotency is None:
        return None
    return IdempotencyStage(ctx)
