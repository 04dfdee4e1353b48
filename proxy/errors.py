"""Errors as values with stable codes (the contract's `X-Egressd-Error`).

Stages raise `ProxyError`; the server turns it into an answer in exactly one place
(`proxy.answers.error_response`), shaped by the upstream's provider plugin.
"""

from __future__ import annotations

from collections.abc import Mapping

# code -> HTTP status. The codes and statuses are part of the public contract.
STATUS_BY_CODE: Mapping[str, int] = {
    "bad_request": 400,
    "unknown_upstream": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "idempotency_mismatch": 422,
    "rate_limited": 429,
    "upstream_unreachable": 502,
    "upstream_auth_failed": 502,
    "circuit_open": 503,
    "draining": 503,
    "state_unavailable": 503,
    "over_capacity": 503,
    "outbox_full": 503,
    "upstream_timeout": 504,
}


class ProxyError(Exception):
    """A failure the proxy answers itself, with a stable code."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        if code not in STATUS_BY_CODE and status is None:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.status = status if status is not None else STATUS_BY_CODE[code]
        # A short machine-readable cause for logs and retry decisions (connect_error, reset, timeout...)
        self.detail = detail
        # Set by the attempt loop (proxy/upstream.py) on the error it gives up with: how
        # many attempts were made, and whether retries ran out (read by failover).
        self.attempts = 0
        self.exhausted = False

    def __repr__(self) -> str:
        return f"ProxyError({self.code!r}, {self.message!r})"
