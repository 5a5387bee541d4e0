"""
The Lua scripts of `usercontext.redis.RedisQuota`: acquire, release, leave
(a waiter that stops waiting) and renew, each run atomically by Redis.

Every script reads the time from the Redis server (``TIME``), never from a
client, so the leases of processes whose clocks disagree expire on one clock.

Keys, for the *prefix* ``usercontext`` and user ``u``:

- With no total limit, every key of one user shares the hash tag
  ``{usercontext:u}``: ``{usercontext:u}:h`` (held leases, a sorted set of
  lease id -> expiry in ms), ``:q`` (the wait queue, waiter id -> ticket),
  ``:w`` (waiter id -> expiry in ms), ``:g`` (the fencing token of a slot
  handed to a waiter, until it is released) and ``:seq`` (the counter of
  tickets and fencing tokens).
- With a total limit, all keys share the hash tag ``{usercontext}``:
  ``{usercontext}:h:u``, ``{usercontext}:q:u`` ... per user, and
  ``{usercontext}:all`` (every held lease, ``id|user`` -> expiry),
  ``{usercontext}:ring`` (users with waiters, in round-robin order) and
  ``{usercontext}:seq``.

A key is given the lease time to live at every write that adds to it, so a
user with nothing held or waiting leaves nothing behind once its last lease
or waiter expires; an emptied sorted set is deleted by Redis at once.

The counter ``seq`` never goes back, even after it expired: each value is at
least the server's time in microseconds, so tickets and fencing tokens grow
as long as the Redis server's clock does not step back.

The quota's fixed settings (prefix, limits, time to live, wake-up channel)
are written into the text of its scripts by `build`, so a call sends only
what changes: the lease key of the user it is called for, in ``KEYS[1]``
(the key by which a cluster routes the call; the user's name is read back
from it), and the lease or waiter id. Every other key a script touches
shares that key's hash tag, and so its cluster slot: under a total limit, a
release may hand a slot to another user's waiter, whose keys are built in the
script. Processes with the same settings share the same scripts.

The common case takes a short path before any helper is defined: an acquire
of a user with no queue and room left (counting expired leases, which only
makes it take the long path sooner), and a release with no queue, run the
few commands they need; under a total limit every call takes the long path.
"""

from __future__ import annotations


__all__ = ["build"]

# The settings, written in by `build`.
_SETTINGS = r"""
local PREFIX = %(prefix)s
local TOTAL = %(total)d
local LIMIT = %(limit)d
local TTL = %(ttl)d
local CHAN = %(channel)s
local SHARED = %(shared)s
"""

# The time, on the server's clock, read by every script but the short path
# of a release.
_CLOCK = r"""
local clock = redis.call('TIME')
local NOW = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local NOWUS = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
-- Numbers formatted as integers: Redis would print big ones as 1.7e+15.
local function s(n) return string.format('%d', n) end
"""

# The helpers of the long paths, and the user a call is for.
_COMMON = r"""
-- The lease key is {PREFIX}:h:<user> under a total limit, else {PREFIX:<user>}:h.
local user
if SHARED then
  user = string.sub(KEYS[1], #PREFIX + 6)
else
  user = string.sub(KEYS[1], #PREFIX + 3, -4)
end

local function key(kind, user)
  if SHARED then return SHARED .. ':' .. kind .. ':' .. user end
  return '{' .. PREFIX .. ':' .. user .. '}:' .. kind
end

local function next_seq(user)
  local k
  if SHARED then k = SHARED .. ':seq' else k = key('seq', user) end
  local n = tonumber(redis.call('GET', k) or '0') + 1
  if n < NOWUS then n = NOWUS end
  redis.call('SET', k, s(n), 'PX', TTL)
  return n
end

local function total_held()
  return redis.call('ZCARD', SHARED .. ':all')
end

-- Drop the expired leases and waiters of user (of every user under a total
-- limit, whose leases are all in one set); return how many were dropped.
-- Waiters are looked at only if user has a queue (queued true): the queue
-- and the waiters' expiries are written and expire together.
local function purge(user, queued)
  local dropped = 0
  if SHARED then
    local all = SHARED .. ':all'
    local gone = redis.call('ZRANGEBYSCORE', all, '-inf', s(NOW))
    for _, member in ipairs(gone) do
      local cut = string.find(member, '|', 1, true)
      local id, owner = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
      redis.call('ZREM', key('h', owner), id)
      redis.call('HDEL', key('g', owner), id)
    end
    if #gone > 0 then
      redis.call('ZREMRANGEBYSCORE', all, '-inf', s(NOW))
      dropped = #gone
    end
  else
    local h = key('h', user)
    dropped = redis.call('ZREMRANGEBYSCORE', h, '-inf', s(NOW))
    if dropped > 0 and redis.call('EXISTS', key('g', user)) == 1 then
      local g = key('g', user)
      for _, id in ipairs(redis.call('HKEYS', g)) do
        if not redis.call('ZSCORE', h, id) then redis.call('HDEL', g, id) end
      end
    end
  end
  if not queued then return dropped end
  local w = key('w', user)
  local late = redis.call('ZRANGEBYSCORE', w, '-inf', s(NOW))
  if #late > 0 then
    redis.call('ZREM', key('q', user), unpack(late))
    redis.call('ZREM', w, unpack(late))
    dropped = dropped + #late
  end
  return dropped
end

local function grant(user, id)
  local fence = next_seq(user)
  local h = key('h', user)
  redis.call('ZADD', h, s(NOW + TTL), id)
  redis.call('PEXPIRE', h, TTL)
  if SHARED then
    local all = SHARED .. ':all'
    redis.call('ZADD', all, s(NOW + TTL), id .. '|' .. user)
    redis.call('PEXPIRE', all, TTL)
  end
  return fence
end

local function drop(user, id)
  local removed = redis.call('ZREM', key('h', user), id)
  if SHARED then redis.call('ZREM', SHARED .. ':all', id .. '|' .. user) end
  redis.call('HDEL', key('g', user), id)
  return removed
end

-- Delete the counter once nothing is held or waited for: it is backed by
-- the clock, so a new one still counts up from there.
local function tidy(user)
  if SHARED then
    if redis.call('EXISTS', SHARED .. ':all', SHARED .. ':ring') == 0 then
      redis.call('DEL', SHARED .. ':seq')
    end
  elseif redis.call('EXISTS', key('h', user), key('q', user)) == 0 then
    redis.call('DEL', key('seq', user))
  end
end

-- The first waiter of user still alive, taken off the queue; nil if none.
local function pop_alive(user)
  local q, w = key('q', user), key('w', user)
  while true do
    local head = redis.call('ZRANGE', q, 0, 0)
    if #head == 0 then return nil end
    local id = head[1]
    local expiry = redis.call('ZSCORE', w, id)
    redis.call('ZREM', q, id)
    redis.call('ZREM', w, id)
    if expiry and tonumber(expiry) > NOW then return id end
  end
end

-- Grant a slot to waiter id, and wake its process (its id is proc:n).
local function hand(user, id)
  local fence = grant(user, id)
  local g = key('g', user)
  redis.call('HSET', g, id, s(fence))
  redis.call('PEXPIRE', g, TTL)
  local proc = string.sub(id, 1, string.find(id, ':', 1, true) - 1)
  redis.call('PUBLISH', CHAN .. proc, id .. ' ' .. s(fence))
end

-- Grant every waiter that fits: FIFO per user, round-robin across users
-- under the total limit.
local function dispatch(user)
  if not SHARED then
    local h = key('h', user)
    while redis.call('ZCARD', h) < LIMIT do
      local id = pop_alive(user)
      if not id then return end
      hand(user, id)
    end
    return
  end
  local ring = SHARED .. ':ring'
  local progress = true
  while progress do
    progress = false
    local users = redis.call('ZRANGE', ring, 0, -1)
    for _, other in ipairs(users) do
      if total_held() >= TOTAL then return end
      if redis.call('ZCARD', key('h', other)) < LIMIT then
        local id = pop_alive(other)
        if id then
          hand(other, id)
          progress = true
        end
        if redis.call('EXISTS', key('q', other)) == 1 then
          redis.call('ZADD', ring, s(next_seq(other)), other)
        else
          redis.call('ZREM', ring, other)
        end
      elseif redis.call('EXISTS', key('q', other)) == 0 then
        redis.call('ZREM', ring, other)
      end
    end
  end
end
"""

#: KEYS[1]: the lease key of the user. ARGV[1] lease id, [2] "0" not to wait.
#: Returns the fence (a number) when granted, {0, held by user, held in all} when full
#: and not waiting, {2, held by user, held in all} when queued.
_ACQUIRE_SHORT = r"""
if not SHARED then
  local base = string.sub(KEYS[1], 1, -2)
  if redis.call('EXISTS', base .. 'q') == 0 and redis.call('ZCARD', KEYS[1]) < LIMIT then
    local k = base .. 'seq'
    local fence = tonumber(redis.call('GET', k) or '0') + 1
    if fence < NOWUS then fence = NOWUS end
    redis.call('SET', k, s(fence), 'PX', TTL)
    redis.call('ZADD', KEYS[1], s(NOW + TTL), ARGV[1])
    redis.call('PEXPIRE', KEYS[1], TTL)
    return fence
  end
end
"""

_ACQUIRE = r"""
local id = ARGV[1]
local queued = redis.call('EXISTS', key('q', user)) == 1
-- A slot may also have been freed by the expiry of a whole key.
if purge(user, queued) > 0 or queued then
  dispatch(user)
  queued = redis.call('EXISTS', key('q', user)) == 1
end
local n = redis.call('ZCARD', key('h', user))
local all_n = n
if SHARED then all_n = total_held() end
if n < LIMIT and (not SHARED or all_n < TOTAL) and not queued then
  return grant(user, id)
end
if ARGV[2] == '0' then return {0, n, all_n} end
local q, w = key('q', user), key('w', user)
local ticket = next_seq(user)
redis.call('ZADD', q, s(ticket), id)
redis.call('ZADD', w, s(NOW + TTL), id)
redis.call('PEXPIRE', q, TTL)
redis.call('PEXPIRE', w, TTL)
if SHARED then
  local ring = SHARED .. ':ring'
  redis.call('ZADD', ring, 'NX', s(ticket), user)
  redis.call('PEXPIRE', ring, TTL)
end
return {2, n, all_n}
"""

#: KEYS[1]: the lease key of the user. ARGV[1] lease id.
#: Returns 1 if the lease was held, 0 if it had expired and was gone.
_RELEASE_SHORT = r"""
if not SHARED then
  local base = string.sub(KEYS[1], 1, -2)
  local removed = redis.call('ZREM', KEYS[1], ARGV[1])
  if redis.call('EXISTS', base .. 'q') == 0 then
    redis.call('HDEL', base .. 'g', ARGV[1])
    if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('DEL', base .. 'seq') end
    return removed
  end
end
"""

_RELEASE = r"""
local removed = drop(user, ARGV[1])
local queued = redis.call('EXISTS', key('q', user)) == 1
purge(user, queued)
-- Under a total limit, the slot may go to another user's waiter.
if queued or SHARED then dispatch(user) end
tidy(user)
return removed
"""

#: KEYS[1]: the lease key of the user. ARGV[1] waiter id.
#: Returns {0, held by user, held in all} if it was still waiting (now
#: removed) or gone, {2} if a slot granted to it was given back.
_LEAVE = r"""
local id = ARGV[1]
local q = key('q', user)
local queued = redis.call('ZREM', q, id)
redis.call('ZREM', key('w', user), id)
local expiry = redis.call('ZSCORE', key('h', user), id)
if queued == 0 and expiry then
  drop(user, id)
  purge(user, true)
  dispatch(user)
  tidy(user)
  return {2}
end
if SHARED and redis.call('EXISTS', q) == 0 then redis.call('ZREM', SHARED .. ':ring', user) end
tidy(user)
local n = redis.call('ZCARD', key('h', user))
if SHARED then return {0, n, total_held()} end
return {0, n, n}
"""

#: KEYS[1]: the lease key of the first user renewed (every user renewed in
#: one call shares its hash tag). ARGV[1] the number of leases L, then L
#: pairs user, lease id, then pairs user, waiter id.
#: Returns {lost lease ids, {waiter id, fence} pairs flattened, gone waiter ids}.
_RENEW = r"""
local nleases = tonumber(ARGV[1])
local touched = {}
local order = {}
local function touch(u)
  if not touched[u] then
    touched[u] = true
    order[#order + 1] = u
  end
end
for i = 2, #ARGV, 2 do touch(ARGV[i]) end
local dropped = 0
for _, u in ipairs(order) do dropped = dropped + purge(u, true) end
local lost = {}
local later = s(NOW + TTL)
for i = 0, nleases - 1 do
  local u, id = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local h = key('h', u)
  local expiry = redis.call('ZSCORE', h, id)
  if expiry and tonumber(expiry) > NOW then
    redis.call('ZADD', h, 'XX', later, id)
    redis.call('PEXPIRE', h, TTL)
    if SHARED then
      redis.call('ZADD', SHARED .. ':all', 'XX', later, id .. '|' .. u)
      redis.call('PEXPIRE', SHARED .. ':all', TTL)
    end
    if redis.call('EXISTS', key('g', u)) == 1 then redis.call('PEXPIRE', key('g', u), TTL) end
  else
    drop(u, id)
    lost[#lost + 1] = id
    dropped = dropped + 1
  end
end
-- Slots may have been freed by expiry (of a lease, or of a whole key).
for _, u in ipairs(order) do
  dispatch(u)
  if dropped > 0 then tidy(u) end
end
local granted = {}
local gone = {}
for i = 2 + 2 * nleases, #ARGV, 2 do
  local u, id = ARGV[i], ARGV[i + 1]
  local w = key('w', u)
  if redis.call('ZSCORE', w, id) then
    redis.call('ZADD', w, 'XX', later, id)
    redis.call('PEXPIRE', w, TTL)
    redis.call('PEXPIRE', key('q', u), TTL)
    if SHARED then redis.call('PEXPIRE', SHARED .. ':ring', TTL) end
  else
    local fence = redis.call('HGET', key('g', u), id)
    if fence and redis.call('ZSCORE', key('h', u), id) then
      granted[#granted + 1] = id
      granted[#granted + 1] = fence
    else
      gone[#gone + 1] = id
    end
  end
end
return {lost, granted, gone}
"""


def _lua_string(text: str) -> str:
    """
    *text* as a Lua string literal: every byte but ASCII letters and digits
    as a three-digit decimal escape, so no prefix can end the literal or
    change the script.
    """
    return (
        '"'
        + "".join(
            chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\{b:03d}" for b in text.encode()
        )
        + '"'
    )


def build(
    *, prefix: str, per_key: int, total: int | None, ttl_ms: int, channel: str
) -> dict[str, str]:
    """
    Return the texts of the scripts ``ACQUIRE``, ``RELEASE``, ``LEAVE`` and
    ``RENEW`` of a quota with these settings (*channel* is the prefix of the
    wake-up channels of its processes).
    """
    head = _SETTINGS % {
        "prefix": _lua_string(prefix),
        "total": -1 if total is None else total,
        "limit": per_key,
        "ttl": ttl_ms,
        "channel": _lua_string(channel),
        "shared": "nil" if total is None else _lua_string("{" + prefix + "}"),
    }
    return {
        "ACQUIRE": head + _CLOCK + _ACQUIRE_SHORT + _COMMON + _ACQUIRE,
        "RELEASE": head + _RELEASE_SHORT + _CLOCK + _COMMON + _RELEASE,
        "LEAVE": head + _CLOCK + _COMMON + _LEAVE,
        "RENEW": head + _CLOCK + _COMMON + _RENEW,
    }
