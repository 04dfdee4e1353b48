"""The one place where a `ProxyError` becomes an answer.

The body is in the upstream's own error shape when its provider plugin knows one (so
the app's SDK raises its usual error), else the generic egressd shape.
"""

from __future__ import annotations

import math

from multidict import CIMultiDict

from plugins.base import GenericPlugin, ProviderPlugin
from proxy.errors import ProxyError
from proxy.model import Response

_GENERIC = GenericPlugin()
#: Error details an app may act on, sent as `X-Egressd-Error-Detail` (contract 7.7): an
#: `in_doubt` call may have acted upstream and must not simply be sent again.
PUBLIC_DETAILS = frozenset({"in_doubt"})


def retry_after_value(seconds: float) -> str:
    """Whole seconds, rounded up, at least 1 (RFC 9110 delay-seconds)."""
    return str(max(1, math.ceil(seconds)))


def error_response(
    error: ProxyError, *, request_id: str, plugin: ProviderPlugin | None = None, upstream: str = ""
) -> Response:
    answer = (plugin or _GENERIC).error_answer(error.code, error.status, error.message, request_id=request_id)
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = answer.content_type
    for name, value in answer.headers.items():
        headers[name] = value
    if error.retry_after is not None:
        headers["Retry-After"] = retry_after_value(error.retry_after)
    headers["X-Egressd-Error"] = error.code
    if error.detail in PUBLIC_DETAILS:
        headers["X-Egressd-Error-Detail"] = error.detail
    return Response(answer.status, headers, body=answer.body, upstream=upstream, error_code=error.code)
