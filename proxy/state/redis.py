"""Shared state in Redis: one budget, one circuit, one ledger for every replica.

`RedisState` implements `proxy.state.base.StateBackend` with redis.asyncio. Every
operation is one Lua script (proxy/state/redis_scripts.py) run with EVALSHA; redis-py's
`register_script` loads it again when the server answers NOSCRIPT (after a restart, a
failover or `SCRIPT FLUSH`). Time comes from the Redis server (`TIME`) unless a clock is
injected (tests), so replicas on different hosts agree.

Key layout (docs/scaling.md): `<prefix>{<scope>}<rest>:<kind>`, where `<scope>` is the
stage's `state_key` (`upstream:kind:fingerprint`); the braces are a Cluster hash tag,
so all keys one script touches live in one slot. Every key carries a TTL. Idempotency
and fingerprint records are `idem` hashes (owner, lock, in flight / in doubt /
completed: see redis_scripts); the failover routing ledger is `ledger` (like `kv`).

URL forms (`--redis`):

* `redis://[:password@]host:port/db`, `rediss://...` (TLS; `?ssl_cert_reqs=none`,
  `ssl_ca_certs=...` as redis-py understands them), `unix:///path/redis.sock`
* `redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`
  (`rediss+sentinel://` for TLS to the Sentinels and the master; `?sentinel_password=`)
* `redis+cluster://[:password@]host:port[,...]` or any `redis://` URL with
  `?cluster=true` (`rediss+cluster://` for TLS)

The `ssl_*` query options (`ssl_ca_certs`, `ssl_cert_reqs`, `ssl_certfile`, `ssl_keyfile`,
`ssl_check_hostname`) apply to every TLS form.

This backend does not survive Redis trouble by itself: `proxy.state.resilient.ResilientState`
wraps it with a time budget and a local fallback (that is what `egressd run` uses).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript

from proxy.clock import Clock
from proxy.state import redis_scripts
from proxy.state.base import (
    SCOPE_SEP,
    CircuitAdmission,
    CircuitSettings,
    CircuitTransition,
    IdempotencyClaim,
    RateDecision,
    StoredResponse,
)

REPLICA_TTL = 15.0  # a replica that sent no heartbeat for this long is not counted
# An in-flight record whose owner's replica sent no heartbeat for this long is in doubt
# (the owner died); replicas beat every 2 s (`ResilientState.heartbeat_interval`), so this
# leaves room for a few missed beats of a busy replica before its calls are judged dead.
OWNER_DEAD_AFTER = 10.0
# How long a pause value read from Redis (by `rate_take`, `pause` or `paused_for`) is
# trusted locally, so that the hot path (paused_for, then rate_take) costs one round trip
# under load; a pause set by another replica is seen at the latest this much later.
PAUSE_FRESH = 0.25

_SSL_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
MAX_CONNECTIONS = 32  # per process (the blocking pool of a single node or Sentinel master)

RedisClient = aioredis.Redis | RedisCluster


def _split_hosts(netloc: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """`user:pass@h1:1,h2:2` -> (user, password, [(h1, 1), (h2, 2)])."""
    user: str | None = None
    password: str | None = None
    creds, at, hosts = netloc.rpartition("@")
    if at:
        u, colon, p = creds.partition(":")
        user = unquote(u) or None
        password = unquote(p) if colon else None
        if not colon:  # "redis://secret@host": redis-py reads that as a password
            user, password = None, unquote(u)
    out: list[tuple[str, int]] = []
    for part in hosts.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            host, port = part, "6379" if "sentinel" not in netloc else "26379"
        out.append((host.strip("[]"), int(port)))
    return user, password, out


def connect(url: str, **options: Any) -> RedisClient:
    """A redis.asyncio client for any URL form in the module docstring (bytes replies)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = dict(parse_qsl(parts.query))
    cluster = query.pop("cluster", "").lower() in ("1", "true", "yes")
    options.setdefault("decode_responses", False)
    base = scheme.split("+", 1)[0]  # redis | rediss
    tls = base == "rediss"
    ssl_options = {name: query.pop(name) for name in _SSL_OPTIONS if name in query}
    if scheme.endswith("+sentinel"):
        user, password, hosts = _split_hosts(parts.netloc)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a Sentinel URL names the service: redis+sentinel://host:26379/mymaster")
        service = path[0]
        db = int(path[1]) if len(path) > 1 else 0
        conn: dict[str, Any] = {"username": user, "password": password, "db": db, **options}
        if tls:
            conn.update(ssl=True, **ssl_options)
        sentinel_kwargs: dict[str, Any] = {"ssl": True, **ssl_options} if tls else {}
        if "sentinel_password" in query:
            sentinel_kwargs["password"] = query.pop("sentinel_password")
        conn.setdefault("max_connections", MAX_CONNECTIONS * 8)
        sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs, **conn)  # type: ignore[no-untyped-call]
        master: aioredis.Redis = sentinel.master_for(service)
        return master
    if scheme.endswith("+cluster") or cluster:
        user, password, hosts = _split_hosts(parts.netloc)
        nodes = [ClusterNode(h, p) for h, p in hosts]
        kwargs: dict[str, Any] = {"username": user, "password": password, **options}
        kwargs.setdefault("max_connections", MAX_CONNECTIONS * 8)  # per node; no blocking pool here
        if tls:
            kwargs.update(ssl=True, **ssl_options)
        return RedisCluster(startup_nodes=nodes, **kwargs)
    query.update(ssl_options)  # redis-py reads these from the URL itself
    plain = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))
    # A blocking pool: a burst of concurrent calls waits briefly for a connection instead
    # of failing with "Too many connections" (the caller's time budget still applies).
    options.setdefault("max_connections", MAX_CONNECTIONS)
    options.setdefault("timeout", options.get("socket_timeout") or 1.0)
    return aioredis.Redis.from_pool(BlockingConnectionPool.from_url(plain, **options))


def encode_response(response: StoredResponse) -> bytes:
    """`[status, headers, stored_at, extras]` as JSON, a newline, then the body bytes.

    `extras` (upstream, age, lifetime) is left out when it holds only defaults, so such a
    record reads the same as one written before the extras existed.
    """
    head: list[object] = [response.status, [list(h) for h in response.headers], response.stored_at]
    extras: dict[str, object] = {}
    if response.upstream:
        extras["upstream"] = response.upstream
    if response.age:
        extras["age"] = response.age
    if response.lifetime is not None:
        extras["lifetime"] = response.lifetime
    if extras:
        head.append(extras)
    return json.dumps(head).encode() + b"\n" + response.body


def decode_response(blob: bytes) -> StoredResponse:
    head, _, body = blob.partition(b"\n")
    fields = json.loads(head)
    status, headers, stored_at = fields[:3]
    extras = fields[3] if len(fields) > 3 and isinstance(fields[3], dict) else {}
    lifetime = extras.get("lifetime")
    return StoredResponse(
        status=int(status),
        headers=tuple((str(k), str(v)) for k, v in headers),
        body=body,
        stored_at=float(stored_at),
        upstream=str(extras.get("upstream") or ""),
        age=float(extras.get("age") or 0.0),
        lifetime=None if lifetime is None else float(lifetime),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisState:
    """Implements `proxy.state.base.StateBackend` in Redis (see module doc)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "egressd:",
        clock: Clock | None = None,
        client: RedisClient | None = None,
        socket_timeout: float = 1.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.replica_id = uuid.uuid4().hex[:12]
        # None: no heartbeat yet; False: never judges others (a bare RedisState in tests);
        # True: heartbeats were sent (see `_owner_dead`).
        self._beating: bool | None = False
        self.client: RedisClient = client or connect(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            health_check_interval=30,
        )
        self._scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(text) for name, text in redis_scripts.ALL.items()
        }
        self._pauses: dict[str, tuple[float, float]] = {}  # key -> (read at, seconds left)
        self._last_error: str | None = None

    # -- plumbing ------------------------------------------------------------------------
    def _now_arg(self) -> str:
        return "" if self.clock is None else repr(self.clock.now())

    def _local_now(self) -> float:
        return time.monotonic() if self.clock is None else self.clock.now()

    def key(self, key: str, kind: str) -> str:
        """`<prefix>{<scope>}<rest>:<kind>`; the scope (hash tag) is the part before `|`."""
        scope, sep, rest = key.rpartition(SCOPE_SEP)
        if not sep:
            scope, rest = key, ""
        return f"{self.prefix}{{{scope}}}{sep}{rest}:{kind}"

    async def _run(self, script: str, keys: Sequence[str], *args: str | bytes | float | int) -> Any:
        try:
            result = await self._scripts[script](keys=list(keys), args=[self._now_arg(), *args])
        except Exception as exc:
            self._last_error = f"{type(exc).__name__}: {exc}"[:200]
            raise
        self._last_error = None
        return result

    def health(self) -> str:
        return "ok" if self._last_error is None else f"degraded: {self._last_error}"

    async def _ping(self) -> bool:
        """PING the server; on a Cluster, every master (redis-py's default is one node, which
        would call the cluster up while the master of a third of the slots is gone)."""
        if isinstance(self.client, RedisCluster):
            return bool(await self.client.ping(target_nodes=RedisCluster.PRIMARIES))
        return bool(await self.client.ping())

    async def ping(self) -> bool:
        ok = await self._ping()
        self._last_error = None
        return ok

    async def warm(self, connections: int = MAX_CONNECTIONS) -> None:
        """Open up to `connections` pooled connections now (per master on a Cluster), so a
        first burst of calls does not pay for connecting (and the handshake) inside its
        time budget. It is also the reconnect probe: it fails while any master is away."""
        await asyncio.gather(*(self._ping_twice() for _ in range(connections)))
        self._last_error = None

    async def _ping_twice(self) -> bool:
        """A pooled connection that the server closed (a Redis restart) fails once; redis-py
        then drops it and connects afresh, so one more PING tells whether Redis is back."""
        try:
            return await self._ping()
        except aioredis.ConnectionError:
            return await self._ping()

    async def heartbeat(self) -> int:
        """Announce this replica; returns how many replicas were seen lately (>= 1)."""
        count = await self._run("heartbeat", [f"{self.prefix}replicas"], self.replica_id, REPLICA_TTL)
        self._beating = True
        return max(int(count), 1)

    def expect_heartbeats(self) -> None:
        """This replica sends heartbeats (`ResilientState` does): it announces itself before
        its first claim and may judge the owners of in-flight records dead."""
        if self._beating is False:
            self._beating = None

    def _owner(self, owner: str) -> str:
        """Owner tokens carry this replica's id, so others can tell when their owner died."""
        return f"{self.replica_id}/{owner}" if owner else ""

    async def _owner_dead(self, owner: str) -> bool:
        """Whether the replica that owns an in-flight record stopped sending heartbeats.

        Only while this replica sends heartbeats itself (every replica run by `egressd run`
        does, through `ResilientState`): a bare `RedisState` never judges others dead."""
        replica, sep, _ = owner.partition("/")
        if self._beating is not True or not sep or replica == self.replica_id:
            return False
        seen = await self.client.zscore(f"{self.prefix}replicas", replica)
        if seen is None:
            return True
        if self.clock is not None:
            now = self.clock.now()
        else:  # heartbeats are stamped with Redis's own TIME
            secs, micros = await self.client.time()
            now = secs + micros / 1e6
        return now - float(seen) > OWNER_DEAD_AFTER

    # -- rate limiting (GCRA) and upstream back-pressure ------------------------------------
    def _remember_pause(self, key: str, left: float) -> None:
        self._pauses[key] = (self._local_now(), left)

    async def rate_take(self, key: str, *, interval: float, burst: int, max_wait: float) -> RateDecision:
        allowed, wait, pause = await self._run(
            "rate_take", [self.key(key, "gcra"), self.key(key, "pause")], repr(interval), burst, repr(max_wait)
        )
        self._remember_pause(key, float(pause))
        return RateDecision(bool(int(allowed)), float(wait))

    async def pause(self, key: str, seconds: float) -> None:
        if seconds <= 0:
            return
        left = await self._run("pause", [self.key(key, "pause")], repr(seconds))
        self._remember_pause(key, float(left))

    async def paused_for(self, key: str) -> float:
        seen = self._pauses.get(key)
        if seen is not None:
            age = self._local_now() - seen[0]
            if 0 <= age < PAUSE_FRESH:
                return max(seen[1] - age, 0.0)
        left = float(await self._run("paused_for", [self.key(key, "pause")]))
        self._remember_pause(key, left)
        if len(self._pauses) > 10_000:  # keys of retired configurations
            self._pauses.clear()
        return left

    # -- retry budget ---------------------------------------------------------------------
    async def budget_record(self, key: str, *, window: float, retry: bool) -> None:
        await self._run("budget_record", [self.key(key, "budget")], repr(window), 1 if retry else 0)

    async def budget_try_retry(self, key: str, *, window: float, ratio: float, min_per_second: float) -> bool:
        allowed = await self._run(
            "budget_try_retry", [self.key(key, "budget")], repr(window), repr(ratio), repr(min_per_second)
        )
        return bool(int(allowed))

    # -- circuit breaker --------------------------------------------------------------------
    @staticmethod
    def _cb_args(s: CircuitSettings) -> list[str | int]:
        return [repr(s.window), s.min_requests, repr(s.failure_rate), repr(s.open_for), s.half_open_requests]

    async def circuit_admit(self, key: str, settings: CircuitSettings) -> CircuitAdmission:
        allowed, state, trial, retry_after = await self._run(
            "circuit_admit", [self.key(key, "cb")], *self._cb_args(settings)
        )
        return CircuitAdmission(bool(int(allowed)), _text(state), bool(int(trial)), float(retry_after))

    async def circuit_record(
        self, key: str, settings: CircuitSettings, *, failure: bool, trial: bool
    ) -> CircuitTransition:
        before, after = await self._run(
            "circuit_record",
            [self.key(key, "cb")],
            *self._cb_args(settings),
            1 if failure else 0,
            1 if trial else 0,
        )
        return CircuitTransition(_text(before), _text(after))

    async def circuit_release(self, key: str, settings: CircuitSettings) -> None:
        await self._run("circuit_release", [self.key(key, "cb")], *self._cb_args(settings))

    async def circuit_state(self, key: str, settings: CircuitSettings) -> str:
        return _text(await self._run("circuit_state", [self.key(key, "cb")], *self._cb_args(settings)))

    # -- idempotency and fingerprint records (see redis_scripts for the record layout) -----
    async def idem_claim(
        self, key: str, fingerprint: str, *, ttl: float, lock_ttl: float, owner: str = "", dedupes: bool = False
    ) -> IdempotencyClaim:
        if owner and self._beating is None:
            # Announce this replica before its first claim: an owner whose replica is not
            # in the heartbeat set at all is then known to have stopped beating (died).
            await self.heartbeat()
        args = (fingerprint, repr(lock_ttl), repr(ttl), self._owner(owner), 1 if dedupes else 0)
        reply = await self._run("idem_claim", [self.key(key, "idem")], *args)
        state = _text(reply[0])
        if state == "in_flight" and len(reply) > 1 and await self._owner_dead(_text(reply[1])):
            # Its owner was killed mid-call (kill -9): in doubt now, not when its lock lapses.
            await self._run("idem_doubt", [self.key(key, "idem")], _text(reply[1]))
            reply = await self._run("idem_claim", [self.key(key, "idem")], *args)
            state = _text(reply[0])
        if state == "completed":
            return IdempotencyClaim(state, decode_response(reply[1]))
        return IdempotencyClaim(state)

    async def idem_complete(
        self, key: str, response: StoredResponse, *, ttl: float, fingerprint: str = "", owner: str = ""
    ) -> None:
        await self._run(
            "idem_complete",
            [self.key(key, "idem")],
            encode_response(response),
            repr(ttl),
            fingerprint,
            self._owner(owner),
        )

    async def idem_release(self, key: str, owner: str = "") -> None:
        await self._run("idem_release", [self.key(key, "idem")], self._owner(owner))

    # -- the failover routing ledger (like kv, under its own key type) -------------------------
    async def ledger_get(self, key: str) -> bytes | None:
        blob = await self._run("value_get", [self.key(key, "ledger")])
        return None if blob is None else bytes(blob)

    async def ledger_set(self, key: str, value: bytes, *, ttl: float) -> None:
        await self._run("value_set", [self.key(key, "ledger")], value, repr(ttl))

    # -- response cache and small shared values ----------------------------------------------
    async def cache_get(self, key: str) -> StoredResponse | None:
        blob = await self._run("value_get", [self.key(key, "cache")])
        return None if blob is None else decode_response(blob)

    async def cache_set(self, key: str, response: StoredResponse, *, ttl: float) -> None:
        await self._run("value_set", [self.key(key, "cache")], encode_response(response), repr(ttl))

    async def kv_get(self, key: str) -> bytes | None:
        blob = await self._run("value_get", [self.key(key, "kv")])
        return None if blob is None else bytes(blob)

    async def kv_set(self, key: str, value: bytes, *, ttl: float) -> None:
        await self._run("value_set", [self.key(key, "kv")], value, repr(ttl))

    async def close(self) -> None:
        await self.client.aclose()
