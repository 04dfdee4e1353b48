"""The outbox in Redis (`--redis`): every replica's kept sends in one place, so that a
replica that dies has its sends delivered by another (contract 7.6).

Same semantics as `SQLiteOutbox` (proxy/outbox/store.py has the entry's states); every
transition is one Lua script, so it is atomic against every other replica.

Why not Redis Streams (the first idea in docs/design.md)
--------------------------------------------------------

A consumer group gives "one consumer holds a message" and `XAUTOCLAIM` for messages
whose consumer went quiet, but the outbox needs three things Streams do not have:

* at most once: an entry is marked `sending` before its first byte is written, and a
  dead replica's entry is then *not* redelivered but put in doubt (and the provider is
  asked). `XAUTOCLAIM` redelivers on idle time alone, so a send that may have gone out
  would be sent again; the pending entries list has no per-message state to tell
  "claimed" from "sending";
* delayed due times: backoff after a refusal, `probe_after` for an entry in doubt. A
  stream delivers in id order, now; a message cannot come back "in 30 s";
* per-entry operator actions and views (`egressd outbox list|retry|drop`, states
  `dead`, `ambiguous`, `delivered` kept for the id mapping): a stream entry cannot be
  changed, and XDEL/XRANGE do not filter by state.

So the outbox is the structure delayed job queues use on Redis (sorted sets scored by
the due time, a hash per job, one script per transition).

Key layout (Cluster: every key of one upstream's outbox has the hash tag `{<upstream>}`,
so each script touches one slot; upstream names are `[a-z0-9-]`, never a brace):

    <prefix>outbox:{<up>}:e:<id>      HASH   the entry: its columns (as the SQLite row),
                                             `body` as bytes, `held` (see below)
    <prefix>outbox:{<up>}:st:<state>  ZSET   id -> created, one per state (list, stats,
                                             the `max_entries` count)
    <prefix>outbox:{<up>}:queue       ZSET   queued ids -> due (what `claim` takes)
    <prefix>outbox:{<up>}:doubt       ZSET   ids in doubt -> due (what `due_probes` takes)
    <prefix>outbox:{<up>}:held        ZSET   ids a replica holds (claimed, sending, or in
                                             doubt held for probing) -> when it took them
    <prefix>outbox:{<up>}:exp         ZSET   queued / in-doubt ids nobody holds -> expires
    <prefix>outbox:{<up>}:gone        ZSET   delivered ids -> updated (forgotten after
                                             `KEEP_DELIVERED`)
    <prefix>outbox:{<up>}:void:<id>   STRING an add that failed (see `add`), 1 h TTL
    <prefix>outbox:upstreams          SET    upstreams that have entries (for what takes
                                             no upstream: get, list, stats, recover, expire;
                                             named again by add and claim every 10 s)

Scripts (each keeps the hash and every index in step: `unindex` then `index`):
`add` (count pending, refuse past `max_entries`, store), `claim` (due queued ids by
(due, created) -> claimed by this replica), `mark_sending` and `finish` (only while the
entry's owner is this replica), `due_probes`, `recover`, `expire`, `list`, `retry`,
`drop`, `stats`, `settle` (after a failed add). An entry's id says nothing of its
upstream, so `get`, `retry` and `drop` first look the id up under each registered
upstream (a handful; concurrently), then run the script in that upstream's slot, which
checks the entry's state again: the upstream of an id never changes, so the two steps
need no atomicity between them.

Entry times (`due`, `expires`, `created`, `updated`) are wall-clock seconds from the
caller (the worker's clock), as in the other stores. Liveness is the replica heartbeat
of `RedisState` (`<prefix>replicas`, stamped with Redis `TIME`, or the state's injected
clock): `instance` is the state's replica id, and an owner is dead by the rule of
`RedisState._owner_dead`: not seen for `OWNER_DEAD_AFTER`, or not in the set at all. An
entry's `held` is stamped with the same clock when a replica takes it; an owner missing
from the set is judged dead only once its hold is older than `OWNER_DEAD_AFTER` (a replica
announces itself before its first claim, but the snapshot `recover` reads may be a few
milliseconds older than that announcement).

TTLs: pending, `dead` and `ambiguous` entries and the indexes carry none, on purpose
(they are kept until delivered or dropped, like the SQLite rows; with `maxmemory-policy
volatile-lru`, which docs/scaling.md recommends, they are never evicted). A `delivered`
entry loses its body and gets a TTL of `KEEP_DELIVERED` plus a day, only the bound that
frees memory if no replica runs `expire`; `expire` forgets it after `KEEP_DELIVERED` by
the wall clock.

Durability is Redis's own: an add is acknowledged once the script ran on the master, so
what survives a Redis restart or a failover is what its persistence (`appendonly`) and
replication kept (docs/scaling.md).

Failures: any Redis error or timeout (`timeout` seconds per operation) raises
`OutboxUnavailable`. An `add` whose answer did not come may still have run (or run
later: a frozen Redis executes what it had read when it thaws), so it is settled at
once with the `settle` script: an entry that is there is kept (the app gets "accepted",
which is then true); otherwise a `void` marker makes any late copy of the add refuse,
and the app gets 503 with nothing stored. If even that cannot reach Redis, the id is
remembered and settled by this store's next operation (the entry is deleted if nobody
took it yet).

Beyond the SQLite semantics, for a store across the network:

* `mark_sending` on an entry this replica no longer holds raises `EntryNotHeld` (an
  `OutboxUnavailable`), so the worker does not send it: a replica that was judged dead
  (its heartbeats did not reach Redis for `OWNER_DEAD_AFTER`) and comes back never sends
  an entry another replica took over.
* an entry this replica holds but its worker never got (a `claim` whose answer was lost)
  is an orphan: `recover` takes it back like a dead replica's after `ORPHAN_AFTER`.
  A `finish` that failed is tried again by the next `recover`. One `RedisOutbox` per
  `RedisState` (`ResilientState.outbox_store` keeps one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

import redis.exceptions
from redis.commands.core import AsyncScript

from proxy.outbox.store import (
    KEEP_DELIVERED,
    PENDING,
    STATES,
    Entry,
    EntryNotHeld,
    OutboxFull,
    OutboxUnavailable,
    UpstreamStats,
    decode_headers,
    encode_headers,
)
from proxy.state.redis import OWNER_DEAD_AFTER, RedisState

log = logging.getLogger("egressd.outbox")

T = TypeVar("T")

ROW_SHAPE = 1
OP_TIMEOUT = 2.0  # seconds per store operation (the app waits for `add`)
ORPHAN_AFTER = 30.0  # an entry held by this replica and unknown to its worker for this long
PROBE_HOLD = 3600.0  # a doubt entry taken for probing is not due again for this long
VOID_TTL_MS = 3600 * 1000
BATCH = 1000  # entries per script run in expire
REGISTER_EVERY = 10.0
_LOG_EVERY = 10.0
_HELD = ("claimed", "sending")


class CorruptEntry(Exception):
    pass


# -- the scripts -------------------------------------------------------------------------------
# KEYS[1] is always `<prefix>outbox:{<up>}:queue`: it routes the script to the upstream's
# slot, and the other keys are built from it (same hash tag). ARGV[1] is the caller's wall
# clock ("now" for the entry's times), ARGV[2] the liveness clock ("" = Redis TIME).

_PRELUDE = """
local base = string.sub(KEYS[1], 1, #KEYS[1] - 5)
local now = tonumber(ARGV[1]) or 0
local hnow = tonumber(ARGV[2])
if not hnow then
  local t = redis.call('TIME')
  hnow = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
local STATES = {'queued', 'claimed', 'sending', 'doubt', 'delivered', 'ambiguous', 'dead'}
local PENDING = {'queued', 'claimed', 'sending', 'doubt'}
local KNOWN = {}
for _, s in ipairs(STATES) do KNOWN[s] = true end
local KEEP_MS = %(keep_ms)d
local function ekey(id) return base .. 'e:' .. id end
local function unindex(id)
  for _, s in ipairs(STATES) do redis.call('ZREM', base .. 'st:' .. s, id) end
  for _, k in ipairs({'queue', 'doubt', 'held', 'exp', 'gone'}) do redis.call('ZREM', base .. k, id) end
end
-- Puts an entry in the indexes its fields call for (after `unindex`).
local function index(id)
  local k = ekey(id)
  local f = redis.call('HMGET', k, 'state', 'owner', 'due', 'expires', 'created', 'updated', 'held')
  local state, owner = f[1], f[2] or ''
  if not state or not KNOWN[state] then return end
  local due = tonumber(f[3] or '') or 0
  local expires = tonumber(f[4] or '') or 0
  redis.call('ZADD', base .. 'st:' .. state, tonumber(f[5] or '') or 0, id)
  if state == 'delivered' then
    redis.call('ZADD', base .. 'gone', tonumber(f[6] or '') or 0, id)
    redis.call('PEXPIRE', k, KEEP_MS)
    return
  end
  redis.call('PERSIST', k)
  if state == 'queued' then redis.call('ZADD', base .. 'queue', due, id) end
  if state == 'doubt' then redis.call('ZADD', base .. 'doubt', due, id) end
  local holds = state == 'claimed' or state == 'sending' or (state == 'doubt' and owner ~= '')
  if holds then
    redis.call('ZADD', base .. 'held', tonumber(f[7] or '') or hnow, id)
  elseif state == 'queued' or state == 'doubt' then
    redis.call('ZADD', base .. 'exp', expires, id)
  end
end
local function reindex(id)
  unindex(id)
  index(id)
end
"""


def _script(body: str) -> str:
    return _PRELUDE.replace("%(keep_ms)d", str(int((KEEP_DELIVERED + 86400.0) * 1000))) + body


# ARGV: now, hnow, max_entries, id, field, value, ...  -> ok | full | void | exists
ADD = _script(
    """
local id = ARGV[4]
if redis.call('EXISTS', base .. 'void:' .. id) == 1 then return 'void' end
if redis.call('EXISTS', ekey(id)) == 1 then return 'exists' end
local pending = 0
for _, s in ipairs(PENDING) do pending = pending + redis.call('ZCARD', base .. 'st:' .. s) end
if pending >= tonumber(ARGV[3]) then return 'full' end
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', ekey(id), unpack(fields))
index(id)
return 'ok'
"""
)

# ARGV: now, hnow, id, mode ("settle": right after a failed add; "remove": later).
# settle -> stored | void;  remove -> removed | taken | void
SETTLE = _script(
    """
local id = ARGV[3]
local k = ekey(id)
local f = redis.call('HMGET', k, 'state', 'owner')
if f[1] then
  if ARGV[4] == 'settle' then return 'stored' end
  if f[1] ~= 'queued' or (f[2] or '') ~= '' then return 'taken' end
  unindex(id)
  redis.call('DEL', k)
  redis.call('SET', base .. 'void:' .. id, '1', 'PX', %(void_ms)d)
  return 'removed'
end
redis.call('SET', base .. 'void:' .. id, '1', 'PX', %(void_ms)d)
return 'void'
""".replace("%(void_ms)d", str(VOID_TTL_MS))
)

# ARGV: now, hnow, limit, instance.  Returns the claimed entries (HGETALL each).
CLAIM = _script(
    """
local limit = tonumber(ARGV[3])
local me = ARGV[4]
local got = redis.call('ZRANGEBYSCORE', base .. 'queue', '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, limit)
local cands, seen, last = {}, {}, nil
for i = 1, #got, 2 do
  cands[#cands + 1] = got[i]
  seen[got[i]] = true
  last = got[i + 1]
end
if #cands >= limit and last then
  -- entries due at the same time as the last one: the oldest (created) goes first
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', base .. 'queue', last, last, 'LIMIT', 0, 1000)) do
    if not seen[id] then cands[#cands + 1] = id end
  end
end
local rows = {}
for _, id in ipairs(cands) do
  local f = redis.call('HMGET', ekey(id), 'state', 'due', 'created')
  if f[1] == 'queued' then
    rows[#rows + 1] = {id, tonumber(f[2] or '') or 0, tonumber(f[3] or '') or 0}
  else
    reindex(id)  -- an index out of step with its entry (or an entry gone)
  end
end
table.sort(rows, function(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  if a[3] ~= b[3] then return a[3] < b[3] end
  return a[1] < b[1]
end)
local out = {}
for i = 1, math.min(limit, #rows) do
  local id = rows[i][1]
  unindex(id)
  redis.call('HSET', ekey(id), 'state', 'claimed', 'owner', me, 'updated', ARGV[1], 'held', fmt(hnow))
  index(id)
  out[#out + 1] = redis.call('HGETALL', ekey(id))
end
return out
"""
)

# ARGV: now, hnow, id, upstream it goes to, instance.  Returns 1, or 0 if not held by instance.
MARK_SENDING = _script(
    """
local id = ARGV[3]
local k = ekey(id)
local f = redis.call('HMGET', k, 'state', 'owner', 'sent_to')
if not f[1] or f[2] ~= ARGV[5] then return 0 end
local sent = f[3] or ''
if not string.find(',' .. sent .. ',', ',' .. ARGV[4] .. ',', 1, true) then
  if sent == '' then sent = ARGV[4] else sent = sent .. ',' .. ARGV[4] end
end
unindex(id)
redis.call('HSET', k, 'state', 'sending', 'updated', ARGV[1], 'sent_to', sent)
index(id)
return 1
"""
)

# ARGV: now, hnow, id, instance, state, due, expires, attempts, provider_id, delivered_via,
# last_error, sent_to ("" keeps it).  Returns 1, or 0 if not held by instance.
FINISH = _script(
    """
local id = ARGV[3]
local k = ekey(id)
local f = redis.call('HMGET', k, 'state', 'owner')
if not f[1] or f[2] ~= ARGV[4] then return 0 end
local state = ARGV[5]
if not KNOWN[state] then return redis.error_reply('unknown outbox state ' .. state) end
local owner = ''
if state == 'claimed' or state == 'sending' then owner = ARGV[4] end
unindex(id)
redis.call('HSET', k, 'state', state, 'due', ARGV[6], 'expires', ARGV[7], 'updated', ARGV[1],
  'attempts', ARGV[8], 'owner', owner, 'provider_id', ARGV[9], 'delivered_via', ARGV[10],
  'last_error', ARGV[11])
if ARGV[12] ~= '' then redis.call('HSET', k, 'sent_to', ARGV[12]) end
if state == 'delivered' then redis.call('HSET', k, 'body', '') end
if owner == '' then redis.call('HDEL', k, 'held') end
index(id)
return 1
"""
)

# ARGV: now, hnow, limit, instance.  Doubt entries due by now, held for probing.
DUE_PROBES = _script(
    """
local ids = redis.call('ZRANGEBYSCORE', base .. 'doubt', '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local k = ekey(id)
  if redis.call('HGET', k, 'state') == 'doubt' then
    unindex(id)
    redis.call('HSET', k, 'owner', ARGV[4], 'due', fmt(now + %(hold)s), 'updated', ARGV[1], 'held', fmt(hnow))
    index(id)
    out[#out + 1] = redis.call('HGETALL', k)
  else
    reindex(id)
  end
end
return out
""".replace("%(hold)s", repr(PROBE_HOLD))
)

# ARGV: now, hnow, snapshot time (heartbeat clock; "" = judge no other replica), dead_after,
# instance, probe_after, orphan_after, n, the n ids this replica's worker holds, then the
# snapshot's replica, seen pairs.
# Held entries of dead owners (and this replica's orphans): claimed -> queued, sending ->
# doubt (probe at now + probe_after), doubt held for probing -> doubt due now.
# Returns {requeued, put in doubt}.
RECOVER = _script(
    """
local snap = tonumber(ARGV[3])
local dead_after = tonumber(ARGV[4])
local me = ARGV[5]
local probe_after = tonumber(ARGV[6])
local orphan_after = tonumber(ARGV[7])
local n = tonumber(ARGV[8])
local mine = {}
for i = 9, 8 + n do mine[ARGV[i]] = true end
local seen = {}
for i = 9 + n, #ARGV, 2 do seen[ARGV[i]] = tonumber(ARGV[i + 1]) end
local held = redis.call('ZRANGE', base .. 'held', 0, -1, 'WITHSCORES')
local requeued, doubted = 0, 0
for i = 1, #held, 2 do
  local id = held[i]
  local at = tonumber(held[i + 1]) or 0
  local k = ekey(id)
  local f = redis.call('HMGET', k, 'state', 'owner')
  local st, owner = f[1], f[2] or ''
  if not st or owner == '' or not (st == 'claimed' or st == 'sending' or st == 'doubt') then
    reindex(id)
  else
    local dead = false
    if owner == me then
      dead = not mine[id] and hnow - at > orphan_after
    elseif not snap then
      dead = false
    elseif seen[owner] then
      dead = snap - seen[owner] > dead_after
    else
      dead = snap - at > dead_after
    end
    if dead then
      unindex(id)
      if st == 'claimed' then
        redis.call('HSET', k, 'state', 'queued', 'owner', '', 'due', ARGV[1], 'updated', ARGV[1])
        requeued = requeued + 1
      elseif st == 'sending' then
        redis.call('HSET', k, 'state', 'doubt', 'owner', '', 'due', fmt(now + probe_after), 'updated', ARGV[1],
          'last_error', 'the process sending it died')
        doubted = doubted + 1
      else
        redis.call('HSET', k, 'owner', '', 'due', ARGV[1], 'updated', ARGV[1])
      end
      redis.call('HDEL', k, 'held')
      index(id)
    end
  end
end
return {requeued, doubted}
"""
)

# ARGV: now, hnow, batch, forget delivered updated at or before this.
# Returns the entries that died (HGETALL each).
EXPIRE = _script(
    """
local batch = tonumber(ARGV[3])
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', base .. 'exp', '-inf', ARGV[1], 'LIMIT', 0, batch)) do
  local k = ekey(id)
  local f = redis.call('HMGET', k, 'state', 'owner', 'last_error')
  if (f[1] == 'queued' or f[1] == 'doubt') and (f[2] or '') == '' then
    local state = 'dead'
    if f[1] == 'doubt' then state = 'ambiguous' end
    local why = f[3] or ''
    if why == '' then why = 'max_age passed' end
    unindex(id)
    redis.call('HSET', k, 'state', state, 'last_error', why, 'updated', ARGV[1])
    index(id)
    out[#out + 1] = redis.call('HGETALL', k)
  else
    reindex(id)
  end
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', base .. 'gone', '-inf', ARGV[4], 'LIMIT', 0, batch)) do
  local st = redis.call('HGET', ekey(id), 'state')
  if not st or st == 'delivered' then
    unindex(id)
    redis.call('DEL', ekey(id))
  else
    reindex(id)
  end
end
return out
"""
)

# ARGV: now, hnow, state ("" = any), limit.  Entries by created (HGETALL each).
LIST = _script(
    """
local limit = tonumber(ARGV[4])
local ids = {}
if ARGV[3] ~= '' then
  ids = redis.call('ZRANGE', base .. 'st:' .. ARGV[3], 0, limit - 1)
else
  local rows = {}
  for _, s in ipairs(STATES) do
    local got = redis.call('ZRANGE', base .. 'st:' .. s, 0, limit - 1, 'WITHSCORES')
    for i = 1, #got, 2 do rows[#rows + 1] = {got[i], tonumber(got[i + 1])} end
  end
  table.sort(rows, function(a, b)
    if a[2] ~= b[2] then return a[2] < b[2] end
    return a[1] < b[1]
  end)
  for i = 1, math.min(limit, #rows) do ids[i] = rows[i][1] end
end
local out = {}
for _, id in ipairs(ids) do
  local all = redis.call('HGETALL', ekey(id))
  if #all > 0 then out[#out + 1] = all end
end
return out
"""
)

# ARGV: now, hnow, id, max_age.  An ambiguous or dead entry back to queued.
RETRY = _script(
    """
local id = ARGV[3]
local k = ekey(id)
local st = redis.call('HGET', k, 'state')
if st ~= 'ambiguous' and st ~= 'dead' then return false end
unindex(id)
redis.call('HSET', k, 'state', 'queued', 'due', ARGV[1], 'expires', fmt(now + tonumber(ARGV[4])), 'owner', '',
  'sent_to', '', 'updated', ARGV[1])
redis.call('HDEL', k, 'held')
index(id)
return redis.call('HGETALL', k)
"""
)

# ARGV: now, hnow, id.  Deletes an entry no worker holds; returns what was deleted.
DROP = _script(
    """
local id = ARGV[3]
local k = ekey(id)
local st = redis.call('HGET', k, 'state')
if not st or not KNOWN[st] or st == 'claimed' or st == 'sending' then return false end
local all = redis.call('HGETALL', k)
unindex(id)
redis.call('DEL', k)
return all
"""
)

# ARGV: now, hnow, id.  An entry that cannot be read: out of every index, state corrupt.
ASIDE = _script(
    """
local id = ARGV[3]
if redis.call('EXISTS', ekey(id)) == 0 then return 0 end
unindex(id)
redis.call('HSET', ekey(id), 'state', 'corrupt')
redis.call('PERSIST', ekey(id))
return 1
"""
)

# ARGV: now, hnow.  Returns {count per state (STATES order)..., oldest pending created or ""}.
STATS = _script(
    """
local out = {}
for _, s in ipairs(STATES) do out[#out + 1] = redis.call('ZCARD', base .. 'st:' .. s) end
local oldest = nil
for _, s in ipairs(PENDING) do
  local first = redis.call('ZRANGE', base .. 'st:' .. s, 0, 0, 'WITHSCORES')
  if first[2] then
    local c = tonumber(first[2])
    if not oldest or c < oldest then oldest = c end
  end
end
if oldest then out[#out + 1] = fmt(oldest) else out[#out + 1] = '' end
return out
"""
)

# KEYS: the replicas ZSET (RedisState's heartbeats).  ARGV: now ("" = Redis TIME).
# Returns {now, replica, seen, ...}: a snapshot with the clock that stamped it.
REPLICAS = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local out = {string.format('%.17g', now)}
for _, v in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')) do out[#out + 1] = v end
return out
"""

SCRIPTS: dict[str, str] = {
    "add": ADD,
    "settle": SETTLE,
    "claim": CLAIM,
    "mark_sending": MARK_SENDING,
    "finish": FINISH,
    "due_probes": DUE_PROBES,
    "recover": RECOVER,
    "expire": EXPIRE,
    "list": LIST,
    "retry": RETRY,
    "drop": DROP,
    "aside": ASIDE,
    "stats": STATS,
    "replicas": REPLICAS,
}


# -- entries <-> hashes ----------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[str, bytes]:
    """A hash as Redis gives it (a flat list from a script, a dict from HGETALL)."""
    if isinstance(raw, dict):
        return {_text(k): v if isinstance(v, bytes) else str(v).encode() for k, v in raw.items()}
    items = list(raw)
    return {
        _text(items[i]): items[i + 1] if isinstance(items[i + 1], bytes) else str(items[i + 1]).encode()
        for i in range(0, len(items) - 1, 2)
    }


def _entry(f: dict[str, bytes]) -> Entry:
    def s(name: str) -> str:
        return f[name].decode()

    if s("shape") != str(ROW_SHAPE):
        raise CorruptEntry(f"unknown entry shape {s('shape')}")
    state = s("state")
    if state not in STATES:
        raise CorruptEntry(f"unknown state {state}")
    return Entry(
        id=s("id"),
        upstream=s("upstream"),
        method=s("method"),
        path=s("path"),
        query=s("query"),
        headers=decode_headers(s("headers")),
        body=bytes(f.get("body", b"")),
        created=float(s("created")),
        expires=float(s("expires")),
        state=state,
        due=float(s("due")),
        attempts=int(s("attempts")),
        owner=s("owner"),
        sent_to=[x for x in s("sent_to").split(",") if x],
        provider_id=s("provider_id"),
        delivered_via=s("delivered_via"),
        last_error=s("last_error"),
        updated=float(s("updated")),
    )


def _num(x: float) -> str:
    return repr(float(x))


def _hash_args(entry: Entry) -> list[str | bytes]:
    pairs: list[tuple[str, str | bytes]] = [
        ("id", entry.id),
        ("upstream", entry.upstream),
        ("state", entry.state),
        ("due", _num(entry.due)),
        ("created", _num(entry.created)),
        ("expires", _num(entry.expires)),
        ("updated", _num(entry.created)),
        ("attempts", str(entry.attempts)),
        ("owner", ""),
        ("method", entry.method),
        ("path", entry.path),
        ("query", entry.query),
        ("headers", encode_headers(entry.headers)),
        ("body", entry.body),
        ("sent_to", ",".join(entry.sent_to)),
        ("provider_id", entry.provider_id),
        ("delivered_via", entry.delivered_via),
        ("last_error", entry.last_error[:500]),
        ("shape", str(ROW_SHAPE)),
    ]
    return [x for pair in pairs for x in pair]


def _failure(exc: BaseException) -> bool:
    """Trouble with Redis (as opposed to a bug here): it becomes `OutboxUnavailable`."""
    return isinstance(exc, (redis.exceptions.RedisError, OSError, TimeoutError, ConnectionError))


class RedisOutbox:
    """Implements `OutboxStore` in Redis (see the module doc)."""

    name = "redis"

    def __init__(
        self,
        state: RedisState,
        *,
        wall: Callable[[], float] = time.time,
        timeout: float = OP_TIMEOUT,
        dead_after: float = OWNER_DEAD_AFTER,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self.state = state
        self.client = state.client
        self.instance = state.replica_id
        self.prefix = state.prefix
        self.timeout = timeout
        self.dead_after = dead_after
        self.orphan_after = orphan_after
        self._wall = wall
        self._scripts: dict[str, AsyncScript] = {
            name: self.client.register_script(text) for name, text in SCRIPTS.items()
        }
        self._registry = f"{self.prefix}outbox:upstreams"
        self._mine: set[str] = set()  # ids this replica's worker holds (claimed / probing)
        self._upstream_by_id: dict[str, str] = {}  # the upstreams of those ids
        self._unfinished: dict[str, Entry] = {}  # finishes that did not reach Redis
        self._registered: dict[str, float] = {}  # upstream -> when this process last named it
        self._to_void: dict[str, str] = {}  # id -> upstream: adds that failed, not settled yet
        self.moved_aside = 0
        self.errors = 0
        self._last_log = -1e18

    # -- plumbing ----------------------------------------------------------------------------
    def _base(self, upstream: str) -> str:
        return f"{self.prefix}outbox:{{{upstream}}}:"

    async def _script(self, name: str, upstream: str, now: float, *args: str | bytes | int | float) -> Any:
        return await self._scripts[name](
            keys=[self._base(upstream) + "queue"], args=[_num(now), self.state._now_arg(), *args]
        )

    async def _run(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """`fn()` within `timeout`; Redis trouble (an error, a timeout) is `OutboxUnavailable`."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._to_void:
                    await self._settle_voids()
                return await fn()
        except OutboxUnavailable:
            raise
        except Exception as exc:
            if not _failure(exc):
                raise
            self._failed(operation, exc)
            raise OutboxUnavailable(f"redis: {type(exc).__name__}: {exc}"[:300]) from None

    def _failed(self, operation: str, exc: BaseException) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.error(
                "outbox store (redis) operation failed",
                extra={"operation": operation, "error": f"{type(exc).__name__}: {exc}"[:300]},
            )

    async def _register(self, upstream: str) -> None:
        """Name the upstream in the registry (at most every `REGISTER_EVERY` seconds per
        process, so an add costs one round trip; claims refresh it too)."""
        now = time.monotonic()
        if now - self._registered.get(upstream, -1e18) >= REGISTER_EVERY:
            await self.client.sadd(self._registry, upstream)
            self._registered[upstream] = now

    async def _upstreams(self) -> list[str]:
        return sorted(_text(u) for u in await self.client.smembers(self._registry))

    async def _announce(self) -> None:
        """Like `RedisState.idem_claim`: a replica that will beat announces itself before it
        holds anything, so that others can tell when it stops."""
        if self.state._beating is None:
            await self.state.heartbeat()

    async def _decode(self, upstream: str, raws: Iterable[Any]) -> list[Entry]:
        """Entries from hashes; one that does not decode is moved aside (state `corrupt`,
        logged), never returned and never a crash."""
        out: list[Entry] = []
        for raw in raws:
            fields = _fields(raw)
            if not fields:
                continue
            try:
                out.append(_entry(fields))
            except Exception as exc:
                entry_id = fields.get("id", b"?").decode("utf-8", "replace")
                if fields.get("state") == b"corrupt":
                    continue
                self.moved_aside += 1
                log.error(
                    "outbox entry cannot be read: moved aside (state corrupt)",
                    extra={"outbox_id": entry_id, "error": f"{type(exc).__name__}: {exc}"},
                )
                await self._script("aside", upstream, self._wall(), entry_id)
        return out

    async def _settle_voids(self) -> None:
        """Settle adds that failed and could not be settled then (see the module doc)."""
        for entry_id, upstream in list(self._to_void.items()):
            result = _text(await self._script("settle", upstream, self._wall(), entry_id, "remove"))
            del self._to_void[entry_id]
            if result == "taken":
                log.error(
                    "an outbox add answered 503 was stored after all and is being delivered",
                    extra={"outbox_id": entry_id, "upstream": upstream},
                )

    async def _find(self, entry_id: str) -> tuple[str, dict[str, bytes]] | None:
        """The upstream an id is kept under, and its hash."""
        upstreams = await self._upstreams()
        found = await asyncio.gather(*(self.client.hgetall(self._base(u) + "e:" + entry_id) for u in upstreams))
        for upstream, raw in zip(upstreams, found, strict=True):
            if raw:
                return upstream, _fields(raw)
        return None

    # -- the protocol ------------------------------------------------------------------------
    async def add(self, entry: Entry, *, max_entries: int) -> None:
        if entry.state not in STATES:
            raise ValueError(f"unknown outbox state {entry.state}")

        async def add() -> str:
            await self._register(entry.upstream)
            return _text(
                await self._script("add", entry.upstream, entry.created, max_entries, entry.id, *_hash_args(entry))
            )

        try:
            result = await self._run("add", add)
        except OutboxUnavailable:
            if await self._settle_failed_add(entry):
                return  # it is stored after all: the send is kept
            raise
        if result == "full":
            raise OutboxFull(entry.upstream)
        if result == "void":
            raise OutboxUnavailable("redis: this send was refused earlier")

    async def _settle_failed_add(self, entry: Entry) -> bool:
        """After an add that got no answer: True if it is stored; else it never will be (a
        void marker refuses a late copy) or, when Redis cannot be reached, it is settled by
        a later operation."""
        try:
            result = await self._run(
                "add", lambda: self._script("settle", entry.upstream, self._wall(), entry.id, "settle")
            )
        except OutboxUnavailable:
            self._to_void[entry.id] = entry.upstream
            return False
        return _text(result) == "stored"

    async def claim(self, upstream: str, now: float, limit: int) -> list[Entry]:
        if limit <= 0:
            return []

        async def claim() -> list[Entry]:
            await self._register(upstream)
            await self._announce()
            raws = await self._script("claim", upstream, now, limit, self.instance)
            return await self._decode(upstream, raws)

        found = await self._run("claim", claim)
        self._hold(found)
        return found

    async def mark_sending(self, entry_id: str, upstream: str) -> None:
        entry_upstream = await self._upstream_of(entry_id)
        held = await self._run(
            "mark_sending",
            lambda: self._script("mark_sending", entry_upstream, self._wall(), entry_id, upstream, self.instance),
        )
        if not int(held):
            self._release(entry_id)
            raise EntryNotHeld(f"outbox entry {entry_id} is not held by this replica (taken back?): not sent")

    async def _upstream_of(self, entry_id: str) -> str:
        """The upstream of an entry this replica holds (known from claim), else looked up."""
        known = self._upstream_by_id.get(entry_id)
        if known is not None:
            return known
        found = await self._run("lookup", lambda: self._find(entry_id))
        if found is None:
            raise EntryNotHeld(f"outbox entry {entry_id} is gone: not sent")
        return found[0]

    async def finish(self, entry: Entry) -> None:
        if entry.state not in STATES:
            raise ValueError(f"unknown outbox state {entry.state}")
        try:
            done = await self._run("finish", lambda: self._finish(entry))
        except OutboxUnavailable:
            self._unfinished[entry.id] = replace(entry, headers=list(entry.headers), sent_to=list(entry.sent_to))
            raise
        self._unfinished.pop(entry.id, None)
        if not done or entry.state not in _HELD:
            self._release(entry.id)

    async def _finish(self, entry: Entry) -> bool:
        result = await self._script(
            "finish",
            entry.upstream,
            self._wall(),
            entry.id,
            self.instance,
            entry.state,
            _num(entry.due),
            _num(entry.expires),
            str(entry.attempts),
            entry.provider_id,
            entry.delivered_via,
            entry.last_error[:500],
            ",".join(entry.sent_to),
        )
        return bool(int(result))

    async def due_probes(self, upstream: str, now: float, limit: int) -> list[Entry]:
        if limit <= 0:
            return []

        async def take() -> list[Entry]:
            await self._announce()
            raws = await self._script("due_probes", upstream, now, limit, self.instance)
            return await self._decode(upstream, raws)

        found = await self._run("due_probes", take)
        self._hold(found)
        return found

    def _hold(self, entries: list[Entry]) -> None:
        for e in entries:
            self._mine.add(e.id)
            self._upstream_by_id[e.id] = e.upstream

    def _release(self, entry_id: str) -> None:
        self._mine.discard(entry_id)
        self._upstream_by_id.pop(entry_id, None)

    async def recover(self, now: float, probe_after: Callable[[str], float]) -> tuple[int, int]:
        async def recover() -> tuple[int, int]:
            for entry in list(self._unfinished.values()):  # finishes that did not reach Redis
                done = await self._finish(entry)
                del self._unfinished[entry.id]
                if not done or entry.state not in _HELD:
                    self._release(entry.id)
            # Only a replica that beats judges others (the rule of RedisState._owner_dead);
            # one that does not ("" snapshot) takes back only its own orphans.
            seen: list[str] = []
            snap = ""
            await self._announce()
            if self.state._beating is True:
                reply = await self._scripts["replicas"](keys=[f"{self.prefix}replicas"], args=[self.state._now_arg()])
                snap = _text(reply[0])
                seen = [_text(x) for x in reply[1:]]
            mine = sorted(self._mine)
            requeued = doubted = 0
            for upstream in await self._upstreams():
                r, d = await self._script(
                    "recover",
                    upstream,
                    now,
                    snap,
                    _num(self.dead_after),
                    self.instance,
                    _num(probe_after(upstream)),
                    _num(self.orphan_after),
                    len(mine),
                    *mine,
                    *seen,
                )
                requeued += int(r)
                doubted += int(d)
            return requeued, doubted

        return await self._run("recover", recover)

    async def expire(self, now: float) -> list[Entry]:
        async def expire() -> list[Entry]:
            died: list[Entry] = []
            for upstream in await self._upstreams():
                raws = await self._script("expire", upstream, now, BATCH, _num(now - KEEP_DELIVERED))
                died += await self._decode(upstream, raws)
            return died

        return await self._run("expire", expire)

    async def get(self, entry_id: str) -> Entry | None:
        async def get() -> list[Entry]:
            found = await self._find(entry_id)
            if found is None:
                return []
            return await self._decode(found[0], [found[1]])

        entries = await self._run("get", get)
        return entries[0] if entries else None

    async def list(self, *, upstream: str | None = None, state: str | None = None, limit: int = 100) -> list[Entry]:
        if (state is not None and state not in STATES) or limit <= 0:
            return []

        async def listing() -> list[Entry]:
            names = [upstream] if upstream is not None else await self._upstreams()
            found: list[Entry] = []
            for name in names:
                raws = await self._script("list", name, self._wall(), state or "", limit)
                found += await self._decode(name, raws)
            found.sort(key=lambda e: (e.created, e.id))
            return found[:limit]

        return await self._run("list", listing)

    async def retry(self, entry_id: str, now: float, max_age: float) -> Entry | None:
        async def retry() -> list[Entry]:
            found = await self._find(entry_id)
            if found is None:
                return []
            raw = await self._script("retry", found[0], now, entry_id, _num(max_age))
            return [] if not raw else await self._decode(found[0], [raw])

        entries = await self._run("retry", retry)
        return entries[0] if entries else None

    async def drop(self, entry_id: str) -> Entry | None:
        async def drop() -> list[Entry]:
            found = await self._find(entry_id)
            if found is None:
                return []
            raw = await self._script("drop", found[0], self._wall(), entry_id)
            if not raw:
                return []
            try:
                return [_entry(_fields(raw))]
            except Exception:  # deleted, as asked, though it could not be read
                return []

        entries = await self._run("drop", drop)
        return entries[0] if entries else None

    async def stats(self, now: float) -> dict[str, UpstreamStats]:
        async def stats() -> dict[str, UpstreamStats]:
            out: dict[str, UpstreamStats] = {}
            for upstream in await self._upstreams():
                reply = await self._script("stats", upstream, now)
                counts = dict(zip(STATES, (int(x) for x in reply[: len(STATES)]), strict=True))
                if not any(counts.values()):
                    continue
                oldest = _text(reply[len(STATES)])
                out[upstream] = UpstreamStats(
                    pending=sum(counts[s] for s in PENDING),
                    oldest=float(oldest) if oldest else None,
                    doubt=counts["doubt"],
                    ambiguous=counts["ambiguous"],
                    dead=counts["dead"],
                    delivered=counts["delivered"],
                )
            return out

        return await self._run("stats", stats)

    async def close(self) -> None:
        return None  # the client belongs to the RedisState
