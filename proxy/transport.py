"""The only module that speaks HTTP to upstreams.

One connection pool per upstream (keep-alive, `limits.max_concurrency` connections):
egressd's own lean HTTP/1.1 client (`proxy/_http1.py`, the default) or a pooled aiohttp
`ClientSession` (`client="aiohttp"`, kept for comparison); connect/attempt/total
timeouts, header hygiene, auth injection and streamed bodies both ways. Failures become
`ProxyError`s whose `detail` says what kind of failure it was; `connect_error` means the
request provably never left this process.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Literal

import aiohttp
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from proxy import _http1
from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.events import AttemptFinished, EventBus
from proxy.model import Attempt, Call, Response

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


Client = Literal["lean", "aiohttp"]
DEFAULT_CLIENT: Client = "lean"
# Request fields the lean client writes itself (framing), never copied from the call.
_FRAMING = frozenset({"content-length", "transfer-encoding", "x-request-id"})


class Transport:
    """Sends calls for one upstream. Built once per transport-relevant configuration.

    `client` picks the HTTP/1.1 client: "lean" (`proxy/_http1.py`) or "aiohttp"; both
    behave the same from the outside (same headers sent, same errors, same streaming).
    """

    def __init__(self, policy: Policy, clock: Clock, events: EventBus, *, client: Client | None = None) -> None:
        client = client or DEFAULT_CLIENT
        if client not in ("lean", "aiohttp"):
            raise ValueError(f"unknown upstream client {client!r}")
        self.client: Client = client
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
        self._pool: _http1.HTTP1Pool | None = None
        self._connect_timeout = policy.timeouts.connect
        self._attempt_timeout = policy.timeouts.attempt
        target = URL(self._base)
        self._base_path = target.raw_path.rstrip("/")
        self._origin = target
        # Names the lean path drops from the app's headers because they are replaced.
        self._lean_drop = self._remove | _FRAMING | {k.lower() for k in self._static_add}
        self._static_items = list(self._static_add.items())

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

    def pool(self) -> _http1.HTTP1Pool:
        if self._pool is None:
            url = self._origin
            verify = self._ssl()
            context: ssl.SSLContext | None = None
            if url.scheme == "https":
                if isinstance(verify, ssl.SSLContext):
                    context = verify
                else:
                    context = ssl.create_default_context()
                    if verify is False:
                        context.check_hostname = False
                        context.verify_mode = ssl.CERT_NONE
                context.set_alpn_protocols(["http/1.1"])
            host = url.raw_host or ""
            self._pool = _http1.HTTP1Pool(
                host,
                url.port or (443 if url.scheme == "https" else 80),
                ssl_context=context,
                host_header=url.host_port_subcomponent,
                max_connections=self.policy.limits.max_concurrency,
                keepalive=30.0,
            )
        return self._pool

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

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
        if self.client == "lean":
            return await self._send_lean(call, extra_headers)
        return await self._send_aiohttp(call, extra_headers)

    async def _send_lean(self, call: Call, extra_headers: dict[str, str] | None) -> Response:
        started = self.clock.now()
        left = call.deadline - started
        budget = min(self._attempt_timeout, left)
        if budget <= 0:
            raise ProxyError("upstream_timeout", "the call's total time ran out", detail="timeout")
        drop = self._lean_drop
        if extra_headers:
            drop = drop | {k.lower() for k in extra_headers}
        headers = [(k, v) for k, v in call.headers.items() if k.lower() not in drop]
        headers += self._static_items
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
            failure = self._failed(
                call, exc, sent_body_error, started, functools.partial(self._map_lean_error, exc, budget)
            )
            if failure is exc:
                raise
            raise failure from exc
        self._attempt_event(_status_class(status), status, started)
        out_headers = strip_hop_by_hop(resp.headers, drop=("content-length",) if payload is not None else ())
        if story is not None:
            story.attempts.append(Attempt(self.name, "answered", status, out_headers))
        if payload is not None:
            return Response(status, out_headers, body=payload, upstream=self.name, attempts=1)
        return Response(
            status,
            out_headers,
            body=None,
            stream=self._stream_lean(resp),
            release=_lean_releaser(resp),
            upstream=self.name,
            attempts=1,
        )

    async def _stream_lean(self, resp: _http1.HTTP1Response) -> AsyncIterator[bytes]:
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

    def _map_lean_error(self, exc: BaseException, budget: float) -> ProxyError:
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

    async def _send_aiohttp(self, call: Call, extra_headers: dict[str, str] | None = None) -> Response:
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
        story = call.story
        if story is not None:
            story.sending += 1
        # aiohttp's own timers bound the try: `sock_read` (the attempt timeout) fires when the
        # upstream sends nothing for that long, before or between answer bytes; `total` is
        # what is left of the call's deadline and also bounds a streamed answer.
        timeout = aiohttp.ClientTimeout(total=call.deadline - started, connect=self._connect_timeout, sock_read=budget)
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
            failure = self._failed(call, exc, sent_body_error, started, functools.partial(self._map_error, exc, budget))
            if failure is exc:
                raise
            raise failure from exc
        assert resp is not None
        self._attempt_event(_status_class(resp.status), resp.status, started)
        out_headers = strip_hop_by_hop(resp.headers, drop=("content-length",) if payload is not None else ())
        if story is not None:
            story.attempts.append(Attempt(self.name, "answered", resp.status, out_headers))
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
        self._attempt_event(err.detail or "error", None, started)
        if call.story is not None:  # read by failover and idempotency (whole-call ambiguity)
            call.story.attempts.append(Attempt(self.name, err.detail or "error"))
        return err

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


def _lean_releaser(resp: _http1.HTTP1Response) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        # Reused only when the whole answer was read; a half-read answer closes the connection.
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
