"""The embedded durable store (`--data-dir`, proxy/state/sqlite.py) with real processes:
records that survive kill -9, in-doubt records of a dead process, one claim deciding
among processes sharing a dir, start-up errors that name the path, and `--data-dir none`.

The protocol rules themselves run against every backend in tests/test_state_records.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.clock import FakeClock
from proxy.state.base import StoredResponse
from proxy.state.factory import DataDirError, open_data_dir, open_state
from proxy.state.memory import MemoryState
from proxy.state.sqlite import DB_NAME, SQLiteState

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]

ANSWER = StoredResponse(
    status=201, headers=(("Content-Type", "application/json"),), body=b'{"id":"ch_1"}', stored_at=1_800_000_000.0
)


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.strip().startswith(expected):
            return line.strip()
    proc.kill()
    _, err = proc.communicate()
    raise AssertionError(f"no {expected!r} from the child; stderr: {err}")


def _kill9(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


# A child that claims (and maybe completes) one record, says so, then waits to be killed.
CHILD = """
import asyncio, sys, time
from pathlib import Path
from proxy.state.base import StoredResponse
from proxy.state.sqlite import SQLiteState

async def main():
    state = SQLiteState(Path(sys.argv[1]))
    state.start()
    claim = await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=300, owner="child")
    assert claim.state == "new", claim
    if sys.argv[2] == "complete":
        answer = StoredResponse(201, (("Content-Type", "application/json"),), b'{"id":"ch_1"}', 1800000000.0)
        await state.idem_complete("up:idem|k:1", answer, ttl=600, fingerprint="fp", owner="child")
        await state.ledger_set("up:ledger|ch_1", b'{"owner":"fallback"}', ttl=600)
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


@pytest.mark.timeout(60)
async def test_completed_record_survives_kill9(tmp_path: Path) -> None:
    child = _python(CHILD, str(tmp_path), "complete")
    _wait_line(child, "ready")
    _kill9(child)
    state = SQLiteState(tmp_path)
    try:
        claim = await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="next")
        assert claim.state == "completed"
        assert claim.response == ANSWER
        assert await state.ledger_get("up:ledger|ch_1") == b'{"owner":"fallback"}'
        assert (await state.idem_claim("up:idem|k:1", "other", ttl=600, lock_ttl=30, owner="n")).state == "mismatch"
    finally:
        await state.close()


@pytest.mark.timeout(60)
async def test_in_flight_record_of_a_killed_process_is_in_doubt_at_once(tmp_path: Path) -> None:
    child = _python(CHILD, str(tmp_path), "claim")
    _wait_line(child, "ready")
    # While the owner lives (its lock runs for 300 s), its record is in flight for others.
    state = SQLiteState(tmp_path)
    try:
        claim = await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="other")
        assert claim.state == "in_flight"
        _kill9(child)
        # Dead now: in doubt at once, long before its lock would lapse.
        assert (await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="other")).state == "in_doubt"
        assert (await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="x")).state == "in_doubt"
        # The upstream deduplicates on the key: the resend takes it over.
        took = await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="x", dedupes=True)
        assert took.state == "new"
        assert (await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="y")).state == "in_flight"
        await state.idem_complete("up:idem|k:1", ANSWER, ttl=600, fingerprint="fp", owner="x")
        assert (await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="y")).state == "completed"
    finally:
        await state.close()


@pytest.mark.timeout(60)
async def test_restarted_process_finds_its_own_dead_records_in_doubt(tmp_path: Path) -> None:
    # A new state in a fresh process after the first one was killed: same as above, but
    # the claimer opens the dir only after the kill (the usual restart).
    child = _python(CHILD, str(tmp_path), "claim")
    _wait_line(child, "ready")
    _kill9(child)
    state = SQLiteState(tmp_path)
    try:
        assert (await state.idem_claim("up:idem|k:1", "fp", ttl=600, lock_ttl=30, owner="r")).state == "in_doubt"
    finally:
        await state.close()


# Each of two processes claims every key 50 times concurrently, with distinct owners.
CONTENDER = """
import asyncio, json, os, random, sys, time
from pathlib import Path
from proxy.state.sqlite import SQLiteState

async def main():
    state = SQLiteState(Path(sys.argv[1]))
    state.start()
    name, go = sys.argv[2], Path(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    wins = {}

    async def one(key, i):
        await asyncio.sleep(random.random() * 0.3)  # spread over 300 ms: both processes at once
        claim = await state.idem_claim(key, "fp", ttl=600, lock_ttl=120, owner=f"{name}-{key}-{i}")
        if claim.state == "new":
            wins[key] = wins.get(key, 0) + 1
        return claim.state

    keys = [f"up:idem|k:{k}" for k in range(20)]
    states = await asyncio.gather(*(one(key, i) for i in range(50) for key in keys))
    print("done " + json.dumps({"wins": wins, "states": sorted(set(states))}), flush=True)
    sys.stdin.read()  # stay alive (and heartbeating) until the parent has both answers
    await state.close()

asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_one_claim_decides_among_processes_sharing_a_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    go = tmp_path / "go"
    procs = [_python(CONTENDER, str(data), name, str(go)) for name in ("a", "b")]
    try:
        for proc in procs:
            _wait_line(proc, "ready")
        go.touch()
        results = [json.loads(_wait_line(proc, "done", timeout=60)[5:]) for proc in procs]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
            assert proc.wait(timeout=20) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
    total: dict[str, int] = {}
    # The race happened: claims were won and claims met another's record in flight. (Which
    # process wins which keys is up to the scheduler: on a loaded machine one process may
    # start its 300 ms late and win none, which is still one claim per key.)
    assert {"new", "in_flight"} <= {state for result in results for state in result["states"]}
    assert all("in_flight" in result["states"] or result["wins"] for result in results)
    for result in results:
        for key, wins in result["wins"].items():
            total[key] = total.get(key, 0) + wins
    assert total == {f"up:idem|k:{k}": 1 for k in range(20)}


async def test_two_states_in_one_dir_share_records(tmp_path: Path) -> None:
    clock = FakeClock(auto=False)
    one, two = SQLiteState(tmp_path, clock), SQLiteState(tmp_path, clock)
    try:
        assert (await one.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="a")).state == "new"
        # another instance in this same process is alive by definition, heartbeat or not
        clock.advance(9)
        assert (await two.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
        await one.idem_complete("s|k", ANSWER, ttl=60, owner="a")
        assert (await two.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "completed"
        await two.ledger_set("l", b"v", ttl=10)
        assert await one.ledger_get("l") == b"v"
        # kv (OAuth tokens) never goes to disk: it is per process
        await one.kv_set("token", b"secret", ttl=10)
        assert await two.kv_get("token") is None
    finally:
        await one.close()
        await two.close()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"meta", "records", "ledger", "instances", "outbox", "webhook_events", "webhook_ids"}


async def test_stale_heartbeat_of_a_live_pid_makes_it_dead(tmp_path: Path) -> None:
    clock = FakeClock(auto=False)
    state = SQLiteState(tmp_path, clock)
    try:
        await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=100, owner="a")
        # pretend the record belongs to a process on another host that stopped beating
        with sqlite3.connect(tmp_path / DB_NAME) as db:
            db.execute("UPDATE records SET instance = 'remote'")
            db.execute(
                "INSERT INTO instances (id, pid, host, started, seen) VALUES ('remote', 1, 'elsewhere', ?, ?)",
                (clock.wall(), clock.wall()),
            )
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
        clock.advance(4)
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_flight"
        clock.advance(2)  # not seen for 6 s
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "in_doubt"
    finally:
        await state.close()


async def test_unreadable_rows_are_absent(tmp_path: Path) -> None:
    clock = FakeClock(auto=False)
    state = SQLiteState(tmp_path, clock)
    try:
        await state.idem_claim("s|blob", "fp", ttl=60, lock_ttl=10, owner="a")
        await state.idem_complete("s|blob", ANSWER, ttl=60, owner="a")
        await state.idem_claim("s|shape", "fp", ttl=60, lock_ttl=10, owner="a")
        await state.idem_claim("s|state", "fp", ttl=60, lock_ttl=10, owner="a")
        await state.ledger_set("l", b"v", ttl=60)
        with sqlite3.connect(tmp_path / DB_NAME) as db:
            db.execute("UPDATE records SET response = x'00ff' WHERE key = 's|blob'")
            db.execute("UPDATE records SET shape = 99 WHERE key = 's|shape'")
            db.execute("UPDATE records SET state = 'from_the_future' WHERE key = 's|state'")
            db.execute("UPDATE ledger SET shape = 2")
        for key in ("s|blob", "s|shape", "s|state"):
            assert (await state.idem_claim(key, "fp", ttl=60, lock_ttl=10, owner="b")).state == "new", key
        assert await state.ledger_get("l") is None
        # a completion of a vanished record is stored over an unreadable one
        with sqlite3.connect(tmp_path / DB_NAME) as db:
            db.execute("UPDATE records SET shape = 0 WHERE key = 's|blob'")
        await state.idem_complete("s|blob", ANSWER, ttl=60, fingerprint="fp")
        assert (await state.idem_claim("s|blob", "fp", ttl=60, lock_ttl=10, owner="c")).state == "completed"
    finally:
        await state.close()


async def test_purge_deletes_expired_rows(tmp_path: Path) -> None:
    clock = FakeClock(auto=False)
    state = SQLiteState(tmp_path, clock)
    try:
        for i in range(1200):
            await state.idem_complete(f"s|{i}", ANSWER, ttl=10 if i % 2 else 1000, fingerprint="fp")
        await state.ledger_set("gone", b"x", ttl=5)
        await state.ledger_set("kept", b"x", ttl=500)
        clock.advance(11)
        assert state.purge() == 601
        with sqlite3.connect(tmp_path / DB_NAME) as db:
            assert db.execute("SELECT COUNT(*) FROM records").fetchone()[0] == 600
            assert db.execute("SELECT key FROM ledger").fetchall() == [("kept",)]
    finally:
        await state.close()


async def test_background_task_beats_and_stops(tmp_path: Path) -> None:
    state = SQLiteState(tmp_path, heartbeat_every=0.05)
    state.start()
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        (first,) = db.execute("SELECT seen FROM instances WHERE id = ?", (state.instance_id,)).fetchone()
        await asyncio.sleep(0.3)
        (later,) = db.execute("SELECT seen FROM instances WHERE id = ?", (state.instance_id,)).fetchone()
        assert later > first
        await state.close()
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


async def test_locked_store_at_run_time(tmp_path: Path) -> None:
    from proxy.state.base import RecordsUnavailable

    state = SQLiteState(tmp_path, lock_timeout=2.0)
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(RecordsUnavailable):
            await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="a")
        assert time.monotonic() - started < 1.0  # the loop is blocked for BUSY_WAIT at most
        # a completion waits (without blocking the loop) until the lock is given back
        loop = asyncio.get_running_loop()
        loop.call_later(0.4, holder.execute, "COMMIT")
        await state.idem_complete("s|k", ANSWER, ttl=60, fingerprint="fp")
        assert (await state.idem_claim("s|k", "fp", ttl=60, lock_ttl=10, owner="b")).state == "completed"
        assert state.errors == 1  # the refused claim
    finally:
        holder.close()
        await state.close()


# -- start-up errors ------------------------------------------------------------------------------


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(DataDirError) as err:
        open_data_dir(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataDirError) as err:
        open_data_dir(path / "below")
    assert str(path / "below") in str(err.value)


def test_corrupt_database(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(os.urandom(8192))
    with pytest.raises(DataDirError) as err:
        open_data_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "\n" not in message
    assert "not a database" in message


def test_incompatible_database(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / DB_NAME) as db:
        db.execute("CREATE TABLE records (key TEXT PRIMARY KEY, value BLOB)")
    with pytest.raises(DataDirError) as err:
        open_data_dir(tmp_path)
    assert "records lacks column" in str(err.value)


def test_database_locked_by_another_process(tmp_path: Path) -> None:
    open_data_dir(tmp_path)._db.close()  # created, WAL
    holder = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(DataDirError) as err:
            open_data_dir(tmp_path, lock_timeout=0.3)
        assert time.monotonic() - started < 5
        assert "locked" in str(err.value) and str(tmp_path) in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


async def test_open_state_picks_the_backend(tmp_path: Path) -> None:
    from proxy.events import EventBus

    memory = open_state(data_dir=None, redis_url=None, redis_prefix="x:", events=EventBus())
    assert type(memory) is MemoryState
    durable = open_state(data_dir=tmp_path / "new" / "dir", redis_url=None, redis_prefix="x:", events=EventBus())
    try:
        assert isinstance(durable, SQLiteState)
        assert (tmp_path / "new" / "dir" / DB_NAME).exists()
    finally:
        await durable.close()


async def test_open_state_with_redis_uses_the_data_dir_as_fallback(tmp_path: Path) -> None:
    from proxy.events import EventBus
    from proxy.state.resilient import ResilientState

    state = open_state(data_dir=tmp_path, redis_url="redis://127.0.0.1:9/0", redis_prefix="x:", events=EventBus())
    try:
        assert isinstance(state, ResilientState)
        assert isinstance(state.fallback, SQLiteState) and state.local is state.fallback
    finally:
        await state.close()


# -- the command line ----------------------------------------------------------------------------


def _egressd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSD_")}
    env["EGRESSD_LOG_FORMAT"] = "text"
    return subprocess.run(
        [*RUN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["file", "corrupt"])
def test_run_with_a_bad_data_dir_exits_1_with_one_line(tmp_path: Path, bad: str) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("upstream: alpha\ntarget: http://127.0.0.1:9\n")
    if bad == "file":
        data = tmp_path / "not-a-dir"
        data.write_text("x")
    else:
        data = tmp_path / "data"
        data.mkdir()
        (data / DB_NAME).write_bytes(b"garbage" * 1000)
    result = _egressd("--policies", str(policies), "--data-dir", str(data))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if str(data) in line]
    assert len(lines) == 1, result.stderr


@pytest.mark.timeout(60)
def test_run_with_data_dir_none_warns(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "a.yaml").write_text("upstream: alpha\ntarget: http://127.0.0.1:9\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EGRESSD_")}
    env["EGRESSD_LOG_FORMAT"] = "json"
    env["EGRESSD_DATA_DIR"] = "None"
    proc = subprocess.Popen(
        [*RUN, "--policies", str(policies), "--drain", "1"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,  # a default ./egressd-data would be created here
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "main listening on" in line:
                break
        warnings = [json.loads(line) for line in lines if "--data-dir none" in line]
        assert len(warnings) == 1, lines
        assert warnings[0]["level"] in ("warning", "WARNING")
        assert re.search(r"kept in memory only and are lost on restart", warnings[0]["msg"])
    finally:
        proc.terminate()  # (the warning is all this test is about)
        if proc.wait(timeout=10) is None:
            proc.kill()
        assert proc.stderr is not None
        proc.stderr.close()
    assert not (tmp_path / "egressd-data").exists()


def test_a_new_data_dir_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """Recorded answers can carry secrets (a PaymentIntent's client_secret)."""
    import stat

    from proxy.state.factory import open_data_dir

    data = tmp_path / "new"
    state = open_data_dir(data)
    try:
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for f in data.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        asyncio.run(state.close())
