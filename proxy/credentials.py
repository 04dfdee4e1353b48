"""A one-way hash of the credentials a call is sent upstream with.

Cache keys and idempotency records include it, so one tenant (one API key) never gets
an answer that was made for another. The raw values are read only to feed the hash;
they are never returned, logged or kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, SecretStr

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


def _feed(h: Any, value: Any) -> None:
    """Feed a canonical, unambiguous encoding of `value` (secrets revealed) to the hash."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, BaseModel):
        h.update(b"{")
        for name in sorted(type(value).model_fields):
            _feed(h, name)
            _feed(h, getattr(value, name))
        h.update(b"}")
        return
    text = "" if value is None else str(value)
    data = text.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "big"))
    h.update(data)


def credentials_hash(headers: Mapping[str, str], policy: Policy) -> str:
    """sha256 (hex) over the credentials actually sent upstream.

    With `policy.auth` set the proxy replaces whatever the app sent, so the injected
    credentials (bearer token, basic user and password, header name and value, OAuth
    client) are what counts. Otherwise the app's own credential headers count:
    `Authorization`, `X-Api-Key`, `Api-Key`, `X-Auth-Token` and `Cookie`.
    `headers` must be case-insensitive (a CIMultiDict(Proxy)).
    """
    h = hashlib.sha256()
    auth = policy.auth
    if auth is not None:
        _feed(h, "policy")
        _feed(h, auth)
        return h.hexdigest()
    _feed(h, "app")
    for name in APP_CREDENTIAL_HEADERS:
        getall = getattr(headers, "getall", None)
        values = getall(name, []) if getall is not None else ([headers[name]] if name in headers else [])
        _feed(h, name.lower())
        _feed(h, len(values))
        for value in values:
            _feed(h, value)
    return h.hexdigest()
