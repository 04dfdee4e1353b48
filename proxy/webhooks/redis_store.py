"""Webhook events in Redis (`--redis`): every replica stores and delivers from one queue, so
an event stored by a replica that dies is delivered by another.

Key layout, one Cluster hash tag per upstream so that each script touches one slot:

* `<prefix>{wh:<upstream>}:e:<entry id>`: HASH, the entry's fields (proxy/webhooks/store.py);
* `<prefix>{wh:<upstream>}:due`: ZSET of pending entries by when they are due; a claimed
  entry's score is the end of its lease (`LEASE`), so it is claimable again if its
  replica goes away without finishing it;
* `<prefix>{wh:<upstream>}:pending`: ZSET of pending entries by receipt time (the oldest
  for `/status`);
* `<prefix>{wh:<upstream>}:dead`: ZSET of dead entries by when they died;
* `<prefix>{wh:<upstream>}:id:<event id>`: the provider event ids seen, with a TTL of
  `dedupe_for`.

Each transition is one Lua script (`add` checks and records the ids and queues the entry
together), so two replicas never both store one event id. A replica that stopped sending
heartbeats (the `replicas` ZSET `RedisState` keeps) for `OWNER_DEAD_AFTER` seconds is
dead: `recover` puts its claimed entries back in the queue at once instead of at the end
of their lease.
"""

from __future__ import annotations

from typing import Any

from redis.commands.core import AsyncScript

from proxy.state.redis import OWNER_DEAD_AFTER, RedisClient
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

ADD = """
local n = tonumber(ARGV[5])
local ids_at = 6 + 2 * n
local seen = {}
for i = 4, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    table.insert(seen, ARGV[ids_at + i - 4])
  end
end
if #seen > 0 then
  return seen
end
local ttl = tonumber(ARGV[1])
for i = 4, #KEYS do
  redis.call('SET', KEYS[i], ARGV[2], 'PX', ttl)
end
local fields = {}
for i = 6, 5 + 2 * n do
  table.insert(fields, ARGV[i])
end
redis.call('HSET', KEYS[3], unpack(fields))
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2])
return seen
"""

CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local key = ARGV[5] .. id
  local state = redis.call('HGET', key, 'state')
  if state == 'queued' or state == 'claimed' then
    redis.call('HSET', key, 'state', 'claimed', 'owner', ARGV[4], 'updated', ARGV[1], 'due', ARGV[2])
    redis.call('ZADD', KEYS[1], ARGV[2], id)
    table.insert(out, {id, redis.call('HGETALL', key)})
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
"""

FINISH = """
if redis.call('HGET', KEYS[4], 'owner') ~= ARGV[2] then
  return 0
end
local state = ARGV[3]
local owner = ''
if state == 'claimed' then
  owner = ARGV[2]
end
redis.call('HSET', KEYS[4], 'state', state, 'due', ARGV[4], 'updated', ARGV[5], 'attempts', ARGV[6],
  'done', ARGV[7], 'last_error', ARGV[8], 'owner', owner)
if state == 'queued' or state == 'claimed' then
  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
  return 1
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if state == 'dead' then
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  redis.call('PEXPIRE', KEYS[4], ARGV[10])
else
  redis.call('HDEL', KEYS[4], 'body')
  redis.call('PEXPIRE', KEYS[4], ARGV[9])
end
return 1
"""

REQUEUE = """
if redis.call('HGET', KEYS[2], 'state') ~= 'claimed' or redis.call('HGET', KEYS[2], 'owner') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[2], 'state', 'queued', 'owner', '', 'due', ARGV[3], 'updated', ARGV[3],
  'last_error', 'the replica delivering it died')
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

_FIELDS = (
    "upstream",
    "state",
    "due",
    "received",
    "expires",
    "dedupe_until",
    "updated",
    "attempts",
    "owner",
    "event_ids",
    "types",
    "headers",
    "body",
    "done",
    "last_error",
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _from_hash(entry_id: str, flat: list[Any]) -> WebhookEntry:
    data = {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}
    body = data.get("body", b"")
    return WebhookEntry(
        id=entry_id,
        upstream=_text(data["upstream"]),
        event_ids=decode_list(_text(data["event_ids"])),
        types=decode_list(_text(data.get("types", b"[]"))),
        headers=decode_headers(_text(data["headers"])),
        body=bytes(body) if isinstance(body, bytes | bytearray) else _text(body).encode(),
        received=float(_text(data["received"])),
        expires=float(_text(data["expires"])),
        dedupe_until=float(_text(data.get("dedupe_until", b"0"))),
        state=_text(data["state"]),
        due=float(_text(data.get("due", b"0"))),
        attempts=int(_text(data.get("attempts", b"0"))),
        owner=_text(data.get("owner", b"")),
        done=decode_list(_text(data.get("done", b"[]"))),
        last_error=_text(data.get("last_error", b"")),
        updated=float(_text(data.get("updated", b"0"))),
    )


class RedisWebhookStore:
    name = "redis"

    def __init__(self, client: RedisClient, *, prefix: str, instance: str) -> None:
        self.client = client
        self.prefix = prefix
        self.instance = instance
        self._upstreams: set[str] = set()
        self._add: AsyncScript = client.register_script(ADD)
        self._claim: AsyncScript = client.register_script(CLAIM)
        self._finish: AsyncScript = client.register_script(FINISH)
        self._requeue: AsyncScript = client.register_script(REQUEUE)

    def _key(self, upstream: str, rest: str) -> str:
        return f"{self.prefix}{{wh:{upstream}}}:{rest}"

    async def _call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except Exception as exc:
            raise WebhooksUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None

    async def add(self, entry: WebhookEntry) -> list[str]:
        self._upstreams.add(entry.upstream)
        u = entry.upstream
        values: dict[str, Any] = {
            "upstream": u,
            "state": entry.state,
            "due": repr(entry.due),
            "received": repr(entry.received),
            "expires": repr(entry.expires),
            "dedupe_until": repr(entry.dedupe_until),
            "updated": repr(entry.received),
            "attempts": str(entry.attempts),
            "owner": "",
            "event_ids": encode_list(entry.event_ids),
            "types": encode_list(entry.types),
            "headers": encode_headers(entry.headers),
            "body": entry.body,
            "done": encode_list(entry.done),
            "last_error": entry.last_error,
        }
        fields: list[Any] = []
        for name in _FIELDS:
            fields += [name, values[name]]
        ttl_ms = max(int((entry.dedupe_until - entry.received) * 1000), 1)
        keys = [self._key(u, "due"), self._key(u, "pending"), self._key(u, f"e:{entry.id}")]
        keys += [self._key(u, f"id:{i}") for i in entry.event_ids]
        args = [ttl_ms, entry.id, repr(entry.due), repr(entry.received), len(_FIELDS), *fields, *entry.event_ids]
        seen = await self._call(self._add, keys, args)
        return [_text(s) for s in seen or []]

    async def claim(self, upstream: str, now: float, limit: int) -> list[WebhookEntry]:
        self._upstreams.add(upstream)
        rows = await self._call(
            self._claim,
            [self._key(upstream, "due"), self._key(upstream, "pending")],
            [repr(now), repr(now + LEASE), limit, self.instance, self._key(upstream, "e:")],
        )
        return [_from_hash(_text(pair[0]), list(pair[1])) for pair in rows or []]

    async def finish(self, entry: WebhookEntry) -> None:
        u = entry.upstream
        await self._call(
            self._finish,
            [self._key(u, "due"), self._key(u, "pending"), self._key(u, "dead"), self._key(u, f"e:{entry.id}")],
            [
                entry.id,
                self.instance,
                entry.state,
                repr(entry.due),
                repr(entry.updated or entry.due),
                str(entry.attempts),
                encode_list(entry.done),
                entry.last_error[:500],
                int(KEEP_DONE * 1000),
                int(KEEP_DEAD * 1000),
            ],
        )

    async def recover(self, now: float) -> int:
        """Entries claimed by a replica that stopped its heartbeats: queued again now."""
        taken = 0
        try:
            pairs: list[Any] = list(await self.client.zrange(f"{self.prefix}replicas", 0, -1, withscores=True))
            beats = {_text(pair[0]): float(pair[1]) for pair in pairs}
            secs, micros = await self.client.time()
            redis_now = secs + micros / 1e6
            for upstream in list(self._upstreams):
                due = self._key(upstream, "due")
                for raw in await self.client.zrangebyscore(due, repr(now), "+inf"):
                    entry_id = _text(raw)
                    owner = _text(await self.client.hget(self._key(upstream, f"e:{entry_id}"), "owner") or b"")
                    if not owner or owner == self.instance:
                        continue
                    seen = beats.get(owner)
                    if seen is not None and redis_now - seen <= OWNER_DEAD_AFTER:
                        continue
                    taken += int(
                        await self._call(
                            self._requeue,
                            [due, self._key(upstream, f"e:{entry_id}")],
                            [entry_id, owner, repr(now)],
                        )
                        or 0
                    )
        except WebhooksUnavailable:
            raise
        except Exception as exc:
            raise WebhooksUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None
        return taken

    async def purge(self, now: float) -> None:
        # Ids and finished entries carry TTLs; the dead index is trimmed here.
        for upstream in list(self._upstreams):
            try:
                await self.client.zremrangebyscore(self._key(upstream, "dead"), "-inf", repr(now - KEEP_DEAD))
            except Exception as exc:
                raise WebhooksUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None

    async def list(
        self, *, upstream: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[WebhookEntry]:
        out: list[WebhookEntry] = []
        names = [upstream] if upstream is not None else sorted(self._upstreams)
        for name in names:
            ids: list[Any] = []
            if state in (None, "queued", "claimed"):
                ids += await self.client.zrange(self._key(name, "pending"), 0, limit - 1)
            if state in (None, "dead"):
                ids += await self.client.zrange(self._key(name, "dead"), 0, limit - 1)
            for raw in ids:
                entry_id = _text(raw)
                flat = await self.client.execute_command("HGETALL", self._key(name, f"e:{entry_id}"))
                if not flat:
                    continue
                if isinstance(flat, dict):
                    flat = [x for pair in flat.items() for x in pair]
                entry = _from_hash(entry_id, list(flat))
                if state is None or entry.state == state:
                    out.append(entry)
        out.sort(key=lambda e: e.received)
        return out[:limit]

    async def stats(self, now: float) -> dict[str, WebhookStats]:
        result: dict[str, WebhookStats] = {}
        try:
            for name in sorted(self._upstreams):
                pending = int(await self.client.zcard(self._key(name, "pending")))
                first = await self.client.zrange(self._key(name, "pending"), 0, 0, withscores=True)
                dead = int(await self.client.zcard(self._key(name, "dead")))
                oldest = float(first[0][1]) if first else None
                result[name] = WebhookStats(pending=pending, oldest=oldest, dead=dead)
        except Exception as exc:
            raise WebhooksUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None
        return result

    async def close(self) -> None:
        return None  # the client belongs to the RedisState
