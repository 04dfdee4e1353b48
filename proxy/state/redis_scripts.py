"""The Lua scripts of the Redis backend: one per operation that must be atomic.

Each script mirrors one method of `proxy.state.memory_limits.MemoryLimits` or
`proxy.state.memory_records.MemoryRecords` with the same arithmetic, so both backends
pass the same suite (tests/test_state_limits.py, tests/test_state_records.py).

Conventions shared by every script:

* ARGV[1] is "now" in seconds, or "" to use the Redis server's `TIME` (the default in
  production, so replicas on different hosts agree on one clock; tests inject a clock).
* Expiry that the semantics depend on is stored in the value and compared with "now";
  the Redis key TTL (`PEXPIRE`) is only the upper bound that frees memory, set a little
  longer (`SLACK_MS`) than the logical lifetime. Nothing is written without a TTL.
* Numbers go back as strings (`%.17g`): Redis turns Lua numbers into integers.
* All keys of one script share a hash tag (`{upstream:kind:fp}`), so one cluster slot.
"""

from __future__ import annotations

# Helpers prepended to every script.
_PRELUDE = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function fmt(x) return string.format('%.17g', x) end
local function px(seconds)
  local ms = math.ceil(seconds * 1000) + 1000
  if ms < 1000 then ms = 1000 end
  return ms
end
"""

# -- rate limiting ---------------------------------------------------------------------------

# KEYS: tat, pause.  ARGV: now, interval, burst, max_wait.
# Returns {allowed (0/1), wait, pause_left}: the pause is read in the same round trip so
# that `paused_for` right after an admission needs no second one.
RATE_TAKE = (
    _PRELUDE
    + """
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tolerance = math.max(burst - 1, 0) * interval
local tat = tonumber(redis.call('GET', KEYS[1]) or '') or now
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
local allowed = 0
if wait <= max_wait + 1e-9 then
  allowed = 1
  local new_tat = tat + interval
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', px(new_tat - now))
end
local pause_left = 0
local until_ = tonumber(redis.call('GET', KEYS[2]) or '')
if until_ and until_ > now then pause_left = until_ - now end
return {allowed, fmt(wait), fmt(pause_left)}
"""
)

# KEYS: pause.  ARGV: now, seconds.  Never shortens a pause.  Returns the pause left.
PAUSE = (
    _PRELUDE
    + """
local seconds = tonumber(ARGV[2])
local current = tonumber(redis.call('GET', KEYS[1]) or '') or 0
local until_ = now + seconds
if seconds > 0 and until_ > current then
  redis.call('SET', KEYS[1], fmt(until_), 'PX', px(seconds))
  current = until_
end
local left = current - now
if left < 0 then left = 0 end
return fmt(left)
"""
)

# KEYS: pause.  ARGV: now.
PAUSED_FOR = (
    _PRELUDE
    + """
local until_ = tonumber(redis.call('GET', KEYS[1]) or '')
if not until_ or until_ <= now then return '0' end
return fmt(until_ - now)
"""
)

# -- sliding windows (retry budget, circuit breaker) ------------------------------------------
# A window is hash fields `a<i>` / `b<i>` for bucket index i = floor(now / width), plus
# `w` = width; buckets older than BUCKETS are pruned. Same layout as `_Window`.
_WINDOW = """
local BUCKETS = 10
local function win_prune(key, width)
  local current = math.floor(now / width)
  local oldest = current - BUCKETS + 1
  local fields = redis.call('HKEYS', key)
  for _, f in ipairs(fields) do
    local kind = string.sub(f, 1, 1)
    if kind == 'a' or kind == 'b' then
      local i = tonumber(string.sub(f, 2))
      if i and i < oldest then redis.call('HDEL', key, f) end
    end
  end
  return current
end
local function win_totals(key, width)
  local current = math.floor(now / width)
  local oldest = current - BUCKETS + 1
  local flat = redis.call('HGETALL', key)
  local a, b = 0, 0
  for j = 1, #flat, 2 do
    local f = flat[j]
    local kind = string.sub(f, 1, 1)
    if kind == 'a' or kind == 'b' then
      local i = tonumber(string.sub(f, 2))
      if i and i >= oldest then
        if kind == 'a' then a = a + tonumber(flat[j + 1]) else b = b + tonumber(flat[j + 1]) end
      end
    end
  end
  return a, b
end
local function win_add(key, width, a, b)
  local current = win_prune(key, width)
  if a ~= 0 then redis.call('HINCRBY', key, 'a' .. current, a) end
  if b ~= 0 then redis.call('HINCRBY', key, 'b' .. current, b) end
end
"""

# KEYS: budget.  ARGV: now, window, retry (0/1).
BUDGET_RECORD = (
    _PRELUDE
    + _WINDOW
    + """
local window = tonumber(ARGV[2])
local width = window / BUCKETS
local stored = tonumber(redis.call('HGET', KEYS[1], 'w') or '')
if stored ~= width then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'w', fmt(width))
end
if ARGV[3] == '1' then win_add(KEYS[1], width, 0, 1) else win_add(KEYS[1], width, 1, 0) end
redis.call('PEXPIRE', KEYS[1], px(window))
return 1
"""
)

# KEYS: budget.  ARGV: now, window, ratio, min_per_second.
# Returns 1 and counts one retry when the budget allows it, else 0 (nothing changes).
BUDGET_TRY_RETRY = (
    _PRELUDE
    + _WINDOW
    + """
local window = tonumber(ARGV[2])
local ratio = tonumber(ARGV[3])
local floor_ = tonumber(ARGV[4]) * window
local width = window / BUCKETS
local stored = tonumber(redis.call('HGET', KEYS[1], 'w') or '')
local requests, retries = 0, 0
if stored == width then requests, retries = win_totals(KEYS[1], width) end
if retries >= ratio * requests + floor_ then return 0 end
if stored ~= width then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'w', fmt(width))
end
win_add(KEYS[1], width, 0, 1)
redis.call('PEXPIRE', KEYS[1], px(window))
return 1
"""
)

# -- circuit breaker ----------------------------------------------------------------------------
# One hash per circuit: st (closed|open|half_open), ou (open until), w (window width),
# a<i>/b<i> (window: total, failures), ta/tp (trials admitted/passed), lt (last trial).
# No key means closed with an empty window (so closing is a DEL). ARGV after now:
# window, min_requests, failure_rate, open_for, half_open_requests[, ...].
_CIRCUIT = """
local cb_window = tonumber(ARGV[2])
local cb_min = tonumber(ARGV[3])
local cb_rate = tonumber(ARGV[4])
local cb_open_for = tonumber(ARGV[5])
local cb_trials = tonumber(ARGV[6])
local HALF_OPEN_RETRY_AFTER = 1.0
local function cb_ttl() return px((cb_open_for + cb_window) * 2 + 60) end
local function cb_open(key)
  redis.call('DEL', key)
  redis.call('HSET', key, 'st', 'open', 'ou', fmt(now + cb_open_for), 'ta', 0, 'tp', 0)
  redis.call('PEXPIRE', key, cb_ttl())
end
"""

# KEYS: circuit.  Returns {allowed, state, trial, retry_after}.
CIRCUIT_ADMIT = (
    _PRELUDE
    + _CIRCUIT
    + """
local key = KEYS[1]
local st = redis.call('HGET', key, 'st')
if not st or st == 'closed' then return {1, 'closed', 0, '0'} end
if st == 'open' then
  local ou = tonumber(redis.call('HGET', key, 'ou'))
  if now < ou then return {0, 'open', 0, fmt(ou - now)} end
  redis.call('DEL', key)
  redis.call('HSET', key, 'st', 'half_open', 'ta', 0, 'tp', 0, 'lt', '0')
  st = 'half_open'
end
local ta = tonumber(redis.call('HGET', key, 'ta') or '0')
local tp = tonumber(redis.call('HGET', key, 'tp') or '0')
local lt = tonumber(redis.call('HGET', key, 'lt') or '0')
if ta >= cb_trials and now - lt >= cb_open_for then
  ta = tp
  redis.call('HSET', key, 'ta', ta)
end
if ta < cb_trials then
  redis.call('HSET', key, 'ta', ta + 1, 'lt', fmt(now))
  redis.call('PEXPIRE', key, cb_ttl())
  return {1, 'half_open', 1, '0'}
end
redis.call('PEXPIRE', key, cb_ttl())
return {0, 'half_open', 0, fmt(HALF_OPEN_RETRY_AFTER)}
"""
)

# KEYS: circuit.  ARGV: ..., failure (0/1), trial (0/1).  Returns {before, after}.
CIRCUIT_RECORD = (
    _PRELUDE
    + _CIRCUIT
    + _WINDOW
    + """
local key = KEYS[1]
local failure = ARGV[7] == '1'
local trial = ARGV[8] == '1'
local before = redis.call('HGET', key, 'st') or 'closed'
if trial then
  if before ~= 'half_open' then return {before, before} end
  if failure then
    cb_open(key)
    return {before, 'open'}
  end
  local tp = redis.call('HINCRBY', key, 'tp', 1)
  if tp >= cb_trials then
    redis.call('DEL', key)
    return {before, 'closed'}
  end
  redis.call('PEXPIRE', key, cb_ttl())
  return {before, 'half_open'}
end
if before ~= 'closed' then return {before, before} end
local width = cb_window / BUCKETS
local stored = tonumber(redis.call('HGET', key, 'w') or '')
if stored ~= width then
  redis.call('DEL', key)
  redis.call('HSET', key, 'st', 'closed', 'w', fmt(width))
end
if failure then win_add(key, width, 1, 1) else win_add(key, width, 1, 0) end
local total, failures = win_totals(key, width)
if total >= cb_min and failures >= cb_rate * total - 1e-9 then
  cb_open(key)
  return {before, 'open'}
end
redis.call('PEXPIRE', key, px(cb_window))
return {before, 'closed'}
"""
)

# KEYS: circuit.
CIRCUIT_RELEASE = (
    _PRELUDE
    + """
local key = KEYS[1]
if redis.call('HGET', key, 'st') ~= 'half_open' then return 0 end
local ta = tonumber(redis.call('HGET', key, 'ta') or '0')
local tp = tonumber(redis.call('HGET', key, 'tp') or '0')
if ta > tp then redis.call('HSET', key, 'ta', ta - 1) return 1 end
return 0
"""
)

# KEYS: circuit.  Returns the state a caller would meet now.
CIRCUIT_STATE = (
    _PRELUDE
    + """
local st = redis.call('HGET', KEYS[1], 'st')
if not st then return 'closed' end
if st == 'open' and now >= tonumber(redis.call('HGET', KEYS[1], 'ou')) then return 'half_open' end
return st
"""
)

# -- idempotency and fingerprint records -----------------------------------------------------------
# One hash per record:
#   s    in_flight | in_doubt | completed
#   fp   the request fingerprint the record belongs to
#   exp  the end of the record's life (logical expiry; the key's PEXPIRE is a little later)
#   lk   in flight: the end of the owner's lock
#   o    in flight: the owner token ("" = none: never matches a claim, see IDEM_CLAIM)
#   r    completed: the stored answer
# Records written by older versions have no `lk` and no `o`: their `exp` is the lock of an
# in-flight record (it then simply expires when the lock ends, as it did) or the end of a
# completed one, and they read the same as before (never in doubt, owned by nobody).

# KEYS: record.  ARGV: now, fingerprint, lock_ttl, ttl, owner, dedupes (0/1).
# Returns {state[, response]}: new | in_flight | in_doubt | completed | mismatch.
IDEM_CLAIM = (
    _PRELUDE
    + """
local key = KEYS[1]
local fp = ARGV[2]
local lock_ttl = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl < 0 then ttl = 0 end
local owner = ARGV[5]
local dedupes = ARGV[6] == '1'
local function take()
  redis.call('DEL', key)
  if lock_ttl > 0 then
    local life = lock_ttl + ttl
    redis.call('HSET', key, 's', 'in_flight', 'fp', fp, 'o', owner, 'lk', fmt(now + lock_ttl), 'exp', fmt(now + life))
    redis.call('PEXPIRE', key, px(life))
  end
  return {'new'}
end
local cur = redis.call('HMGET', key, 's', 'fp', 'exp', 'lk', 'o')
local exp = tonumber(cur[3] or '')
if not cur[1] or not exp or exp <= now then return take() end
if cur[2] ~= fp then return {'mismatch'} end
local s = cur[1]
if s == 'completed' then return {'completed', redis.call('HGET', key, 'r')} end
if s == 'in_flight' then
  if owner ~= '' and cur[5] == owner then
    -- the owner claims again (its first reply was lost): still its claim, lock renewed
    if lock_ttl > 0 then
      local life = math.max(exp, now + lock_ttl + ttl)
      redis.call('HSET', key, 'lk', fmt(now + lock_ttl), 'exp', fmt(life))
      redis.call('PEXPIRE', key, px(life - now))
    end
    return {'new'}
  end
  local lk = tonumber(cur[4] or '') or exp
  if lk > now then return {'in_flight', cur[5] or ''} end
  -- the lock lapsed without an outcome: in doubt for the rest of the record's life
  redis.call('HSET', key, 's', 'in_doubt')
  redis.call('HDEL', key, 'lk', 'o')
end
if dedupes then return take() end
return {'in_doubt'}
"""
)

# KEYS: record.  ARGV: now, response blob, ttl, fingerprint, owner.  Returns 1 if stored.
# A live completed record is kept (the first answer wins); an in-flight or in-doubt one
# (any owner) becomes completed; a missing one is stored under `fingerprint` (nothing
# when it is ""). A live record of another fingerprint is left alone: its answer must
# never be replayed to a different request.
IDEM_COMPLETE = (
    _PRELUDE
    + """
local key = KEYS[1]
local ttl = tonumber(ARGV[3])
local fp = ARGV[4]
local cur = redis.call('HMGET', key, 's', 'fp', 'exp')
local exp = tonumber(cur[3] or '')
if cur[1] and exp and exp > now then
  if cur[1] == 'completed' then return 0 end
  if fp ~= '' and cur[2] and cur[2] ~= fp then return 0 end
  fp = cur[2] or fp
elseif fp == '' then
  return 0
end
redis.call('DEL', key)
if ttl <= 0 then return 0 end
redis.call('HSET', key, 's', 'completed', 'fp', fp, 'exp', fmt(now + ttl), 'r', ARGV[2])
redis.call('PEXPIRE', key, px(ttl))
return 1
"""
)

# KEYS: record.  ARGV: now, owner.  The in-flight record of `owner` (whose replica stopped
# sending heartbeats: it died) becomes in doubt for the rest of its life.  Returns 1 if so.
IDEM_DOUBT = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', KEYS[1], 's', 'o')
if cur[1] ~= 'in_flight' or cur[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 's', 'in_doubt')
redis.call('HDEL', KEYS[1], 'lk', 'o')
return 1
"""
)

# KEYS: record.  ARGV: now, owner.  Deletes a live in-flight record owned by `owner`;
# owner "" (older callers) matches any owner whose lock has not lapsed.  Returns 1 if deleted.
IDEM_RELEASE = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', KEYS[1], 's', 'exp', 'lk', 'o')
local exp = tonumber(cur[2] or '')
if cur[1] ~= 'in_flight' or not exp or exp <= now then return 0 end
local owner = ARGV[2]
if owner == '' then
  local lk = tonumber(cur[3] or '') or exp
  if lk <= now then return 0 end
elseif cur[4] ~= owner then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"""
)

# -- cache, kv and the failover routing ledger: a value with a logical expiry ----------------------

# KEYS: record.  ARGV: now.  Returns the value or nil.
VALUE_GET = (
    _PRELUDE
    + """
local cur = redis.call('HMGET', KEYS[1], 'exp', 'v')
local exp = tonumber(cur[1] or '')
if not exp or exp <= now then return false end
return cur[2]
"""
)

# KEYS: record.  ARGV: now, value, ttl.
VALUE_SET = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
if ttl <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'exp', fmt(now + ttl), 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[1], px(ttl))
return 1
"""
)

# -- replica heartbeat (for the local share of the rate while Redis is away) ---------------------

# KEYS: replicas zset.  ARGV: now, replica id, ttl.  Returns the number of live replicas.
HEARTBEAT = (
    _PRELUDE
    + """
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], px(ttl))
return redis.call('ZCARD', KEYS[1])
"""
)

ALL: dict[str, str] = {
    "rate_take": RATE_TAKE,
    "pause": PAUSE,
    "paused_for": PAUSED_FOR,
    "budget_record": BUDGET_RECORD,
    "budget_try_retry": BUDGET_TRY_RETRY,
    "circuit_admit": CIRCUIT_ADMIT,
    "circuit_record": CIRCUIT_RECORD,
    "circuit_release": CIRCUIT_RELEASE,
    "circuit_state": CIRCUIT_STATE,
    "idem_claim": IDEM_CLAIM,
    "idem_complete": IDEM_COMPLETE,
    "idem_release": IDEM_RELEASE,
    "idem_doubt": IDEM_DOUBT,
    "value_get": VALUE_GET,
    "value_set": VALUE_SET,
    "heartbeat": HEARTBEAT,
}
