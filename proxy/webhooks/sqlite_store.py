"""Webhook events in the data dir: the `webhook_events` and `webhook_ids` tables of the
durable store's database (schema version 3, proxy/state/sqlite.py).

It uses the `SQLiteState`'s own connection, instance id and liveness rule, as the outbox
does (proxy/outbox/sqlite_store.py). `add` is one `BEGIN IMMEDIATE` transaction: the ids
are checked and recorded and the entry inserted together, and it has committed (WAL,
synchronous=NORMAL: it survives kill -9) before the listener answers the provider 200.
Several processes sharing the data dir therefore never both store one event id.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.state.sqlite import WEBHOOK_DONE, WEBHOOK_OPEN, SQLiteState
from proxy.webhooks.store import (
    KEEP_DEAD,
    KEEP_DONE,
    LEASE,
    WebhookEntry,
    WebhookStats,
    WebhooksUnavailable,
    decode_headers,
    decode_list,
    encode_headers,
    encode_list,
)

log = logging.getLogger("egressd.webhooks")

ROW_SHAPE = 1
PURGE_BATCH = 5000  # rows of a table deleted per maintenance turn (every 2 s)
_COLUMNS = (
    "id, upstream, state, due, received, expires, updated, attempts, owner, event_ids, types, headers, body,"
    " done, last_error, shape"
)
T = TypeVar("T")


class CorruptEntry(Exception):
    pass


def _entry(row: tuple[Any, ...], dedupe_until: float) -> WebhookEntry:
    (
        entry_id,
        upstream,
        state,
        due,
        received,
        expires,
        updated,
        attempts,
        owner,
        event_ids,
        types,
        headers,
        body,
        done,
        last_error,
        shape,
    ) = row
    if shape != ROW_SHAPE:
        raise CorruptEntry(f"unknown row shape {shape}")
    return WebhookEntry(
        id=str(entry_id),
        upstream=str(upstream),
        event_ids=decode_list(str(event_ids)),
        types=decode_list(str(types)),
        headers=decode_headers(str(headers)),
        body=bytes(body) if body is not None else b"",
        received=float(received),
        expires=float(expires),
        dedupe_until=dedupe_until,
        state=str(state),
        due=float(due),
        attempts=int(attempts),
        owner=str(owner),
        done=decode_list(str(done)),
        last_error=str(last_error),
        updated=float(updated),
    )


class SQLiteWebhookStore:
    name = "sqlite"

    def __init__(self, state: SQLiteState) -> None:
        self.state = state
        self.instance = state.instance_id
        self._db = state._db
        self.moved_aside = 0

    async def _run(self, operation: str, fn: Callable[[], T]) -> T:
        return await self.state.run_locked(f"webhooks {operation}", fn, WebhooksUnavailable)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.state.transaction(fn)

    def _rows(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[WebhookEntry]:
        """Entries matching `where`; a row that does not decode is moved aside (state
        `corrupt`, logged), never returned and never a crash."""
        out: list[WebhookEntry] = []
        for row in db.execute(f"SELECT {_COLUMNS} FROM webhook_events WHERE {where}", args).fetchall():
            try:
                out.append(_entry(row, 0.0))
            except Exception as exc:
                self.moved_aside += 1
                log.error(
                    "webhook entry cannot be read: moved aside (state corrupt)",
                    extra={"webhook_id": str(row[0]), "error": f"{type(exc).__name__}: {exc}"},
                )
                db.execute("UPDATE webhook_events SET state = 'corrupt' WHERE id = ?", (row[0],))
        return out

    # -- the protocol ------------------------------------------------------------------------
    async def add(self, entry: WebhookEntry) -> list[str]:
        def add(db: sqlite3.Connection) -> list[str]:
            now = self.state.clock.wall()
            seen: list[str] = []
            for event_id in entry.event_ids:
                row = db.execute(
                    "SELECT until FROM webhook_ids WHERE upstream = ? AND event_id = ?", (entry.upstream, event_id)
                ).fetchone()
                if row is not None and float(row[0]) > now:
                    seen.append(event_id)
            if seen:
                return seen
            db.executemany(
                "INSERT OR REPLACE INTO webhook_ids (upstream, event_id, entry, until) VALUES (?, ?, ?, ?)",
                [(entry.upstream, i, entry.id, entry.dedupe_until) for i in entry.event_ids],
            )
            db.execute(
                f"INSERT INTO webhook_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.upstream,
                    entry.state,
                    entry.due,
                    entry.received,
                    entry.expires,
                    entry.received,
                    entry.attempts,
                    "",
                    encode_list(entry.event_ids),
                    encode_list(entry.types),
                    encode_headers(entry.headers),
                    entry.body,
                    encode_list(entry.done),
                    entry.last_error,
                    ROW_SHAPE,
                ),
            )
            return []

        return await self._run("add", lambda: self._tx(add))

    async def claim(self, upstream: str, now: float, limit: int) -> list[WebhookEntry]:
        def claim(db: sqlite3.Connection) -> list[WebhookEntry]:
            # A claimed entry whose lease ran out is taken back too (see LEASE).
            found = self._rows(
                db,
                "upstream = ? AND state IN ('queued', 'claimed') AND due <= ? ORDER BY due, received LIMIT ?",
                (upstream, now, limit),
            )
            for e in found:
                e.state, e.owner, e.updated, e.due = "claimed", self.instance, now, now + LEASE
            db.executemany(
                "UPDATE webhook_events SET state = 'claimed', owner = ?, updated = ?, due = ? WHERE id = ?",
                [(self.instance, now, now + LEASE, e.id) for e in found],
            )
            return found

        return await self._run("claim", lambda: self._tx(claim))

    async def finish(self, entry: WebhookEntry) -> None:
        def finish() -> None:
            owner = self.instance if entry.state == "claimed" else ""
            body = b"" if entry.state in ("delivered", "dropped") else entry.body
            self._db.execute(
                "UPDATE webhook_events SET state = ?, due = ?, updated = ?, attempts = ?, owner = ?, body = ?,"
                " done = ?, last_error = ? WHERE id = ? AND owner = ?",
                (
                    entry.state,
                    entry.due,
                    self.state.clock.wall(),
                    entry.attempts,
                    owner,
                    body,
                    encode_list(entry.done),
                    entry.last_error[:500],
                    entry.id,
                    self.instance,
                ),
            )

        await self._run("finish", finish)

    async def recover(self, now: float) -> int:
        def recover(db: sqlite3.Connection) -> int:
            held = db.execute(
                f"SELECT id, owner FROM webhook_events WHERE {WEBHOOK_OPEN} AND state = 'claimed' AND owner != ''"
            ).fetchall()
            alive: dict[str, bool] = {}
            taken = 0
            for entry_id, owner in held:
                owner = str(owner)
                if owner not in alive:
                    alive[owner] = self.state._alive(owner, now)
                if alive[owner]:
                    continue
                db.execute(
                    "UPDATE webhook_events SET state = 'queued', owner = '', due = ?, updated = ?,"
                    " last_error = 'the process delivering it died' WHERE id = ? AND state = 'claimed'",
                    (now, now, entry_id),
                )
                taken += 1
            return taken

        return await self._run("recover", lambda: self._tx(recover))

    async def purge(self, now: float) -> None:
        def purge(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM webhook_ids WHERE rowid IN"
                f" (SELECT rowid FROM webhook_ids WHERE until <= ? LIMIT {PURGE_BATCH})",
                (now,),
            )
            # One bounded batch per kind and turn (webhook_events_done), never a scan.
            for kind, before in (
                ("state IN ('delivered', 'dropped')", now - KEEP_DONE),
                ("state = 'dead'", now - KEEP_DEAD),
            ):
                db.execute(
                    "DELETE FROM webhook_events WHERE rowid IN (SELECT rowid FROM webhook_events"
                    f" WHERE {WEBHOOK_DONE} AND {kind} AND updated <= ? LIMIT {PURGE_BATCH})",
                    (before,),
                )

        await self._run("purge", lambda: self._tx(purge))

    async def list(
        self, *, upstream: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[WebhookEntry]:
        where, args = ["1"], []
        if upstream is not None:
            where.append("upstream = ?")
            args.append(upstream)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        clause = " AND ".join(where) + " ORDER BY received LIMIT ?"
        return await self._run("list", lambda: self._tx(lambda db: self._rows(db, clause, (*args, limit))))

    async def stats(self, now: float) -> dict[str, WebhookStats]:
        def stats() -> dict[str, WebhookStats]:
            # Pending and dead only (webhook_events_open): delivered entries, a day of
            # them, are not counted (`delivered` stays 0, as with Redis).
            counts: dict[str, dict[str, int]] = {}
            oldest: dict[str, float] = {}
            for upstream, state, n, first in self._db.execute(
                "SELECT upstream, state, COUNT(*), MIN(received) FROM webhook_events"
                f" WHERE {WEBHOOK_OPEN} GROUP BY upstream, state"
            ):
                u = str(upstream)
                counts.setdefault(u, {})[str(state)] = int(n)
                if state in ("queued", "claimed") and first is not None:
                    oldest[u] = min(oldest.get(u, float(first)), float(first))
            return {
                u: WebhookStats(
                    pending=c.get("queued", 0) + c.get("claimed", 0),
                    oldest=oldest.get(u),
                    dead=c.get("dead", 0),
                )
                for u, c in counts.items()
            }

        return await self._run("stats", stats)

    async def close(self) -> None:
        return None  # the connection belongs to the SQLiteState
