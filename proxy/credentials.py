"""A one-way hash of the credentials a call is sent upstream with.

Cache keys and idempotency records include it, so one tenant (one API key) never gets
an answer that was made for another. The raw values are read only to feed the hash;
they are never returned, logged or kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr

from proxy.hashing import digest

if TYPE_CHECKING:
    from proxy.config.schema import Policy

# Headers an app may carry its credentials in when the policy injects none.
APP_CREDENTIAL_HEADERS: tuple[str, ...] = (
    "Authorization",
    "X-Api-Key",
    "Api-Key",
    "X-Auth-Token",
    "Cookie",
)


def _parts(value: Any, out: list[str]) -> None:
    """Append a canonical encoding of `value` (secrets revealed) as hash parts."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, BaseModel):
        out.append("{")
        for name in sorted(type(value).model_fields):
            out.append(name)
            _parts(getattr(value, name), out)
        out.append("}")
        return
    out.append("" if value is None else str(value))


def credentials_hash(headers: Mapping[str, str], policy: Policy) -> str:
    """sha256 (hex) over the credentials actually sent upstream.

    With `policy.auth` set the proxy replaces whatever the app sent, so the injected
    credentials (bearer token, basic user and password, header name and value, OAuth
    client) are what counts. Otherwise the app's own credential headers count:
    `Authorization`, `X-Api-Key`, `Api-Key`, `X-Auth-Token` and `Cookie`.
    `headers` must be case-insensitive (a CIMultiDict(Proxy)).
    """
    parts: list[str] = []
    auth = policy.auth
    if auth is not None:
        parts.append("policy")
        _parts(auth, parts)
        return digest(*parts)
    parts.append("app")
    getall = getattr(headers, "getall", None)
    for name in APP_CREDENTIAL_HEADERS:
        values = getall(name, []) if getall is not None else ([headers[name]] if name in headers else [])
        parts.extend((name.lower(), str(len(values))))
        parts.extend(values)
    return digest(*parts)
