"""Where kept sends live: one protocol, three stores (memory, the data dir's SQLite, Redis).

An entry's life (docs/outbox.md):

    queued --claim--> claimed --first byte written--> sending --> delivered
       ^                 |                               |    \\--> queued (did not reach
       |  (owner died:   |                               |          the upstream: retried)
       |   never sent)   |                               |    \\--> dead (refused by the
       \\-----------------/                               |          provider, or max_age)
                                                         \\--> doubt --probe--> delivered
                                                                  |           \\-> queued
                                                                  \\--> ambiguous (no way to ask)

* `claimed`: a worker holds it; nothing has been written upstream yet. If its process
  dies the entry goes back to `queued` (it was never sent).
* `sending`: the first byte of a delivery attempt is about to be written (`mark_sending`,
  called from the transport, with the upstream it goes to). If its process dies the
  entry is in `doubt`: the provider may have it.
* `doubt`: an answer (or the lack of one) left it open whether the provider took the
  send. After `probe_after` the worker asks the provider, where its plugin can (Mailgun's
  events API, SendGrid's Email Activity API, filtered by the id egressd put in the send),
  and only a "not there" sends it again. Where no one can ask, it becomes `ambiguous`.
* `delivered` rows lose their body and keep their ids (the app's id -> the provider's
  message id: the webhooks translate events with it) for `KEEP_DELIVERED` seconds.
* `ambiguous` and `dead` rows keep everything for the operator (`egressd outbox`):
  `retry` puts one back in the queue, `drop` deletes it.

Every store keeps an entry's transitions atomic against other processes (SQLite
transactions, Redis scripts): two workers never hold the same entry.
"""

from __future__ import annotations

import heapq
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Protocol

#: Entries that still wait for delivery (they count toward `max_entries`).
PENDING = ("queued", "claimed", "sending", "doubt")
STATES = (*PENDING, "delivered", "ambiguous", "dead")
KEEP_DELIVERED = 7 * 86400.0  # the id mapping outlives the providers' webhook retries (3 days)
ID_PREFIX = "eo_"


def new_id() -> str:
    """An outbox id: `eo_` and 24 hex digits (unique, unguessable, safe in a Message-Id)."""
    return ID_PREFIX + secrets.token_hex(12)


@dataclass(slots=True)
class Entry:
    """One kept send. Times are wall-clock seconds."""

    id: str
    upstream: str
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    created: float
    expires: float  # created (or the operator's retry) + max_age
    state: str = "queued"
    due: float = 0.0  # queued: not before; doubt: when to ask the provider
    attempts: int = 0  # delivery attempts that went out (or tried to)
    owner: str = ""  # claimed / sending: the instance holding it
    sent_to: list[str] = field(default_factory=list)  # upstreams a byte of it was written to
    provider_id: str = ""  # delivered: the provider's message id
    delivered_via: str = ""  # delivered: the upstream that took it (a fallback after failover)
    last_error: str = ""  # why the last attempt did not deliver it (no secrets)
    updated: float = 0.0

    def summary(self) -> dict[str, object]:
        """What `/outbox.json` and `egressd outbox list` show (no headers, no body)."""
        return {
            "id": self.id,
            "upstream": self.upstream,
            "state": self.state,
            "method": self.method,
            "path": self.path,
            "created": round(self.created, 3),
            "expires": round(self.expires, 3),
            "due": round(self.due, 3),
            "attempts": self.attempts,
            "sent_to": list(self.sent_to),
            "provider_id": self.provider_id,
            "delivered_via": self.delivered_via,
            "last_error": self.last_error,
            "size": len(self.body),
        }


@dataclass(frozen=True, slots=True)
class UpstreamStats:
    pending: int = 0  # queued, claimed, sending, doubt
    oldest: float | None = None  # created time of the oldest pending entry
    doubt: int = 0
    ambiguous: int = 0
    dead: int = 0
    delivered: int = 0  # delivered rows still kept (the id mapping)


class OutboxFull(Exception):
    """The upstream's outbox holds `max_entries` pending sends."""


class OutboxUnavailable(Exception):
    """The store cannot take the send now (Redis away, the database locked too long)."""


class EntryNotHeld(OutboxUnavailable):
    """`mark_sending` on an entry this process does not hold (any more: another process
    took it back, judging this one dead): it must not be sent."""


class OutboxStore(Protocol):
    name: str
    instance: str  # this process's owner token

    async def add(self, entry: Entry, *, max_entries: int) -> None:
        """Store `entry` durably (raises `OutboxFull` or `OutboxUnavailable`; then nothing is stored)."""

    async def claim(self, upstream: str, now: float, limit: int) -> list[Entry]:
        """Up to `limit` queued entries of `upstream` due by `now`, now `claimed` by this instance."""

    async def mark_sending(self, entry_id: str, upstream: str) -> None:
        """The entry's next byte goes to `upstream`: `sending`, `upstream` added to `sent_to`.
        Raises `EntryNotHeld` when this instance does not hold the entry: then it is not sent."""

    async def finish(self, entry: Entry) -> None:
        """Write the entry's new state and fields (only while this instance holds it)."""

    async def due_probes(self, upstream: str, now: float, limit: int) -> list[Entry]:
        """Entries in `doubt` whose probe is due, claimed for probing by this instance."""

    async def recover(self, now: float, probe_after: Callable[[str], float]) -> tuple[int, int]:
        """Entries held by dead instances: `claimed` back to `queued`, `sending` to `doubt`
        (probe at now + probe_after(upstream)). Returns (requeued, in doubt)."""

    async def expire(self, now: float) -> list[Entry]:
        """Pending entries past `expires` (not held by a live worker) become `dead`; forget
        `delivered` rows older than `KEEP_DELIVERED`. Returns the entries that died."""

    async def get(self, entry_id: str) -> Entry | None: ...

    async def list(self, *, upstream: str | None = None, state: str | None = None, limit: int = 100) -> list[Entry]: ...

    async def retry(self, entry_id: str, now: float, max_age: float) -> Entry | None:
        """An `ambiguous` or `dead` entry back to `queued` (due now, expires now + max_age)."""

    async def drop(self, entry_id: str) -> Entry | None:
        """Delete an entry that no worker holds; returns what was deleted."""

    async def stats(self, now: float) -> dict[str, UpstreamStats]: ...

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


class MemoryOutbox:
    """The outbox of `--data-dir none`: in process memory, lost on restart (a warning says so
    at start). Same semantics as the durable stores within one process."""

    name = "memory"

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self.instance = secrets.token_hex(8)
        self._wall = wall
        self._entries: dict[str, Entry] = {}
        # Kept beside the entries so that an add and a claim cost O(log n), not a scan:
        # pending entries per upstream, and a heap of (due, created, id) of queued ones
        # (stale items, whose entry moved on, are skipped when they come up).
        self._pending: dict[str, int] = {}
        self._queue: dict[str, list[tuple[float, float, str]]] = {}

    def _copy(self, entry: Entry) -> Entry:
        return replace(entry, headers=list(entry.headers), sent_to=list(entry.sent_to))

    def _put(self, entry: Entry, old_state: str | None) -> None:
        """Account for `entry` (stored now) having moved from `old_state` (None: new)."""
        if (old_state in PENDING) != (entry.state in PENDING):
            step = 1 if entry.state in PENDING else -1
            self._pending[entry.upstream] = self._pending.get(entry.upstream, 0) + step
        if entry.state == "queued":
            heapq.heappush(self._queue.setdefault(entry.upstream, []), (entry.due, entry.created, entry.id))

    async def add(self, entry: Entry, *, max_entries: int) -> None:
        if self._pending.get(entry.upstream, 0) >= max_entries:
            raise OutboxFull(entry.upstream)
        kept = self._copy(entry)
        self._entries[entry.id] = kept
        self._put(kept, None)

    async def claim(self, upstream: str, now: float, limit: int) -> list[Entry]:
        heap = self._queue.get(upstream, [])
        due: list[Entry] = []
        while heap and len(due) < limit and heap[0][0] <= now:
            at, _, entry_id = heapq.heappop(heap)
            e = self._entries.get(entry_id)
            if e is None or e.state != "queued" or e.due != at:
                continue  # stale: the entry moved on (its current due time has its own item)
            due.append(e)
        for e in due:
            e.state, e.owner, e.updated = "claimed", self.instance, now
        return [self._copy(e) for e in due]

    async def mark_sending(self, entry_id: str, upstream: str) -> None:
        e = self._entries.get(entry_id)
        if e is None or e.owner != self.instance:
            raise EntryNotHeld(entry_id)
        e.state = "sending"
        if upstream not in e.sent_to:
            e.sent_to.append(upstream)

    async def finish(self, entry: Entry) -> None:
        e = self._entries.get(entry.id)
        if e is None or e.owner != self.instance:
            return
        kept = self._copy(entry)
        kept.sent_to = sorted(set(e.sent_to) | set(entry.sent_to), key=(e.sent_to + entry.sent_to).index)
        if kept.state not in ("claimed", "sending"):
            kept.owner = ""
        if kept.state == "delivered":
            kept.body = b""
        kept.updated = self._wall()  # as the durable stores: when the store took the change
        self._entries[entry.id] = kept
        self._put(kept, e.state)

    async def due_probes(self, upstream: str, now: float, limit: int) -> list[Entry]:
        due = sorted(
            (e for e in self._entries.values() if e.upstream == upstream and e.state == "doubt" and e.due <= now),
            key=lambda e: e.due,
        )[:limit]
        taken: list[Entry] = []
        for e in due:
            e.owner, e.updated = self.instance, now
            taken.append(self._copy(e))  # as SQLite: with the due time from before the hold
            e.due = now + 3600.0  # held for probing; the worker writes the outcome
        return taken

    async def recover(self, now: float, probe_after: Callable[[str], float]) -> tuple[int, int]:
        return 0, 0  # one process: no other instance can have died holding an entry

    async def expire(self, now: float) -> list[Entry]:
        died: list[Entry] = []
        for e in list(self._entries.values()):
            if e.state in ("queued", "doubt") and not e.owner and e.expires <= now:
                old = e.state
                e.state, e.owner, e.updated = ("dead" if e.state == "queued" else "ambiguous"), "", now
                e.last_error = e.last_error or "max_age passed"
                self._put(e, old)
                died.append(self._copy(e))
            elif e.state == "delivered" and e.updated + KEEP_DELIVERED <= now:
                del self._entries[e.id]
        return died

    async def get(self, entry_id: str) -> Entry | None:
        e = self._entries.get(entry_id)
        return None if e is None else self._copy(e)

    async def list(self, *, upstream: str | None = None, state: str | None = None, limit: int = 100) -> list[Entry]:
        found = [
            e
            for e in self._entries.values()
            if (upstream is None or e.upstream == upstream) and (state is None or e.state == state)
        ]
        found.sort(key=lambda e: e.created)
        return [self._copy(e) for e in found[:limit]]

    async def retry(self, entry_id: str, now: float, max_age: float) -> Entry | None:
        e = self._entries.get(entry_id)
        if e is None or e.state not in ("ambiguous", "dead"):
            return None
        old = e.state
        e.state, e.due, e.expires, e.owner, e.updated = "queued", now, now + max_age, "", now
        e.sent_to = []
        self._put(e, old)
        return self._copy(e)

    async def drop(self, entry_id: str) -> Entry | None:
        e = self._entries.get(entry_id)
        if e is None or e.state in ("claimed", "sending"):
            return None
        del self._entries[entry_id]
        if e.state in PENDING:
            self._pending[e.upstream] -= 1
        return e

    async def stats(self, now: float) -> dict[str, UpstreamStats]:
        return compute_stats(self._entries.values())

    async def close(self) -> None:
        return None


def compute_stats(entries: Iterable[Entry]) -> dict[str, UpstreamStats]:
    counts: dict[str, dict[str, int]] = {}
    oldest: dict[str, float] = {}
    for e in entries:
        c = counts.setdefault(e.upstream, {})
        c[e.state] = c.get(e.state, 0) + 1
        if e.state in PENDING:
            oldest[e.upstream] = min(oldest.get(e.upstream, e.created), e.created)
    return {
        name: UpstreamStats(
            pending=sum(c.get(s, 0) for s in PENDING),
            oldest=oldest.get(name),
            doubt=c.get("doubt", 0),
            ambiguous=c.get("ambiguous", 0),
            dead=c.get("dead", 0),
            delivered=c.get("delivered", 0),
        )
        for name, c in counts.items()
    }


def open_outbox(state: object) -> OutboxStore:
    """The outbox store that goes with a state backend: the data dir's database for
    `SQLiteState`, Redis for the Redis-backed state (`--redis`), else process memory."""
    from proxy.state.sqlite import SQLiteState

    if isinstance(state, SQLiteState):
        from proxy.outbox.sqlite_store import SQLiteOutbox

        return SQLiteOutbox(state)
    shared = getattr(state, "outbox_store", None)
    if callable(shared):
        found: OutboxStore = shared()
        return found
    clock = getattr(state, "clock", None)
    wall = getattr(clock, "wall", None)
    return MemoryOutbox(wall if callable(wall) else time.time)
