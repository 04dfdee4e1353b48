"""`auth: oauth_client_credentials`: an access token fetched on demand and shared.

* Fetched from `token_url` through the upstream's transport (`Transport.fetch`: the same
  lean client and TLS settings; the target's pool, or a small pool of its own when
  `token_url` is on another origin), HTTP Basic `client_id:client_secret`,
  `grant_type=client_credentials` (providers.md 2.1).
* Cached in the state backend's kv (so every replica sharing a Redis shares it) until
  shortly before it expires; one fetch at a time per process.
* An upstream 401 with a cached token refreshes the token once and resends once: a step
  of the attempt loop (proxy/upstream.py), so the resend passes the circuit breaker and
  the rate limiter and counts in `attempts`.
* Any token failure is `ProxyError("upstream_auth_failed")` (502), shaped by the caller's
  provider plugin: the app's own credentials were never the problem, so it never sees a 401.
* Except at the provider's own token endpoint (`ProviderPlugin.app_auth_paths`, PayPal's
  `/v1/oauth2/token`): the app's SDK fetches its own token there with its own Basic
  credentials, so that call is sent as the app made it -- no token of egressd's, no
  refresh, and the provider's answer (a 401 too) is the app's (docs/providers.md).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from proxy._http1 import HTTPError
from proxy.errors import ProxyError
from proxy.model import Call, Response

if TYPE_CHECKING:
    from proxy.clock import Clock
    from proxy.config.schema import OAuthClientCredentials, Policy
    from proxy.state.base import StateBackend
    from proxy.transport import Transport

log = logging.getLogger("egressd.oauth")

#: Refresh this long before expiry (or 10 % of the lifetime, whichever is shorter).
REFRESH_MARGIN = 60.0
MIN_TTL = 1.0


@dataclass(frozen=True, slots=True)
class CachedToken:
    value: str
    expires_at: float  # wall-clock seconds


class OAuthTokens:
    """Tokens for one upstream's `oauth_client_credentials`."""

    def __init__(self, policy: Policy, transport: Transport, state: StateBackend, clock: Clock) -> None:
        auth = policy.auth
        assert auth is not None and auth.oauth_client_credentials is not None
        self.cfg: OAuthClientCredentials = auth.oauth_client_credentials
        self.upstream = policy.upstream
        self.transport = transport
        self.state = state
        self.clock = clock
        self.timeout = policy.timeouts.attempt
        digest = hashlib.sha256(
            f"{self.cfg.token_url}\0{self.cfg.client_id}\0{self.cfg.client_secret.get_secret_value()}"
            f"\0{self.cfg.scope or ''}".encode()
        ).hexdigest()[:16]
        self.key = f"{policy.upstream}:oauth:{digest}"
        self._lock = asyncio.Lock()
        self._local: CachedToken | None = None

    def _fresh(self, token: CachedToken | None) -> bool:
        return token is not None and token.expires_at > self.clock.wall()

    async def _shared(self) -> CachedToken | None:
        raw = await self.state.kv_get(self.key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return CachedToken(str(data["token"]), float(data["refresh_at"]))
        except (ValueError, KeyError, TypeError):
            return None

    async def token(self, *, stale: str | None = None) -> str:
        """A valid access token; `stale` names a token the upstream refused (refresh it)."""
        local = self._local
        if self._fresh(local) and local is not None and local.value != stale:
            return local.value
        async with self._lock:
            local = self._local
            if self._fresh(local) and local is not None and local.value != stale:
                return local.value
            shared = await self._shared()
            if self._fresh(shared) and shared is not None and shared.value != stale:
                self._local = shared
                return shared.value
            fetched = await self._fetch()
            self._local = fetched
            return fetched.value

    async def _fetch(self) -> CachedToken:
        cfg = self.cfg
        basic = base64.b64encode(f"{cfg.client_id}:{cfg.client_secret.get_secret_value()}".encode()).decode()
        form = {"grant_type": "client_credentials"}
        if cfg.scope:
            form["scope"] = cfg.scope
        headers = [
            ("Authorization", "Basic " + basic),
            ("Accept", "application/json"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]
        try:
            status, body = await self.transport.fetch(
                "POST", str(cfg.token_url), headers, urlencode(form).encode(), within=self.timeout
            )
        except (HTTPError, OSError, ValueError) as exc:
            raise ProxyError(
                "upstream_auth_failed",
                f"cannot fetch an OAuth token for upstream {self.upstream}: {type(exc).__name__}",
                detail="token_unreachable",
            ) from exc
        if status != 200:
            raise ProxyError(
                "upstream_auth_failed",
                f"the token endpoint of upstream {self.upstream} refused the proxy's client credentials "
                f"(HTTP {status})",
                detail="token_refused",
            )
        try:
            data = json.loads(body)
            value = str(data["access_token"])
            lifetime = float(data.get("expires_in", 300))
        except (ValueError, KeyError, TypeError) as exc:
            raise ProxyError(
                "upstream_auth_failed",
                f"the token endpoint of upstream {self.upstream} sent an unusable answer",
                detail="token_invalid",
            ) from exc
        margin = min(REFRESH_MARGIN, lifetime * 0.1)
        ttl = max(lifetime - margin, MIN_TTL)
        token = CachedToken(value, self.clock.wall() + ttl)
        await self.state.kv_set(
            self.key, json.dumps({"token": value, "refresh_at": token.expires_at}).encode(), ttl=ttl
        )
        log.info("oauth token fetched", extra={"upstream": self.upstream, "expires_in": lifetime})
        return token


class OAuthSender:
    """The terminal of an OAuth upstream: one attempt, `transport.send` with a Bearer token.

    A 401 is not resent here: the attempt loop (proxy/upstream.py) sees it, and for a
    call it can replay, asks for a fresh token (`send(call, rejected=token)`) in one more
    attempt through the circuit breaker and the rate limiter; a second 401 becomes
    `refused(call)`.
    """

    def __init__(self, tokens: OAuthTokens, transport: Transport, max_body: int) -> None:
        self.tokens = tokens
        self.transport = transport
        self.max_body = max_body
        self.app_auth_paths = transport.app_auth_paths

    async def send(self, call: Call, rejected: str | None = None) -> tuple[Response, str]:
        """One attempt; returns the answer and the token it was sent with. `rejected`
        names a token the upstream refused: a fresh one is fetched instead.

        A call to the provider's own token endpoint (`app_auth_paths`) goes with the app's
        credentials and no token: the token returned is "" (nothing to refresh)."""
        if call.path in self.app_auth_paths:
            return await self.transport.send(call), ""
        body = call.body
        if not body.replayable and (body.length is None or body.length <= self.max_body):
            await body.read()  # a resend with a fresh token needs the body again
        clock = self.transport.clock
        began = clock.now()
        token = await self.tokens.token(stale=rejected)
        if call.story is not None:  # a token fetch waits on the provider, not on egressd
            call.story.upstream_seconds += clock.now() - began
        response = await self.transport.send(call, extra_headers={"Authorization": "Bearer " + token})
        return response, token

    def refused(self, call: Call) -> ProxyError:
        """The error for a 401 to a freshly fetched token: the proxy's credentials, not
        the app's, are the problem, so the app never sees a 401."""
        return ProxyError(
            "upstream_auth_failed",
            f"upstream {self.transport.name} refused a freshly fetched OAuth token",
            detail="token_rejected",
        )


def build_sender(policy: Policy, transport: Transport, state: StateBackend, clock: Clock) -> OAuthSender | None:
    """An OAuthSender when the policy uses `oauth_client_credentials`, else None."""
    if policy.auth is None or policy.auth.oauth_client_credentials is None:
        return None
    return OAuthSender(OAuthTokens(policy, transport, state, clock), transport, policy.limits.max_body)
