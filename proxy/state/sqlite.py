"""The embedded durable store (`--data-dir`): records that must survive a restart, in SQLite.

`SQLiteState` is a `MemoryState` whose idempotency and fingerprint records and failover
routing ledger live in one SQLite database, `<data dir>/egressd.db` (standard library
`sqlite3`). Everything else stays in process memory, as with `MemoryState`: rate limits,
pauses, retry budgets, circuits and the response cache (they are rebuilt in seconds), and
`kv` (it holds OAuth tokens: secrets never go to disk).

Durability. The database runs in WAL mode with `synchronous=NORMAL`: a transaction that
committed is in the WAL file before the call returns, so it survives the process being
killed at any moment (kill -9, OOM kill, a crash). An OS crash or a power loss may lose
the last transactions (those not yet checkpointed or synced), never corrupt the file.

Sharing. Several egressd processes may open the same data dir (replicas on one host, a
benchmark starting eight); SQLite's own file locks make them one store. Every
read-modify-write is one `BEGIN IMMEDIATE` transaction (the write lock is taken before the
read), so one claim decides among all of them, as a Redis script does (contract 7.7). A
statement that finds the lock taken waits up to `BUSY_WAIT` (busy_timeout, blocking the
loop: each holder keeps the lock for tens of microseconds); past that a claim raises
`RecordsUnavailable` (the idempotency stage tries again without blocking, then answers
503 `state_unavailable`) and a completion, release or ledger write yields to the loop and
tries again for up to `LOCK_TIMEOUT` seconds before it is logged as lost. The data dir
must be on a local file system (WAL needs shared memory between the processes; not NFS).

Processes. Each process registers a random instance id in `instances` (with its pid and
host) and a background task (`start()` / `close()`) writes `seen` every
`HEARTBEAT_EVERY` seconds. A claim that meets a record in flight under another instance
treats its owner as dead when the instance has no row, when its pid is gone (same host;
or is the claimer's own pid, i.e. a restarted container), or when its `seen` is older
than `DEAD_AFTER` seconds: the record is then in doubt at once (the process was killed
mid-call), without waiting for the owner's lock to lapse. A live process whose loop
stalls for longer than `DEAD_AFTER` may see its calls turned in doubt: the safe side (a
resend is refused, not sent twice). Owner tokens passed by callers are opaque; the
instance id is kept in its own column.

Times. Stored times (`lock_until`, `expires`, `seen`) are wall-clock seconds
(`clock.wall()`), so that they keep their meaning across restarts.

Cost. Each operation is one short transaction on the event loop thread, with no thread
pool: measured on a 2-CPU VM (ext4 on virtio disk, WAL, NORMAL, SQLite 3.40), a new
`idem_claim` of a new key is one INSERT and `idem_complete` of the owner's live record
one UPDATE (each its own transaction; other cases take the full read-modify-write path):
a claim+complete pair costs about 50 us (a 500-byte answer), a replayed claim about 12 us (the in-memory backend: about
4 us per pair); docs/durable-store.md has the measurement. Handing each call to a thread
would cost about as much as the work itself. The loop only waits longer when another process holds the write lock
(each holder keeps it for tens of microseconds).

Robustness. A row this version cannot read (a `shape` it does not know, an unknown state,
a stored answer that does not decode) is treated as absent: a claim takes it over as a
new record, and nothing crashes. Schema changes are additive (new tables, new columns
with defaults) and bump `schema_version` in `meta`; a database that lacks a column this
version needs is refused at start (`open` raises, `proxy.state.factory` reports the path).

Expired rows are deleted by the background task in bounded batches (`PURGE_BATCH` rows
per transaction, at most `PURGE_BATCHES` per tick), so the file's size follows the
records alive: roughly the answers kept for their `replay_ttl` / `fingerprint_window`.

Queues. The outbox (contract 7.6) keeps its entries in the `outbox` table of this same
database (schema version 2; proxy/outbox/sqlite_store.py reads and writes it through this
store's connection). Webhook deliveries (7.5) keep theirs in `webhook_events`, and the
provider event ids seen within `dedupe_for` in `webhook_ids` (schema version 3;
proxy/webhooks/sqlite_store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from proxy.clock import Clock
from proxy.state.base import IdempotencyClaim, RecordsUnavailable, StoredResponse
from proxy.state.memory import MemoryState
from proxy.state.redis import decode_response, encode_response

log = logging.getLogger("egressd.state")
T = TypeVar("T")

DB_NAME = "egressd.db"
SCHEMA_VERSION = 3  # 2: the outbox table; 3: webhook_events and webhook_ids
ROW_SHAPE = 1  # the `shape` of the rows this version writes (and the only one it reads)
LOCK_TIMEOUT = 5.0  # start-up: how long to wait for another process's lock; writes: how long to retry
# At run time a statement waits at most this long for another process's lock, blocking
# the loop; then a claim raises RecordsUnavailable (the idempotency stage retries it
# without blocking) and a write yields to the loop and tries again (`_write`).
BUSY_WAIT = 0.2
HEARTBEAT_EVERY = 1.0
# While the background task checkpoints every second, the automatic checkpoint on a write
# is only a safety bound for a burst (pages of the WAL, 4 KiB each: ~40 MB).
BACKGROUND_AUTOCHECKPOINT = 10_000
DEAD_AFTER = 5.0  # an instance not seen for this long is dead
FORGET_INSTANCES_AFTER = 3600.0  # instance rows not seen for this long are deleted
PURGE_BATCH = 500
PURGE_BATCHES = 10
_LOG_EVERY = 10.0

_STATES = ("in_flight", "in_doubt", "completed")
_LOCAL_INSTANCES: set[str] = set()  # the instances open in this process (alive by definition)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # One idempotency or fingerprint record per key (see proxy/state/base.py).
    "CREATE TABLE IF NOT EXISTS records ("
    " key TEXT PRIMARY KEY,"
    " state TEXT NOT NULL,"  # in_flight | in_doubt | completed
    " fingerprint TEXT NOT NULL,"
    " owner TEXT NOT NULL DEFAULT '',"  # in flight: the caller's opaque owner token
    " instance TEXT NOT NULL DEFAULT '',"  # in flight: the instance id of the owning process
    " lock_until REAL NOT NULL DEFAULT 0,"  # in flight: the end of the owner's lock (wall clock)
    " expires REAL NOT NULL,"  # the end of the record's life (wall clock)
    " response BLOB,"  # completed: proxy.state.redis.encode_response
    " shape INTEGER NOT NULL DEFAULT 1)",
    # The failover routing ledger.
    "CREATE TABLE IF NOT EXISTS ledger ("
    " key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL NOT NULL, shape INTEGER NOT NULL DEFAULT 1)",
    # The processes using this data dir (for dead-owner detection).
    "CREATE TABLE IF NOT EXISTS instances ("
    " id TEXT PRIMARY KEY, pid INTEGER NOT NULL, host TEXT NOT NULL, started REAL NOT NULL, seen REAL NOT NULL)",
    # Kept sends (proxy/outbox/store.py has the states).
    "CREATE TABLE IF NOT EXISTS outbox ("
    " id TEXT PRIMARY KEY,"
    " upstream TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " due REAL NOT NULL,"
    " created REAL NOT NULL,"
    " expires REAL NOT NULL,"
    " updated REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " owner TEXT NOT NULL DEFAULT '',"
    " method TEXT NOT NULL,"
    " path TEXT NOT NULL,"
    " query TEXT NOT NULL,"
    " headers TEXT NOT NULL,"  # JSON [[name, value], ...]
    " body BLOB,"
    " sent_to TEXT NOT NULL DEFAULT '',"  # comma-separated upstream names
    " provider_id TEXT NOT NULL DEFAULT '',"
    " delivered_via TEXT NOT NULL DEFAULT '',"
    " last_error TEXT NOT NULL DEFAULT '',"
    " shape INTEGER NOT NULL DEFAULT 1)",
    # Verified webhook POSTs waiting for (or done with) delivery to the app
    # (proxy/webhooks/store.py has the states).
    "CREATE TABLE IF NOT EXISTS webhook_events ("
    " id TEXT PRIMARY KEY,"
    " upstream TEXT NOT NULL,"
    " state TEXT NOT NULL,"
    " due REAL NOT NULL,"
    " received REAL NOT NULL,"
    " expires REAL NOT NULL,"
    " updated REAL NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0,"
    " owner TEXT NOT NULL DEFAULT '',"
    " event_ids TEXT NOT NULL,"  # JSON ["id", ...]
    " types TEXT NOT NULL DEFAULT '[]',"  # JSON ["type", ...]
    " headers TEXT NOT NULL,"  # JSON [[name, value], ...]
    " body BLOB,"
    " done TEXT NOT NULL DEFAULT '[]',"  # JSON: delivery parts answered 2xx
    " last_error TEXT NOT NULL DEFAULT '',"
    " shape INTEGER NOT NULL DEFAULT 1)",
    # Provider event ids seen, per upstream, until the end of their `dedupe_for`.
    "CREATE TABLE IF NOT EXISTS webhook_ids ("
    " upstream TEXT NOT NULL, event_id TEXT NOT NULL, entry TEXT NOT NULL, until REAL NOT NULL,"
    " PRIMARY KEY (upstream, event_id))",
)
#: The conditions of the webhook table's partial indexes. SQLite uses a partial index only
#: for a query whose WHERE carries the very same term, so proxy/webhooks/sqlite_store.py
#: puts these strings in its queries.
WEBHOOK_OPEN = "state IN ('queued', 'claimed', 'dead')"
WEBHOOK_DONE = "state IN ('delivered', 'dropped', 'dead')"
# Created once the tables are known to have the columns they index.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS records_expires ON records (expires)",
    "CREATE INDEX IF NOT EXISTS ledger_expires ON ledger (expires)",
    "CREATE INDEX IF NOT EXISTS outbox_due ON outbox (upstream, state, due)",
    # The worker's maintenance (every 2 s) must not scan the bodies: counts and the oldest
    # entry per state, entries past max_age, entries held by a process.
    "CREATE INDEX IF NOT EXISTS outbox_created ON outbox (upstream, state, created)",
    "CREATE INDEX IF NOT EXISTS outbox_expires ON outbox (state, expires)",
    "CREATE INDEX IF NOT EXISTS outbox_owner ON outbox (owner) WHERE owner != ''",
    "CREATE INDEX IF NOT EXISTS webhook_events_due ON webhook_events (upstream, state, due)",
    # Likewise for the webhook worker's: delivered entries stay a day (KEEP_DONE), a
    # million rows at 12 events/s, and a scan of them every 2 s stalls the listener.
    # Partial, so that the day of delivered entries stays out of the first and a pending
    # entry out of the second (each write updates fewer pages): counts and the oldest of
    # the pending and dead entries, entries held by a process ...
    f"CREATE INDEX IF NOT EXISTS webhook_events_open ON webhook_events (state, upstream, received)"
    f" WHERE {WEBHOOK_OPEN}",
    # ... and finished entries past their keep time.
    f"CREATE INDEX IF NOT EXISTS webhook_events_done ON webhook_events (state, updated) WHERE {WEBHOOK_DONE}",
    "CREATE INDEX IF NOT EXISTS webhook_ids_until ON webhook_ids (until)",
)

_COLUMNS: dict[str, frozenset[str]] = {
    "meta": frozenset({"name", "value"}),
    "records": frozenset(
        {"key", "state", "fingerprint", "owner", "instance", "lock_until", "expires", "response", "shape"}
    ),
    "ledger": frozenset({"key", "value", "expires", "shape"}),
    "instances": frozenset({"id", "pid", "host", "started", "seen"}),
    "outbox": frozenset(
        {
            "id",
            "upstream",
            "state",
            "due",
            "created",
            "expires",
            "updated",
            "attempts",
            "owner",
            "method",
            "path",
            "query",
            "headers",
            "body",
            "sent_to",
            "provider_id",
            "delivered_via",
            "last_error",
            "shape",
        }
    ),
    "webhook_events": frozenset(
        {
            "id",
            "upstream",
            "state",
            "due",
            "received",
            "expires",
            "updated",
            "attempts",
            "owner",
            "event_ids",
            "types",
            "headers",
            "body",
            "done",
            "last_error",
            "shape",
        }
    ),
    "webhook_ids": frozenset({"upstream", "event_id", "entry", "until"}),
}


def _busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SchemaError(sqlite3.DatabaseError):
    """The database was written by an incompatible egressd (a column this version needs is missing)."""


@dataclass(slots=True)
class _Row:
    state: str
    fingerprint: str
    owner: str
    instance: str
    lock_until: float
    expires: float
    response: StoredResponse | None


def open_database(path: Path, *, lock_timeout: float = LOCK_TIMEOUT) -> sqlite3.Connection:
    """Open (create) the database at `path`, in WAL mode, with the current schema.

    Raises `sqlite3.Error` (a corrupt file, a lock held longer than `lock_timeout`, an
    incompatible schema) or `OSError`; the caller names the path in its message.

    Switching a new database to WAL answers "locked" at once (SQLite calls no busy handler
    there) when another process is creating it at the same moment: the whole set-up is
    tried again until `lock_timeout` has passed."""
    deadline = time.monotonic() + lock_timeout
    delay = 0.005
    while True:
        try:
            return _setup(path, max(deadline - time.monotonic(), 0.05))
        except sqlite3.OperationalError as exc:
            if not _busy(exc) or time.monotonic() + delay >= deadline:
                raise
        time.sleep(delay)  # start-up only: nothing else runs yet
        delay = min(delay * 2, 0.1)


def _setup(path: Path, lock_timeout: float) -> sqlite3.Connection:
    old_umask = os.umask(0o077)  # the database and its -wal/-shm files: owner only
    try:
        db = sqlite3.connect(str(path), timeout=lock_timeout, isolation_level=None)
    finally:
        os.umask(old_umask)
    try:
        db.execute(f"PRAGMA busy_timeout = {int(lock_timeout * 1000)}")
        mode = db.execute("PRAGMA journal_mode").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode is {mode[0] if mode else '?'})")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            # Versions 1 -> 2 -> 3 only added tables (created above): the database is version 3 now.
            db.execute(
                "UPDATE meta SET value = ? WHERE name = 'schema_version' AND value IN ('1', '2')",
                (str(SCHEMA_VERSION),),
            )
            row = db.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
            for table, needed in _COLUMNS.items():
                have = {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}
                missing = needed - have
                if missing:
                    raise SchemaError(f"table {table} lacks column(s) {', '.join(sorted(missing))}")
            for statement in _INDEXES:
                db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        try:
            version = int(row[0]) if row is not None else SCHEMA_VERSION
        except (TypeError, ValueError):
            version = -1
        if version != SCHEMA_VERSION:
            log.warning(
                "data dir database written by another egressd version; rows it cannot read are ignored",
                extra={"path": str(path), "schema_version": version, "expected": SCHEMA_VERSION},
            )
    except BaseException:
        db.close()
        raise
    return db


class SQLiteState(MemoryState):
    """Implements `proxy.state.base.StateBackend`: records and ledger in SQLite (see module
    doc), the rest in memory. `path` is the data dir; it must exist."""

    name = "sqlite"

    def __init__(
        self,
        data_dir: Path,
        clock: Clock | None = None,
        *,
        max_records: int = 100_000,
        lock_timeout: float = LOCK_TIMEOUT,
        dead_after: float = DEAD_AFTER,
        heartbeat_every: float = HEARTBEAT_EVERY,
    ) -> None:
        super().__init__(clock, max_records=max_records)
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        self.dead_after = dead_after
        self.heartbeat_every = heartbeat_every
        self.instance_id = secrets.token_hex(8)
        self.host = socket.gethostname()
        self.errors = 0
        self.purged = 0
        self._last_log = -1e18
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.lock_timeout = lock_timeout
        self._db = open_database(self.path, lock_timeout=lock_timeout)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(min(BUSY_WAIT, lock_timeout) * 1000)}")
            now = self.clock.wall()
            self._db.execute(
                "INSERT OR REPLACE INTO instances (id, pid, host, started, seen) VALUES (?, ?, ?, ?, ?)",
                (self.instance_id, os.getpid(), self.host, now, now),
            )
        except BaseException:
            self._db.close()
            raise
        _LOCAL_INSTANCES.add(self.instance_id)
        # WAL checkpoints (copying the log into the database file, with an fsync) run in a
        # worker thread on a connection of their own, once a second, instead of inside a
        # write on the loop when the log passes 1,000 pages (that put ~7 ms into the p99
        # of keyed calls). The automatic checkpoint stays as a bound while no task runs.
        self._checkpointer: sqlite3.Connection | None = None
        self._checkpoint_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the heartbeat / purge task (needs a running loop; a no-op otherwise, and it
        then starts with the first claim)."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._task = loop.create_task(self._background(), name="egressd-sqlite-heartbeat")
        with contextlib.suppress(sqlite3.Error):
            self._db.execute(f"PRAGMA wal_autocheckpoint = {BACKGROUND_AUTOCHECKPOINT}")

    async def _background(self) -> None:
        while True:
            # Real time, not the injected clock: a fake clock must not be driven by this loop.
            await asyncio.sleep(self.heartbeat_every)
            try:
                self.heartbeat()
                self.purge()
            except sqlite3.Error as exc:
                self._failed("heartbeat", exc)
            try:
                await asyncio.to_thread(self.checkpoint)
            except sqlite3.Error as exc:
                self._failed("checkpoint", exc)

    def checkpoint(self) -> None:
        """A PASSIVE checkpoint (never waits for readers or writers), on a connection of
        its own: meant for a worker thread, one at a time."""
        with self._checkpoint_lock:
            if self._closed:
                return
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    str(self.path), timeout=BUSY_WAIT, isolation_level=None, check_same_thread=False
                )
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def heartbeat(self) -> None:
        """Mark this instance alive now."""
        now = self.clock.wall()
        self._db.execute(
            "INSERT OR REPLACE INTO instances (id, pid, host, started, seen) VALUES (?, ?, ?,"
            " COALESCE((SELECT started FROM instances WHERE id = ?), ?), ?)",
            (self.instance_id, os.getpid(), self.host, self.instance_id, now, now),
        )

    def purge(self) -> int:
        """Delete expired rows, `PURGE_BATCH` per transaction, at most `PURGE_BATCHES`
        batches per table; returns how many rows went."""
        now = self.clock.wall()
        gone = 0
        for table in ("records", "ledger"):
            for _ in range(PURGE_BATCHES):
                cursor = self._db.execute(
                    f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE expires <= ? LIMIT ?)",
                    (now, PURGE_BATCH),
                )
                gone += max(cursor.rowcount, 0)
                if cursor.rowcount < PURGE_BATCH:
                    break
        self._db.execute(
            "DELETE FROM instances WHERE seen < ? AND id != ?", (now - FORGET_INSTANCES_AFTER, self.instance_id)
        )
        self.purged += gone
        return gone

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _LOCAL_INSTANCES.discard(self.instance_id)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
        self._db.close()
        await super().close()

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors += 1
        now = self.clock.now()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.error(
                "data dir store error",
                extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}", "path": str(self.path)},
            )

    # -- records ---------------------------------------------------------------------------
    def _read(self, key: str, now: float) -> _Row | None:
        """The live record of `key`, or None (missing, expired, or unreadable)."""
        row = self._db.execute(
            "SELECT state, fingerprint, owner, instance, lock_until, expires, response, shape"
            " FROM records WHERE key = ?",
            (key,),
        ).fetchone()
        if row is None:
            return None
        state, fingerprint, owner, instance, lock_until, expires, blob, shape = row
        try:
            if shape != ROW_SHAPE or state not in _STATES or float(expires) <= now:
                return None
            response = None
            if state == "completed":
                response = decode_response(bytes(blob))
            return _Row(
                str(state), str(fingerprint), str(owner), str(instance), float(lock_until), float(expires), response
            )
        except Exception:  # a row this version cannot read is absent (never a crash)
            return None

    def _alive(self, instance: str, now: float) -> bool:
        """Is the process that owns an in-flight record still there?

        Another instance of this process: yes. On this host, a pid that no longer exists
        (or is this very process: a restarted container) is dead at once; otherwise the
        instance is alive while its heartbeat (`seen`) is younger than `dead_after`."""
        if not instance or instance in _LOCAL_INSTANCES:
            return True  # (no instance: not tied to a process, only its lock decides)
        row = self._db.execute("SELECT pid, host, seen FROM instances WHERE id = ?", (instance,)).fetchone()
        if row is None:
            return False
        try:
            pid, host, seen = int(row[0]), str(row[1]), float(row[2])
        except (TypeError, ValueError):
            return False
        if host == self.host:
            if pid == os.getpid():
                return False  # an earlier process with this pid (a container restarted)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except OSError:
                pass  # exists (EPERM: another user's process)
        return seen > now - self.dead_after

    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
    ) -> IdempotencyClaim:
        """See `StateBackend.idem_claim`; one `BEGIN IMMEDIATE` transaction. A store that
        cannot be written (locked past `busy_timeout`, disk full, I/O error) raises
        `RecordsUnavailable`: nothing was claimed."""
        if self._task is None:
            self.start()
        try:
            if lock_ttl > 0:
                # The common case, a key never seen: one INSERT (its own transaction) that
                # does nothing when any row is there; then the whole rule set below.
                now = self.clock.wall()
                inserted = self._db.execute(
                    "INSERT INTO records"
                    " (key, state, fingerprint, owner, instance, lock_until, expires, response, shape)"
                    " VALUES (?, 'in_flight', ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT(key) DO NOTHING",
                    (
                        key,
                        fingerprint,
                        owner,
                        self.instance_id,
                        now + lock_ttl,
                        now + lock_ttl + max(ttl, 0.0),
                        ROW_SHAPE,
                    ),
                ).rowcount
                if inserted == 1:
                    return IdempotencyClaim("new")
            return self._claim(key, fingerprint, max(ttl, 0.0), lock_ttl, owner, dedupes)
        except sqlite3.Error as exc:
            self._failed("idem_claim", exc)
            raise RecordsUnavailable(f"data dir store: {exc}") from None

    def _claim(
        self, key: str, fingerprint: str, ttl: float, lock_ttl: float, owner: str, dedupes: bool
    ) -> IdempotencyClaim:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self.clock.wall()
            current = self._read(key, now)
            if current is not None:
                if current.fingerprint != fingerprint:
                    db.execute("COMMIT")
                    return IdempotencyClaim("mismatch")
                if current.state == "completed":
                    db.execute("COMMIT")
                    return IdempotencyClaim("completed", current.response)
                if current.state == "in_flight":
                    if owner and current.owner == owner:
                        # The owner claims again (its first reply was lost): still its
                        # claim, lock renewed, the record's life never shortened.
                        if lock_ttl > 0:
                            db.execute(
                                "UPDATE records SET lock_until = ?, expires = ?, instance = ? WHERE key = ?",
                                (now + lock_ttl, max(current.expires, now + lock_ttl + ttl), self.instance_id, key),
                            )
                        db.execute("COMMIT")
                        return IdempotencyClaim("new")
                    if current.lock_until > now and self._alive(current.instance, now):
                        db.execute("COMMIT")
                        return IdempotencyClaim("in_flight")
                    # The lock lapsed, or its process died, without an outcome: in doubt
                    # for the rest of the record's life.
                    db.execute(
                        "UPDATE records SET state = 'in_doubt', owner = '', instance = '', lock_until = 0"
                        " WHERE key = ?",
                        (key,),
                    )
                if not dedupes:
                    db.execute("COMMIT")
                    return IdempotencyClaim("in_doubt")
            # Missing, expired, unreadable, or in doubt and taken over (dedupes).
            if lock_ttl > 0:
                db.execute(
                    "INSERT OR REPLACE INTO records"
                    " (key, state, fingerprint, owner, instance, lock_until, expires, response, shape)"
                    " VALUES (?, 'in_flight', ?, ?, ?, ?, ?, NULL, ?)",
                    (key, fingerprint, owner, self.instance_id, now + lock_ttl, now + lock_ttl + ttl, ROW_SHAPE),
                )
            else:
                db.execute("DELETE FROM records WHERE key = ?", (key,))
            db.execute("COMMIT")
            return IdempotencyClaim("new")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    async def idem_complete(
        self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
    ) -> None:
        """See `StateBackend.idem_complete` (the rules of `MemoryRecords.idem_complete`).
        A locked store is tried again for up to `lock_timeout` seconds; a store that
        still cannot be written logs an error (the answer is then not kept)."""
        blob = encode_response(response)
        await self._write("idem_complete", lambda: self._complete(key, blob, ttl, fingerprint))

    def _complete(self, key: str, blob: bytes, ttl: float, fingerprint: str) -> None:
        db = self._db
        now = self.clock.wall()
        if ttl > 0:
            # The common case, the owner completing its live record: one UPDATE (its own
            # transaction) under exactly the conditions the full path checks below.
            updated = db.execute(
                "UPDATE records SET state = 'completed', owner = '', instance = '', lock_until = 0,"
                " expires = ?, response = ? WHERE key = ? AND shape = ? AND expires > ?"
                " AND state IN ('in_flight', 'in_doubt') AND (? = '' OR fingerprint = ?)",
                (now + ttl, blob, key, ROW_SHAPE, now, fingerprint, fingerprint),
            ).rowcount
            if updated == 1:
                return
        db.execute("BEGIN IMMEDIATE")
        try:
            now = self.clock.wall()
            current = self._read(key, now)
            if current is not None:
                if current.state == "completed" or (fingerprint and current.fingerprint != fingerprint):
                    db.execute("COMMIT")
                    return
                fingerprint = current.fingerprint
            elif not fingerprint:
                db.execute("COMMIT")
                return
            if ttl > 0:
                db.execute(
                    "INSERT OR REPLACE INTO records"
                    " (key, state, fingerprint, owner, instance, lock_until, expires, response, shape)"
                    " VALUES (?, 'completed', ?, '', '', 0, ?, ?, ?)",
                    (key, fingerprint, now + ttl, blob, ROW_SHAPE),
                )
            else:
                db.execute("DELETE FROM records WHERE key = ?", (key,))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    async def idem_release(self, key: str, owner: str = "") -> None:
        """Delete a live in-flight record owned by `owner` ("" matches any owner whose lock
        has not lapsed); one statement, so one transaction."""

        def release() -> None:
            now = self.clock.wall()
            if owner:
                self._db.execute(
                    "DELETE FROM records WHERE key = ? AND state = 'in_flight' AND shape = ? AND expires > ?"
                    " AND owner = ?",
                    (key, ROW_SHAPE, now, owner),
                )
            else:
                self._db.execute(
                    "DELETE FROM records WHERE key = ? AND state = 'in_flight' AND shape = ? AND expires > ?"
                    " AND lock_until > ?",
                    (key, ROW_SHAPE, now, now),
                )

        await self._write("idem_release", release)

    async def _write(self, operation: str, write: Callable[[], None]) -> None:
        """Run `write`; while the database is locked by another process (past the short
        `BUSY_WAIT`), yield to the loop and try again, for up to `lock_timeout` seconds.
        Errors are logged, never raised."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                write()
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() + delay > deadline:
                    self._failed(operation, exc)
                    return
            except sqlite3.Error as exc:
                self._failed(operation, exc)
                return
            await asyncio.sleep(delay)  # real time: another process holds the lock
            delay = min(delay * 2, 0.05)

    # -- for the queues on this database (proxy/outbox, proxy/webhooks) ------------------
    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(db)` inside one `BEGIN IMMEDIATE` transaction (rolled back if it raises)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
            return result
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    async def run_locked(self, operation: str, fn: Callable[[], T], unavailable: type[Exception]) -> T:
        """`fn` on the loop thread; a database locked by another process is tried again
        (yielding) for up to `lock_timeout` seconds. Then, or on any other database error,
        the error is logged (`operation`) and `unavailable` is raised."""
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.002
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() + delay > deadline:
                    self._failed(operation, exc)
                    raise unavailable(f"data dir store: {exc}") from None
            except sqlite3.Error as exc:
                self._failed(operation, exc)
                raise unavailable(f"data dir store: {exc}") from None
            await asyncio.sleep(delay)  # real time: another process holds the lock
            delay = min(delay * 2, 0.05)

    # -- the failover routing ledger -------------------------------------------------------
    async def ledger_get(self, key: str) -> bytes | None:
        try:
            row = self._db.execute(
                "SELECT value FROM ledger WHERE key = ? AND expires > ? AND shape = ?",
                (key, self.clock.wall(), ROW_SHAPE),
            ).fetchone()
        except sqlite3.Error as exc:
            self._failed("ledger_get", exc)
            return None
        if row is None or not isinstance(row[0], bytes):
            return None
        return row[0]

    async def ledger_set(self, key: str, value: bytes, *, ttl: float) -> None:
        """Kept for `ttl` seconds (a locked store is tried again, see `_write`)."""

        def store() -> None:
            if ttl > 0:
                self._db.execute(
                    "INSERT OR REPLACE INTO ledger (key, value, expires, shape) VALUES (?, ?, ?, ?)",
                    (key, bytes(value), self.clock.wall() + ttl, ROW_SHAPE),
                )
            else:
                self._db.execute("DELETE FROM ledger WHERE key = ?", (key,))

        await self._write("ledger_set", store)
