"""The only module that speaks HTTP to upstreams.

One pooled aiohttp `ClientSession` per upstream (keep-alive, `limits.max_concurrency`
connections), connect/attempt/total timeouts, header hygiene, auth injection and
streamed bodies both ways. Failures become `ProxyError`s whose `detail` says what kind
of failure it was; `connect_error` means the request provably never left this process.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import aiohttp
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.events import AttemptFinished, EventBus
from proxy.model import Call, Response

if TYPE_CHECKING:
    from proxy.config.schema import Policy

log = logging.getLogger("egressd.transport")

# RFC 9110 section 7.6.1 connection-specific fields, plus the de-facto ones.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Answers up to this size (by Content-Length) are read whole inside the attempt, which is
# cheaper than streaming and lets a truncated answer become a clean 502 before headers.
BUFFER_ANSWERS_UP_TO = 256 * 1024
STREAM_CHUNK = 64 * 1024


def strip_hop_by_hop(headers: MultiMapping[str], *, drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Copy headers without hop-by-hop fields and without those named in `Connection`."""
    out = CIMultiDict(headers)
    named = out.getall("Connection", ())
    for name in HOP_BY_HOP:
        out.popall(name, None)
    for name in drop:
        out.popall(name, None)
    for value in named:  # the rare slow path: fields the sender declared connection-specific
        for token in value.split(","):
            if token.strip():
                out.popall(token.strip(), None)
    return out


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


class Transport:
    """Sends calls for one upstream. Built once per transport-relevant configuration."""

    def __init__(self, policy: Policy, clock: Clock, events: EventBus) -> None:
        self.policy = policy
        self.clock = clock
        self.events = events
        self.name = policy.upstream
        self._base = policy.target.rstrip("/")
        self._static_add: dict[str, str] = {
            **dict(policy.headers.add if policy.headers else {}),
            **_auth_headers(policy),
        }
        removed = [h.lower() for h in (policy.headers.remove if policy.headers else [])]
        if policy.auth is not None:
            # Injected auth replaces whatever the app sent.
            removed += ["authorization", *(k.lower() for k in self._static_add)]
        self._remove = frozenset(removed)
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout = policy.timeouts.connect
        self._attempt_timeout = policy.timeouts.attempt

    def fingerprint(self) -> str:
        """Settings that, when unchanged across a reload, let the pooled session be kept."""
        return self.policy.fingerprint("target", "tls", "limits", "timeouts", "auth", "headers")

    def _ssl(self) -> ssl.SSLContext | bool:
        tls = self.policy.tls
        if tls is not None and not tls.verify:
            return False
        if tls is not None and tls.ca_file:
            return ssl.create_default_context(cafile=tls.ca_file)
        return True

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.policy.limits.max_concurrency,
                limit_per_host=0,
                ssl=self._ssl(),
                keepalive_timeout=30,
                ttl_dns_cache=60,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                # Forward what the app sent, nothing more: no default UA, Accept or Content-Type.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self._connect_timeout, sock_read=self._attempt_timeout
                ),
            )
            # aiohttp silently resends idempotent requests once after a reset; egressd's retry
            # stage owns every resend (policy, budget, attempt count), so turn that off.
            self._session._retry_connection = False
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build_headers(self, call: Call, extra: dict[str, str] | None = None) -> CIMultiDict[str]:
        if self._remove:
            headers = CIMultiDict((k, v) for k, v in call.headers.items() if k.lower() not in self._remove)
        else:
            headers = CIMultiDict(call.headers)
        for name, value in self._static_add.items():
            headers[name] = value
        if extra:
            for name, value in extra.items():
                headers[name] = value
        headers["X-Request-Id"] = call.request_id
        return headers

    async def send(self, call: Call, extra_headers: dict[str, str] | None = None) -> Response:
        """One attempt. Raises ProxyError on failure; never retries."""
        started = self.clock.now()
        budget = min(self._attempt_timeout, call.deadline - started)
        if budget <= 0:
            raise ProxyError("upstream_timeout", "the call's total time ran out", detail="timeout")
        url = URL(self._base + call.target_path, encoded=True)
        headers = self.build_headers(call, extra_headers)
        body = call.body
        data: bytes | AsyncIterator[bytes] | None
        if body.buffered:
            data = body.data if body.data else None
            if data is not None or call.method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body.data))
        else:
            data = body.chunks()
            if body.length is not None:
                headers["Content-Length"] = str(body.length)
        sent_body_error: list[BaseException] = []
        if data is not None and not isinstance(data, bytes):
            data = _watch(data, sent_body_error)
        resp: aiohttp.ClientResponse | None = None
        # aiohttp's own timers bound the try: `sock_read` (the attempt timeout) fires when the
        # upstream sends nothing for that long, before or between answer bytes; `total` is
        # what is left of the call's deadline and also bounds a streamed answer.
        timeout = aiohttp.ClientTimeout(
            total=call.deadline - started, connect=self._connect_timeout, sock_read=budget
        )
        try:
            resp = await self.session().request(
                call.method, url, headers=headers, data=data, allow_redirects=False, compress=False, timeout=timeout
            )
            length = resp.content_length
            if call.method == "HEAD" or resp.status in (204, 304):
                payload: bytes | None = b""
                resp.release()
            elif length is not None and length <= BUFFER_ANSWERS_UP_TO:
                payload = await resp.read()
            else:
                payload = None
        except ProxyError:
            raise
        except BaseException as exc:
            if resp is not None:
                resp.close()
            if sent_body_error and isinstance(sent_body_error[0], ProxyError):
                raise sent_body_error[0] from exc
            if isinstance(exc, asyncio.CancelledError):
                raise
            err = self._map_error(exc, budget)
            self._attempt_event(err.detail or "error", None, started)
            attempt_log = call.attr("egressd.attempt_log")  # read by the failover stage
            if isinstance(attempt_log, list):
                attempt_log.append(err.detail or "error")
            raise err from exc
        assert resp is not None
        self._attempt_event(_status_class(resp.status), resp.status, started)
        out_headers = strip_hop_by_hop(resp.headers, drop=("content-length",) if payload is not None else ())
        if payload is not None:
            return Response(resp.status, out_headers, body=payload, upstream=self.name, attempts=1)
        return Response(
            resp.status,
            out_headers,
            body=None,
            stream=self._stream(resp, call.deadline),
            release=_releaser(resp),
            upstream=self.name,
            attempts=1,
        )

    async def _stream(self, resp: aiohttp.ClientResponse, deadline: float) -> AsyncIterator[bytes]:
        # The request's timers (idle `sock_read`, `total` = the call's deadline) keep running
        # while the answer streams, so a stalled or drip-fed answer ends by the deadline.
        try:
            while True:
                try:
                    chunk = await resp.content.readany()
                except TimeoutError as exc:
                    raise ProxyError("upstream_timeout", "the answer stalled", detail="timeout") from exc
                except aiohttp.ClientError as exc:
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
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ProxyError("upstream_timeout", f"connecting to {name} timed out", detail="connect_error")
        if isinstance(exc, aiohttp.ClientConnectorError):
            # Refused, DNS failure, TLS failure: the request never left this process.
            reason = "TLS verification failed" if isinstance(exc, aiohttp.ClientSSLError) else "cannot connect"
            return ProxyError("upstream_unreachable", f"{reason} to upstream {name}", detail="connect_error")
        if isinstance(exc, TimeoutError):
            return ProxyError(
                "upstream_timeout", f"upstream {name} did not answer within {budget:.3g}s", detail="timeout"
            )
        if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
            return ProxyError("upstream_unreachable", f"upstream {name} sent a broken answer", detail="protocol_error")
        if isinstance(exc, aiohttp.ClientError | OSError):
            return ProxyError("upstream_unreachable", f"connection to upstream {name} was reset", detail="reset")
        log.exception("unexpected transport failure for %s", name)
        return ProxyError("upstream_unreachable", f"upstream {name} failed", detail="protocol_error")

    def _attempt_event(self, result: str, status: int | None, started: float) -> None:
        self.events.emit(AttemptFinished(self.name, result, status, self.clock.now() - started))


def _status_class(status: int) -> str:
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def _releaser(resp: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # Closing (not releasing) a half-read answer: the connection cannot be reused.
        if not resp.content.at_eof():
            resp.close()
        else:
            resp.release()

    return release


async def _watch(source: AsyncIterator[bytes], errors: list[BaseException]) -> AsyncIterator[bytes]:
    """Remember why a streamed request body failed (aiohttp wraps the error)."""
    try:
        async for chunk in source:
            yield chunk
    except BaseException as exc:
        errors.append(exc)
        raise
