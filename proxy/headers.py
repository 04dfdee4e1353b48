"""Hop-by-hop header fields: the one list egressd strips (transport, listener) and never stores."""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDict, MultiMapping

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
