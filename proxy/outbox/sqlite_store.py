"""The outbox in the data dir: the `outbox` table of the durable store's database.

It uses the `SQLiteState`'s own connection (one database, one set of locks, the same
instance id and liveness rule: a process whose pid is gone or whose heartbeat stopped is
dead, proxy/state/sqlite.py). Every transition is one statement or one `BEGIN IMMEDIATE`
transaction, so several processes sharing the data dir never hold the same entry.

`add` commits before it returns: the app's "accepted" answer is only built after that
(WAL with synchronous=NORMAL: the row survives kill -9; an OS crash may lose the last
transactions, docs/durable-store.md). The `max_entries` bound is checked against a count
of pending rows that is read at most every `COUNT_EVERY` seconds and kept up to date
with this process's own additions in between, so an add costs one INSERT, not a count:
several processes sharing the data dir may pass the bound by what they add in that time.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.outbox.store import (
    KEEP_DELIVERED,
    PENDING,
    Entry,
    EntryNotHeld,
    OutboxFull,
    OutboxUnavailable,
    UpstreamStats,
    decode_headers,
    encode_headers,
)
from proxy.state.sqlite import SQLiteState

log = logging.getLogger("egressd.outbox")

ROW_SHAPE = 1
COUNT_EVERY = 1.0
_COLUMNS = (
    "id, upstream, state, due, created, expires, updated, attempts, owner, method, path, query, headers, body,"
    " sent_to, provider_id, delivered_via, last_error, shape"
)
_PENDING_SQL = "(" + ", ".join(f"'{s}'" for s in PENDING) + ")"
T = TypeVar("T")


class CorruptEntry(Exception):
    pass


def _entry(row: tuple[Any, ...]) -> Entry:
    (
        entry_id,
        upstream,
        state,
        due,
        created,
        expires,
        updated,
        attempts,
        owner,
        method,
        path,
        query,
        headers,
        body,
        sent_to,
        provider_id,
        delivered_via,
        last_error,
        shape,
    ) = row
    if shape != ROW_SHAPE:
        raise CorruptEntry(f"unknown row shape {shape}")
    return Entry(
        id=str(entry_id),
        upstream=str(upstream),
        method=str(method),
        path=str(path),
        query=str(query),
        headers=decode_headers(str(headers)),
        body=bytes(body) if body is not None else b"",
        created=float(created),
        expires=float(expires),
        state=str(state),
        due=float(due),
        attempts=int(attempts),
        owner=str(owner),
        sent_to=[s for s in str(sent_to).split(",") if s],
        provider_id=str(provider_id),
        delivered_via=str(delivered_via),
        last_error=str(last_error),
        updated=float(updated),
    )


class SQLiteOutbox:
    name = "sqlite"

    def __init__(self, state: SQLiteState) -> None:
        self.state = state
        self.instance = state.instance_id
        self._db = state._db
        self._counts: dict[str, int] = {}
        self._counted = -1e18
        self.moved_aside = 0

    def _wall(self) -> float:
        return self.state.clock.wall()

    # -- plumbing ----------------------------------------------------------------------------
    async def _run(self, operation: str, fn: Callable[[], T]) -> T:
        return await self.state.run_locked(f"outbox {operation}", fn, OutboxUnavailable)

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self.state.transaction(fn)

    def _rows(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[Entry]:
        """Entries matching `where`; a row that does not decode is moved aside (state
        `corrupt`, logged once), never returned and never a crash."""
        out: list[Entry] = []
        for row in db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE {where}", args).fetchall():
            try:
                out.append(_entry(row))
            except Exception as exc:
                self.moved_aside += 1
                log.error(
                    "outbox entry cannot be read: moved aside (state corrupt)",
                    extra={"outbox_id": str(row[0]), "error": f"{type(exc).__name__}: {exc}"},
                )
                db.execute("UPDATE outbox SET state = 'corrupt' WHERE id = ?", (row[0],))
        return out

    # -- the protocol ------------------------------------------------------------------------
    async def add(self, entry: Entry, *, max_entries: int) -> None:
        def add() -> None:
            now = time.monotonic()
            if now - self._counted >= COUNT_EVERY:
                self._counts = {
                    str(u): int(n)
                    for u, n in self._db.execute(
                        f"SELECT upstream, COUNT(*) FROM outbox WHERE state IN {_PENDING_SQL} GROUP BY upstream"
                    )
                }
                self._counted = now
            if self._counts.get(entry.upstream, 0) >= max_entries:
                raise OutboxFull(entry.upstream)
            self._db.execute(
                f"INSERT INTO outbox ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.id,
                    entry.upstream,
                    entry.state,
                    entry.due,
                    entry.created,
                    entry.expires,
                    entry.created,
                    entry.attempts,
                    "",
                    entry.method,
                    entry.path,
                    entry.query,
                    encode_headers(entry.headers),
                    entry.body,
                    ",".join(entry.sent_to),
                    entry.provider_id,
                    entry.delivered_via,
                    entry.last_error,
                    ROW_SHAPE,
                ),
            )
            self._counts[entry.upstream] = self._counts.get(entry.upstream, 0) + 1

        await self._run("add", add)

    async def claim(self, upstream: str, now: float, limit: int) -> list[Entry]:
        def claim(db: sqlite3.Connection) -> list[Entry]:
            found = self._rows(
                db,
                "upstream = ? AND state = 'queued' AND due <= ? ORDER BY due, created LIMIT ?",
                (upstream, now, limit),
            )
            for e in found:
                e.state, e.owner, e.updated = "claimed", self.instance, now
            db.executemany(
                "UPDATE outbox SET state = 'claimed', owner = ?, updated = ? WHERE id = ?",
                [(self.instance, now, e.id) for e in found],
            )
            return found

        return await self._run("claim", lambda: self._tx(claim))

    async def mark_sending(self, entry_id: str, upstream: str) -> None:
        def mark() -> None:
            # One statement: adds `upstream` to sent_to unless it is there already; only
            # while this instance holds the entry (a stalled process judged dead must not
            # send what another one took back).
            marked = self._db.execute(
                "UPDATE outbox SET state = 'sending', updated = ?,"
                " sent_to = CASE WHEN (',' || sent_to || ',') LIKE ('%,' || ? || ',%') THEN sent_to"
                " WHEN sent_to = '' THEN ? ELSE sent_to || ',' || ? END"
                " WHERE id = ? AND owner = ?",
                (self._wall(), upstream, upstream, upstream, entry_id, self.instance),
            ).rowcount
            if marked != 1:
                raise EntryNotHeld(entry_id)

        await self._run("mark_sending", mark)

    async def finish(self, entry: Entry) -> None:
        def finish() -> None:
            owner = self.instance if entry.state in ("claimed", "sending") else ""
            # The body never changes: it is only dropped once delivered (not written again).
            self._db.execute(
                "UPDATE outbox SET state = ?, due = ?, expires = ?, updated = ?, attempts = ?, owner = ?,"
                " body = CASE WHEN ? = 'delivered' THEN x'' ELSE body END,"
                " provider_id = ?, delivered_via = ?, last_error = ?,"
                " sent_to = CASE WHEN ? = '' THEN sent_to ELSE ? END"
                " WHERE id = ? AND owner = ?",
                (
                    entry.state,
                    entry.due,
                    entry.expires,
                    self._wall(),
                    entry.attempts,
                    owner,
                    entry.state,
                    entry.provider_id,
                    entry.delivered_via,
                    entry.last_error[:500],
                    ",".join(entry.sent_to),
                    ",".join(entry.sent_to),
                    entry.id,
                    self.instance,
                ),
            )

        await self._run("finish", finish)

    async def due_probes(self, upstream: str, now: float, limit: int) -> list[Entry]:
        def take(db: sqlite3.Connection) -> list[Entry]:
            found = self._rows(
                db, "upstream = ? AND state = 'doubt' AND due <= ? ORDER BY due LIMIT ?", (upstream, now, limit)
            )
            for e in found:
                e.owner = self.instance
            # Held for probing: owned, and not due again for an hour unless written back.
            db.executemany(
                "UPDATE outbox SET owner = ?, due = ?, updated = ? WHERE id = ?",
                [(self.instance, now + 3600.0, now, e.id) for e in found],
            )
            return found

        return await self._run("due_probes", lambda: self._tx(take))

    async def recover(self, now: float, probe_after: Callable[[str], float]) -> tuple[int, int]:
        def recover(db: sqlite3.Connection) -> tuple[int, int]:
            held = db.execute(
                "SELECT id, upstream, state, owner FROM outbox WHERE owner != '' AND state IN"
                " ('claimed', 'sending', 'doubt')"
            ).fetchall()
            requeued = doubted = 0
            alive: dict[str, bool] = {}
            for entry_id, upstream, state, owner in held:
                owner = str(owner)
                if owner not in alive:
                    alive[owner] = self.state._alive(owner, now)
                if alive[owner]:
                    continue
                if state == "claimed":
                    db.execute(
                        "UPDATE outbox SET state = 'queued', owner = '', due = ?, updated = ? WHERE id = ?",
                        (now, now, entry_id),
                    )
                    requeued += 1
                else:  # sending (the process died mid-send), or a probe it never finished
                    due = now + probe_after(str(upstream)) if state == "sending" else now
                    db.execute(
                        "UPDATE outbox SET state = 'doubt', owner = '', due = ?, updated = ?,"
                        " last_error = CASE WHEN state = 'sending' THEN 'the process sending it died' ELSE"
                        " last_error END WHERE id = ?",
                        (due, now, entry_id),
                    )
                    doubted += 1 if state == "sending" else 0
            return requeued, doubted

        return await self._run("recover", lambda: self._tx(recover))

    async def expire(self, now: float) -> list[Entry]:
        def expire(db: sqlite3.Connection) -> list[Entry]:
            died = self._rows(db, "state IN ('queued', 'doubt') AND owner = '' AND expires <= ? LIMIT 1000", (now,))
            for e in died:
                e.state = "dead" if e.state == "queued" else "ambiguous"
                e.last_error = e.last_error or "max_age passed"
                db.execute(
                    "UPDATE outbox SET state = ?, last_error = ?, updated = ? WHERE id = ?",
                    (e.state, e.last_error, now, e.id),
                )
            db.execute("DELETE FROM outbox WHERE state = 'delivered' AND updated <= ?", (now - KEEP_DELIVERED,))
            return died

        return await self._run("expire", lambda: self._tx(expire))

    async def get(self, entry_id: str) -> Entry | None:
        def get(db: sqlite3.Connection) -> list[Entry]:
            return self._rows(db, "id = ?", (entry_id,))

        found = await self._run("get", lambda: self._tx(get))
        return found[0] if found else None

    async def list(self, *, upstream: str | None = None, state: str | None = None, limit: int = 100) -> list[Entry]:
        where, args = ["1"], []
        if upstream is not None:
            where.append("upstream = ?")
            args.append(upstream)
        if state is not None:
            where.append("state = ?")
            args.append(state)
        clause = " AND ".join(where) + " ORDER BY created LIMIT ?"

        def listing(db: sqlite3.Connection) -> list[Entry]:
            return self._rows(db, clause, (*args, limit))

        return await self._run("list", lambda: self._tx(listing))

    async def retry(self, entry_id: str, now: float, max_age: float) -> Entry | None:
        def retry(db: sqlite3.Connection) -> list[Entry]:
            found = self._rows(db, "id = ? AND state IN ('ambiguous', 'dead')", (entry_id,))
            for e in found:
                e.state, e.due, e.expires, e.owner, e.sent_to = "queued", now, now + max_age, "", []
                db.execute(
                    "UPDATE outbox SET state = 'queued', due = ?, expires = ?, owner = '', sent_to = '', updated = ?"
                    " WHERE id = ?",
                    (now, now + max_age, now, entry_id),
                )
            return found

        found = await self._run("retry", lambda: self._tx(retry))
        return found[0] if found else None

    async def drop(self, entry_id: str) -> Entry | None:
        def drop(db: sqlite3.Connection) -> list[Entry]:
            found = self._rows(db, "id = ? AND state NOT IN ('claimed', 'sending')", (entry_id,))
            if found:
                db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,))
            return found

        found = await self._run("drop", lambda: self._tx(drop))
        return found[0] if found else None

    async def stats(self, now: float) -> dict[str, UpstreamStats]:
        def stats() -> dict[str, UpstreamStats]:
            counts: dict[str, dict[str, int]] = {}
            oldest: dict[str, float] = {}
            for upstream, state, n, first in self._db.execute(
                "SELECT upstream, state, COUNT(*), MIN(created) FROM outbox GROUP BY upstream, state"
            ):
                counts.setdefault(str(upstream), {})[str(state)] = int(n)
                if state in PENDING and first is not None:
                    u = str(upstream)
                    oldest[u] = min(oldest.get(u, float(first)), float(first))
            self._counts = {u: sum(c.get(s, 0) for s in PENDING) for u, c in counts.items()}
            self._counted = time.monotonic()
            return {
                u: UpstreamStats(
                    pending=self._counts[u],
                    oldest=oldest.get(u),
                    doubt=c.get("doubt", 0),
                    ambiguous=c.get("ambiguous", 0),
                    dead=c.get("dead", 0),
                    delivered=c.get("delivered", 0),
                )
                for u, c in counts.items()
            }

        return await self._run("stats", stats)

    async def close(self) -> None:
        return None  # the connection belongs to the SQLiteState
