"""The only module that speaks HTTP to upstreams.

One connection pool per upstream (keep-alive, `limits.max_concurrency` connections, the
policy's `pool` block: `max_idle`, `idle_timeout`, `min_warm`) of egressd's lean HTTP/1.1
client (`proxy/_http1.py`, llhttp through httptools), plus a small pool per other origin
the upstream's auth needs (an OAuth token endpoint, `fetch`); connect/attempt/total
timeouts, header hygiene, auth injection and streamed bodies both ways. Failures become
`ProxyError`s whose `detail` says what kind of failure it was; `connect_error` means the
request provably never left this process.

`warm()` starts the pool's warm connections (the runtime calls it when a policy loads);
`retire()` stops them when a reload replaces the transport.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from yarl import URL

from plugins.registry import available as _plugins
from proxy import _http1
from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.events import AttemptFinished, EventBus, PoolConnected
from proxy.headers import HOP_BY_HOP, strip_hop_by_hop
from proxy.model import Attempt, Call, CallStory, Response, unsafe_method

if TYPE_CHECKING:
    from proxy.config.schema import Policy

log = logging.getLogger("egressd.transport")

# Answers up to this size (by Content-Length) are read whole inside the attempt, which is
# cheaper than streaming and lets a truncated answer become a clean 502 before headers.
BUFFER_ANSWERS_UP_TO = 256 * 1024
STREAM_CHUNK = 64 * 1024


def _auth_headers(policy: Policy) -> dict[str, str]:
    auth = policy.auth
    if auth is None:
        return {}
    if auth.bearer is not None:
        return {"Authorization": "Bearer " + auth.bearer.get_secret_value()}
    if auth.basic is not None:
        raw = f"{auth.basic.username}:{auth.basic.password.get_secret_value()}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
    if auth.header is not None:
        return {auth.header.name: auth.header.value.get_secret_value()}
    return {}  # oauth_client_credentials: injected per call by the OAuth helper


def _app_auth_paths(policy: Policy) -> frozenset[str]:
    """The provider's own token endpoint(s) (`ProviderPlugin.app_auth_paths`), where the
    app's own credentials go through and no auth is injected; empty without `auth`."""
    if policy.auth is None:
        return frozenset()
    plugin = _plugins().get(policy.provider.name)
    return frozenset(plugin.app_auth_paths) if plugin is not None else frozenset()


__all__ = ["HOP_BY_HOP", "AnswerLimits", "Transport", "strip_hop_by_hop"]

# A token endpoint on another origin than the upstream's target gets a pool this small.
SIDE_POOL_CONNECTIONS = 2
# An auth side request's answer (a token) is read whole; a bigger one is refused.
SIDE_ANSWER_LIMIT = 1024 * 1024
# Request fields the lean client writes itself (framing), never copied from the call.
_FRAMING = frozenset({"content-length", "transfer-encoding", "x-request-id"})


@dataclass(frozen=True)
class AnswerLimits:
    """Limits on an upstream answer's head (`--max-response-header-size`, `--max-response-head-size`)."""

    header_size: int = _http1.MAX_FIELD_SIZE  # one header field, name and value
    head_size: int = _http1.MAX_HEAD_SIZE  # the whole head


class Transport:
    """Sends calls for one upstream. Built once per transport-relevant configuration."""

    def __init__(self, policy: Policy, clock: Clock, events: EventBus, *, limits: AnswerLimits | None = None) -> None:
        self.policy = policy
        self.limits = limits or AnswerLimits()
        self.clock = clock
        self.events = events
        self.name = policy.upstream
        self._base = policy.target.rstrip("/")
        added = dict(policy.headers.add if policy.headers else {})
        self._static_add: dict[str, str] = {**added, **_auth_headers(policy)}
        removed = [h.lower() for h in (policy.headers.remove if policy.headers else [])]
        # The provider's own token endpoint (the app's credentials): `headers` apply, auth
        # does not -- the app's Authorization goes through and nothing is injected.
        self.app_auth_paths = _app_auth_paths(policy)
        self._app_drop = frozenset(removed) | _FRAMING | {k.lower() for k in added}
        self._app_static_items = list(added.items())
        if policy.auth is not None:
            # Injected auth replaces whatever the app sent.
            removed += ["authorization", *(k.lower() for k in self._static_add)]
        self._remove = frozenset(removed)
        self._pool: _http1.HTTP1Pool | None = None
        self._side_pools: dict[tuple[str, str, int], _http1.HTTP1Pool] = {}
        self._connect_timeout = policy.timeouts.connect
        self._attempt_timeout = policy.timeouts.attempt
        target = URL(self._base)
        self._base_path = target.raw_path.rstrip("/")
        self._origin = target
        # Names the request drops from the app's headers because they are replaced.
        self._drop = self._remove | _FRAMING | {k.lower() for k in self._static_add}
        self._static_items = list(self._static_add.items())

    def fingerprint(self) -> str:
        """Settings that, when unchanged across a reload, let the pools be kept."""
        return self.policy.fingerprint("target", "tls", "limits", "timeouts", "auth", "headers", "provider", "pool")

    def _ssl_context(self) -> ssl.SSLContext:
        """TLS for every pool of this upstream: `tls.verify` and `tls.ca_file` apply alike.
        Each pool gets its own context, which carries its origin's TLS session to resume."""
        tls = self.policy.tls
        return _http1.client_context(tls.ca_file or None, verify=tls.verify)

    def _new_pool(self, url: URL, max_connections: int, *, own: bool = False) -> _http1.HTTP1Pool:
        """A pool for `url`'s origin; `own`: the upstream's target, with the `pool` block."""
        https = url.scheme == "https"
        settings = self.policy.pool
        return _http1.HTTP1Pool(
            url.raw_host or "",
            url.port or (443 if https else 80),
            ssl_context=self._ssl_context() if https else None,
            host_header=url.host_port_subcomponent,
            max_connections=max_connections,
            keepalive=settings.idle_timeout if own else 30.0,
            max_idle=settings.max_idle if own else None,
            min_warm=settings.min_warm if own else 0,
            connect_timeout=self._connect_timeout,
            max_field_size=self.limits.header_size,
            max_head_size=self.limits.head_size,
            observer=_PoolEvents(self.name, self.events) if own else None,
        )

    def pool(self) -> _http1.HTTP1Pool:
        """The upstream's pool (its target's origin)."""
        if self._pool is None:
            self._pool = self._new_pool(self._origin, self.policy.limits.max_concurrency, own=True)
        return self._pool

    def warm(self) -> None:
        """Start keeping `pool.min_warm` connections ready (no-op without it)."""
        if self.policy.pool.min_warm > 0:
            self.pool().start_warming()

    async def wait_warm(self) -> None:
        """Return once the pool has had `pool.min_warm` idle connections up at once."""
        if self.policy.pool.min_warm > 0:
            await self.pool().wait_warm()

    def retire(self) -> None:
        """A reload replaced this transport: no more warm-ups, idle connections closed now
        (calls still running on it keep theirs; `close()` follows after the grace)."""
        if self._pool is not None:
            self._pool.stop_warming()

    def pool_stats(self) -> dict[str, Any] | None:
        """The upstream pool's connections and counters, or None before its first use."""
        return self._pool.stats() if self._pool is not None else None

    def _pool_for(self, url: URL) -> _http1.HTTP1Pool:
        """The pool for `url`'s origin: the upstream's own, or a small one of its own."""
        origin = self._origin
        key = (url.scheme, url.raw_host or "", url.explicit_port or 0)
        if key == (origin.scheme, origin.raw_host or "", origin.explicit_port or 0):
            return self.pool()
        pool = self._side_pools.get(key)
        if pool is None:
            pool = self._side_pools[key] = self._new_pool(url, SIDE_POOL_CONNECTIONS)
        return pool

    async def close(self) -> None:
        pools = [p for p in (self._pool, *self._side_pools.values()) if p is not None]
        self._pool = None
        self._side_pools = {}
        for pool in pools:
            await pool.close()

    async def fetch(
        self, method: str, url: str | URL, headers: Iterable[tuple[str, str]], body: bytes | None, *, within: float
    ) -> tuple[int, bytes]:
        """A side request for the upstream's auth (an OAuth token): status and whole body,
        within `within` seconds.

        Same pools, TLS settings and client as the calls (the target's pool when `url` is
        on its origin); no call headers, no events, never resent. Raises `_http1.HTTPError`
        (ConnectError when it never left), or ValueError for a field holding CR, LF or NUL.
        """
        target = URL(url) if isinstance(url, str) else url
        resp = await self._pool_for(target).request(
            method,
            target.raw_path_qs or "/",
            headers,
            body,
            connect_timeout=self._connect_timeout,
            idle_timeout=within,
            total_timeout=within,
        )
        if resp.content_length is not None and resp.content_length > SIDE_ANSWER_LIMIT:
            resp.close()
            raise _http1.ProtocolError(f"the answer is over {SIDE_ANSWER_LIMIT} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            while chunk := await resp.readany():
                size += len(chunk)
                if size > SIDE_ANSWER_LIMIT:
                    raise _http1.ProtocolError(f"the answer is over {SIDE_ANSWER_LIMIT} bytes")
                parts.append(chunk)
        except BaseException:
            resp.close()
            raise
        resp.release()
        return resp.status, b"".join(parts)

    async def send(self, call: Call, extra_headers: dict[str, str] | None = None) -> Response:
        """One attempt. Raises ProxyError on failure; never retries."""
        started = self.clock.now()
        left = call.deadline - started
        budget = min(self._attempt_timeout, left)
        if budget <= 0:
            raise ProxyError("upstream_timeout", "the call's total time ran out", detail="timeout")
        drop = self._drop
        static = self._static_items
        if self.app_auth_paths and call.path in self.app_auth_paths:
            drop, static, extra_headers = self._app_drop, self._app_static_items, None
        elif extra_headers:
            drop = drop | {k.lower() for k in extra_headers}
        headers = [(k, v) for k, v in call.headers.items() if k.lower() not in drop]
        headers += static
        if extra_headers:
            headers += extra_headers.items()
        headers.append(("X-Request-Id", call.request_id))
        body = call.body
        data: bytes | AsyncIterator[bytes] | None
        length: int | None = None
        sent_body_error: list[BaseException] = []
        if body.buffered:
            data = body.data
            if not data and call.method not in ("POST", "PUT", "PATCH"):
                data = None
        else:
            data = _watch(body.chunks(), sent_body_error)
            length = body.length
        resp: _http1.HTTP1Response | None = None
        story = call.story
        if story is not None:
            if story.before_send is not None:
                await story.before_send(self.name)
            story.sending += 1
        try:
            resp = await self.pool().request(
                call.method,
                self._base_path + call.target_path,
                headers,
                data,
                content_length=length,
                connect_timeout=self._connect_timeout,
                idle_timeout=budget,
                total_timeout=left,
                # A safe call whose kept connection the upstream had closed goes out again on
                # a new one; an unsafe call never does (the retry stage decides about those).
                resend_stale=body.buffered and not unsafe_method(call.method),
            )
            status = resp.status
            length = resp.content_length
            if call.method == "HEAD" or status == 204 or status == 304:
                payload: bytes | None = b""
                resp.release()
            elif length is not None and length <= BUFFER_ANSWERS_UP_TO:
                payload = await resp.read()
            else:
                payload = None
        except BaseException as exc:
            if resp is not None:
                resp.close()
            failure = self._failed(call, exc, sent_body_error, started, functools.partial(self._map_error, exc, budget))
            if failure is exc:
                raise
            raise failure from exc
        self._attempt_event(_status_class(status), status, started, story)
        # A buffered body gets its length from the listener; an answer to HEAD keeps the
        # upstream's Content-Length (the size of what a GET would get: contract 7.3).
        keep_length = payload is None or call.method == "HEAD"
        out_headers = strip_hop_by_hop(resp.headers, drop=() if keep_length else ("content-length",))
        if story is not None:
            story.attempts.append(Attempt(self.name, "answered", status, out_headers))
        if payload is not None:
            return Response(status, out_headers, body=payload, upstream=self.name, attempts=1)
        return Response(
            status,
            out_headers,
            body=None,
            stream=self._stream(resp),
            release=_releaser(resp),
            upstream=self.name,
            attempts=1,
        )

    async def _stream(self, resp: _http1.HTTP1Response) -> AsyncIterator[bytes]:
        # The client's timers (idle = the attempt timeout, and the call's deadline) keep
        # running while the answer streams, so a stalled or drip-fed answer ends in time.
        try:
            while True:
                try:
                    chunk = await resp.readany()
                except _http1.ReadTimeout as exc:
                    raise ProxyError("upstream_timeout", "the answer stalled", detail="timeout") from exc
                except (_http1.HTTPError, OSError) as exc:
                    raise ProxyError(
                        "upstream_unreachable", f"the answer was cut short: {exc}", detail="reset"
                    ) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            resp.release()

    def _map_error(self, exc: BaseException, budget: float) -> ProxyError:
        name = self.name
        if isinstance(exc, _http1.ConnectError):
            if exc.timed_out:
                return ProxyError("upstream_timeout", f"connecting to {name} timed out", detail="connect_error")
            reason = "TLS verification failed" if exc.tls else "cannot connect"
            return ProxyError("upstream_unreachable", f"{reason} to upstream {name}", detail="connect_error")
        if isinstance(exc, _http1.ReadTimeout):
            return ProxyError(
                "upstream_timeout", f"upstream {name} did not answer within {budget:.3g}s", detail="timeout"
            )
        if isinstance(exc, _http1.HeaderTooLarge):
            # The request was sent: as ambiguous as a protocol_error (proxy/model.py).
            if exc.what == "field":
                what, flag = "a header larger than", "--max-response-header-size"
            else:
                what, flag = "a head larger than", "--max-response-head-size"
            return ProxyError(
                "upstream_unreachable",
                f"upstream {name} answered with {what} {exc.limit} bytes ({flag})",
                detail="header_too_large",
            )
        if isinstance(exc, _http1.ProtocolError):
            return ProxyError("upstream_unreachable", f"upstream {name} sent a broken answer", detail="protocol_error")
        if isinstance(exc, _http1.HTTPError | OSError):
            return ProxyError("upstream_unreachable", f"connection to upstream {name} was reset", detail="reset")
        if isinstance(exc, ValueError):  # a CR or LF in a header field: never sent
            return ProxyError(
                "upstream_unreachable", f"refused to send a malformed header to {name}", detail="protocol_error"
            )
        log.exception("unexpected transport failure for %s", name)
        return ProxyError("upstream_unreachable", f"upstream {name} failed", detail="protocol_error")

    def _failed(
        self,
        call: Call,
        exc: BaseException,
        body_errors: list[BaseException],
        started: float,
        mapped: Callable[[], ProxyError],
    ) -> BaseException:
        """What a failed try raises: the request body's own error (413), a cancellation
        as it is, or the transport failure mapped to a ProxyError, counted and logged."""
        if body_errors and isinstance(body_errors[0], ProxyError):
            return body_errors[0]
        if isinstance(exc, asyncio.CancelledError):
            return exc
        err = mapped()
        self._attempt_event(err.detail or "error", None, started, call.story)
        if call.story is not None:  # read by failover and idempotency (whole-call ambiguity)
            call.story.attempts.append(Attempt(self.name, err.detail or "error"))
        return err

    def _attempt_event(self, result: str, status: int | None, started: float, story: CallStory | None) -> None:
        took = self.clock.now() - started
        if story is not None:
            story.upstream_seconds += took
        self.events.emit(AttemptFinished(self.name, result, status, took))


class _PoolEvents:
    """The upstream pool's observer: its connections become events, its warm-up trouble
    log lines (the first failure of a run, then at most one a minute, and the recovery)."""

    def __init__(self, upstream: str, events: EventBus) -> None:
        self.upstream = upstream
        self.events = events
        self._logged = 0.0

    def connected(self, seconds: float, resumed: bool, warm: bool) -> None:
        self.events.emit(PoolConnected(self.upstream, seconds, resumed, warm))

    def warm_failed(self, error: str, retry_in: float, failures: int) -> None:
        now = time.monotonic()
        if failures == 1 or now - self._logged >= 60.0:
            self._logged = now
            log.warning(
                "cannot keep warm connections to upstream %s: %s; next try in %.1f s",
                self.upstream,
                error,
                retry_in,
                extra={"upstream": self.upstream, "failures": failures, "retry_in": round(retry_in, 3)},
            )

    def warm_recovered(self, failures: int) -> None:
        log.info(
            "warm connections to upstream %s are back after %d failed tries",
            self.upstream,
            failures,
            extra={"upstream": self.upstream, "failures": failures},
        )

    def stale_resend(self) -> None:
        self.events.emit(AttemptFinished(self.upstream, "stale_connection", None, 0.0))


def _status_class(status: int) -> str:
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def _releaser(resp: _http1.HTTP1Response) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # Reused only when the whole answer was read; a half-read answer closes the connection.
        resp.release()

    return release


async def _watch(source: AsyncIterator[bytes], errors: list[BaseException]) -> AsyncIterator[bytes]:
    """Remember why a streamed request body failed (the client wraps the error)."""
    try:
        async for chunk in source:
            yield chunk
    except BaseException as exc:
        errors.append(exc)
        raise
