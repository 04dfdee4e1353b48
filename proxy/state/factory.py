"""Which state backend `egressd run` uses: memory, the data dir (SQLite), Redis, or Redis
with the data dir as its local fallback.

* no data dir, no Redis: `MemoryState` (everything is lost on restart);
* a data dir: `SQLiteState` on it (records and the routing ledger survive restarts);
* Redis: `ResilientState(RedisState, fallback)` as built by
  `proxy.state.resilient.open_shared_state`; with a data dir the fallback (what a replica
  keeps on its own while Redis is away, and its write-back copies) is the `SQLiteState`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from proxy.events import EventBus
from proxy.state.base import StateBackend
from proxy.state.memory import MemoryState
from proxy.state.sqlite import DB_NAME, LOCK_TIMEOUT, SQLiteState


class DataDirError(Exception):
    """The data dir cannot be used; the message is one line naming the path."""


def open_data_dir(data_dir: Path, *, lock_timeout: float = LOCK_TIMEOUT) -> SQLiteState:
    """`SQLiteState` on `data_dir` (created if missing), or `DataDirError` (a path that is
    not a directory or cannot be created or written, a corrupt or incompatible database,
    a database another process keeps locked for longer than `lock_timeout` seconds)."""
    path = Path(data_dir)
    if path.exists() and not path.is_dir():
        raise DataDirError(f"data dir {path}: not a directory")
    try:
        # Recorded answers may carry secrets (a PaymentIntent's client_secret): a data dir
        # egressd creates is readable by its own user only.
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"data dir {path}: cannot create it: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise DataDirError(f"data dir {path}: not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"data dir {path}: not writable")
    db = DB_NAME
    try:
        state = SQLiteState(path, lock_timeout=lock_timeout)
        for suffix in ("", "-wal", "-shm"):  # owner only, whatever umask created them
            db_file = path / (db + suffix)
            if db_file.exists():
                with contextlib.suppress(OSError):  # another user's file in a shared dir
                    db_file.chmod(0o600)
        return state
    except sqlite3.DatabaseError as exc:
        text = str(exc)
        if "locked" in text or "busy" in text:
            raise DataDirError(f"data dir {path}: {db} is locked by another process ({text})") from None
        raise DataDirError(f"data dir {path}: {db} cannot be opened ({text}); move it away to start afresh") from None
    except sqlite3.Error as exc:
        raise DataDirError(f"data dir {path}: {db} cannot be opened ({exc})") from None
    except OSError as exc:
        raise DataDirError(f"data dir {path}: {exc.strerror or exc}") from None


def open_state(*, data_dir: Path | None, redis_url: str | None, redis_prefix: str, events: EventBus) -> StateBackend:
    """The state backend for `egressd run` (see module doc); raises `DataDirError`."""
    local: MemoryState | None = None
    if data_dir is not None:
        durable = open_data_dir(data_dir)
        # With a running loop the heartbeat starts now; otherwise with the first claim.
        durable.start()
        local = durable
    if not redis_url:
        return local if local is not None else MemoryState()
    from proxy.state.resilient import open_shared_state

    # The data dir (when given) is what a replica keeps on its own while Redis is away.
    return open_shared_state(redis_url, prefix=redis_prefix, events=events, fallback=local)
