"""Building blocks the stage tests share: one way to make a `Call`, and a state backend
reached only through the async protocol (the way Redis is called)."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.clock import Clock
from proxy.model import Call, CallStory, RequestBody
from proxy.state.memory import MemoryState


def make_call(
    clock: Clock,
    method: str = "GET",
    *,
    upstream: str = "up",
    path: str = "/x",
    query: str = "",
    headers: Mapping[str, str] | None = None,
    body: RequestBody | bytes | None = None,
    total: float = 60.0,
    request_id: str = "r",
    story: CallStory | None = None,
) -> Call:
    """A call as the handler makes it: `X-Request-Id` set, the deadline `total` seconds
    from now on `clock`, an empty body unless one is given (bytes are buffered)."""
    h: CIMultiDict[str] = CIMultiDict(headers or {})
    h.setdefault("X-Request-Id", request_id)
    if isinstance(body, bytes):
        body = RequestBody(data=body)
    return Call(
        method=method,
        upstream=upstream,
        path=path,
        query=query,
        headers=CIMultiDictProxy(h),
        body=body if body is not None else RequestBody.empty(),
        deadline=clock.now() + total,
        started=clock.now(),
        request_id=request_id,
        route=upstream,
        story=story,
    )


class AsyncOnlyState(MemoryState):
    """Memory semantics reached only through the async protocol (the way Redis is called):
    no synchronous face, so every limit operation takes the async slow path."""

    sync_limits = None
