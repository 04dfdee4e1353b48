"""Where verified webhook events wait for the app: one protocol, three stores (memory, the
data dir's SQLite, Redis), like the outbox's (proxy/outbox/store.py).

An entry is one POST the provider made, as far as it was new: its body and end-to-end
headers as received, the ids of its events (one, or several for a SendGrid batch), and
the parts of its delivery already done. Its life (docs/webhooks.md):

    queued --claim--> claimed --every part answered 2xx--> delivered
       ^                 |  \\--> queued (a part failed: retried after a backoff)
       |  (owner died,   |   \\-> dead (max_age passed; kept for the operator)
       |   or its lease  |   \\-> dropped (nowhere to deliver: no translation and no
       \\--ran out)------/          deliver_to of its own; counted and logged)

Delivery is at least once: an entry whose process died while it was claimed is queued
again and delivered again (the app may see an event twice after a crash, with the same
provider event id and `X-Egressd-Webhook-Id`; deduplicating on them makes that harmless).
What egressd never does is deliver an event id twice within `dedupe_for` because the
provider sent it twice: `add` records the ids and refuses a POST that repeats one,
atomically against other processes (SQLite transaction, Redis script).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

PENDING = ("queued", "claimed")
STATES = (*PENDING, "delivered", "dead", "dropped")
ID_PREFIX = "wh_"
#: A claimed entry is taken back after this long even if its owner looks alive (a stuck
#: or partitioned process): longer than one delivery attempt can take.
LEASE = 120.0
KEEP_DONE = 86400.0  # delivered and dropped entries stay visible (without their body) this long
KEEP_DEAD = 7 * 86400.0  # dead entries stay (with their body) for the operator this long


def new_id() -> str:
    """An entry id: `wh_` and 24 hex digits."""
    return ID_PREFIX + secrets.token_hex(12)


@dataclass(slots=True)
class WebhookEntry:
    """One stored POST. Times are wall-clock seconds."""

    id: str
    upstream: str  # the upstream whose webhook listener path it came in on
    event_ids: list[str]  # the provider's event ids it carries that were new
    types: list[str]  # their event types (for logs and listings)
    headers: list[tuple[str, str]]  # end-to-end, as received (hop-by-hop and Host left out)
    body: bytes
    received: float
    expires: float  # received + max_age: retried until then
    dedupe_until: float  # received + dedupe_for
    state: str = "queued"
    due: float = 0.0
    attempts: int = 0
    owner: str = ""
    done: list[str] = field(default_factory=list)  # delivery parts answered 2xx
    last_error: str = ""
    updated: float = 0.0

    def summary(self) -> dict[str, object]:
        """What a listing shows (no headers, no body)."""
        return {
            "id": self.id,
            "upstream": self.upstream,
            "state": self.state,
            "event_ids": list(self.event_ids),
            "types": list(self.types),
            "received": round(self.received, 3),
            "expires": round(self.expires, 3),
            "due": round(self.due, 3),
            "attempts": self.attempts,
            "done": list(self.done),
            "last_error": self.last_error,
            "size": len(self.body),
        }


@dataclass(frozen=True, slots=True)
class WebhookStats:
    pending: int = 0  # queued or claimed
    oldest: float | None = None  # received time of the oldest pending entry
    dead: int = 0
    delivered: int = 0  # delivered entries still kept (KEEP_DONE); the memory store only: the
    #                     durable ones leave it 0 (a day of entries is not counted every 2 s)


class WebhooksUnavailable(Exception):
    """The store cannot take or give entries now (Redis away, the database locked too long)."""


class WebhookStore(Protocol):
    name: str
    instance: str

    async def add(self, entry: WebhookEntry) -> list[str]:
        """Store `entry` durably and record its event ids until `entry.dedupe_until`, unless
        one of them is recorded already: then nothing is stored and the ids seen before are
        returned. Raises `WebhooksUnavailable` (nothing stored)."""

    async def claim(self, upstream: str, now: float, limit: int) -> list[WebhookEntry]:
        """Up to `limit` entries of `upstream` due by `now`, now `claimed` by this instance."""

    async def finish(self, entry: WebhookEntry) -> None:
        """Write the entry's new state and fields (only while this instance holds it)."""

    async def recover(self, now: float) -> int:
        """Claimed entries whose process died: queued again (due now). Returns how many."""

    async def purge(self, now: float) -> None:
        """Forget event ids past their window, and finished entries past their keep time."""

    async def list(
        self, *, upstream: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[WebhookEntry]: ...

    async def stats(self, now: float) -> dict[str, WebhookStats]:
        """Per upstream: pending (with the oldest) and dead. An upstream with neither may be
        left out. Cheap whatever the store holds: the worker calls it every 2 s."""

    async def close(self) -> None: ...


def encode_headers(headers: Iterable[tuple[str, str]]) -> str:
    return json.dumps([[k, v] for k, v in headers], separators=(",", ":"))


def decode_headers(text: str) -> list[tuple[str, str]]:
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("headers are not a list")
    out: list[tuple[str, str]] = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise ValueError("bad header pair")
        out.append((item[0], item[1]))
    return out


def encode_list(items: Iterable[str]) -> str:
    return json.dumps(list(items), separators=(",", ":"))


def decode_list(text: str) -> list[str]:
    data = json.loads(text or "[]")
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise ValueError("not a list of strings")
    return list(data)


class MemoryWebhookStore:
    """The store of `--data-dir none`: in process memory, lost on restart (a warning says
    so at start). Same semantics as the durable stores within one process."""

    name = "memory"

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.instance = secrets.token_hex(8)
        self._wall = wall
        self._entries: dict[str, WebhookEntry] = {}
        self._ids: dict[tuple[str, str], float] = {}  # (upstream, event id) -> until
        self._lock = asyncio.Lock()

    def _copy(self, entry: WebhookEntry) -> WebhookEntry:
        return replace(
            entry,
            event_ids=list(entry.event_ids),
            types=list(entry.types),
            headers=list(entry.headers),
            done=list(entry.done),
        )

    async def add(self, entry: WebhookEntry) -> list[str]:
        now = self._wall()
        seen = [i for i in entry.event_ids if self._ids.get((entry.upstream, i), 0.0) > now]
        if seen:
            return seen
        for event_id in entry.event_ids:
            self._ids[(entry.upstream, event_id)] = entry.dedupe_until
        self._entries[entry.id] = self._copy(entry)
        return []

    async def claim(self, upstream: str, now: float, limit: int) -> list[WebhookEntry]:
        due = sorted(
            (e for e in self._entries.values() if e.upstream == upstream and e.state in PENDING and e.due <= now),
            key=lambda e: (e.due, e.received),
        )[:limit]
        for e in due:
            e.state, e.owner, e.updated, e.due = "claimed", self.instance, now, now + LEASE
        return [self._copy(e) for e in due]

    async def finish(self, entry: WebhookEntry) -> None:
        e = self._entries.get(entry.id)
        if e is None or e.owner != self.instance:
            return
        kept = self._copy(entry)
        if kept.state != "claimed":
            kept.owner = ""
        if kept.state in ("delivered", "dropped"):
            kept.body = b""
        kept.updated = self._wall()
        self._entries[entry.id] = kept

    async def recover(self, now: float) -> int:
        return 0  # one process: no other instance can have died holding an entry

    async def purge(self, now: float) -> None:
        for key, until in list(self._ids.items()):
            if until <= now:
                del self._ids[key]
        for e in list(self._entries.values()):
            if (e.state in ("delivered", "dropped") and e.updated + KEEP_DONE <= now) or (
                e.state == "dead" and e.updated + KEEP_DEAD <= now
            ):
                del self._entries[e.id]

    async def list(
        self, *, upstream: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[WebhookEntry]:
        found = [
            e
            for e in self._entries.values()
            if (upstream is None or e.upstream == upstream) and (state is None or e.state == state)
        ]
        found.sort(key=lambda e: e.received)
        return [self._copy(e) for e in found[:limit]]

    async def stats(self, now: float) -> dict[str, WebhookStats]:
        return compute_stats(self._entries.values())

    async def close(self) -> None:
        return None


def compute_stats(entries: Iterable[WebhookEntry]) -> dict[str, WebhookStats]:
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    for e in entries:
        c = counts.setdefault(e.upstream, {})
        c[e.state] = c.get(e.state, 0) + 1
        if e.state in PENDING:
            oldest[e.upstream] = min(oldest.get(e.upstream, e.received), e.received)
    return {
        name: WebhookStats(
            pending=sum(c.get(s, 0) for s in PENDING),
            oldest=oldest.get(name),
            dead=c.get("dead", 0),
            delivered=c.get("delivered", 0),
        )
        for name, c in counts.items()
    }


def open_webhook_store(state: object) -> WebhookStore:
    """The store that goes with a state backend: the data dir's database for `SQLiteState`,
    Redis for the Redis-backed state (`--redis`), else process memory."""
    from proxy.state.sqlite import SQLiteState

    if isinstance(state, SQLiteState):
        from proxy.webhooks.sqlite_store import SQLiteWebhookStore

        return SQLiteWebhookStore(state)
    shared = getattr(state, "webhook_store", None)
    if callable(shared):
        found: WebhookStore = shared()
        return found
    clock = getattr(state, "clock", None)
    wall = getattr(clock, "wall", None)
    return MemoryWebhookStore(wall if callable(wall) else time.time)
