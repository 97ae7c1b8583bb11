-- Applies one registry batch atomically and decides its transitions.
--
-- KEYS: none. Every key is derived from ARGV[1] (the prefix), so one
--   script call touches many users and rooms; for Redis Cluster, give the
--   prefix a hash tag ("{presence}") so all keys share one slot.
-- ARGV[1] prefix, ARGV[2] node id, then the ops, each a code and its args:
--   C user            a connection of user came up
--   D user            a connection of user went away
--   J room user       a connection of user joined room
--   L room user       a connection of user left room
--   M room            read room's members
--   P n user1..usern  read n users' presence
--   A user conn meta  record connection conn of user on this node ("" = no
--                     metadata); a non-empty meta becomes the user's meta
--   X user conn       forget that record
-- Returns one entry per op, in order:
--   C -> seq if the user went online, else 0
--   D -> {seq, last_seen_ms} if the user went offline, else {0, 0}
--   J -> {1 if the user's first connection in room else 0, member, meta, ...}
--   L -> 1 if the user's last connection left room, else 0
--   M -> {member, meta, ...}   (meta: the member's P:user:U meta, "" if none)
--   P -> {online 0|1, seq, ...} two integers per user
--   A, X -> 1
-- Keys written: P:connections (live connections, cluster-wide), P:users, P:node:N:users, P:room:R, P:node:N:rooms
-- (field "room user": neither may contain a space), P:user:U (seq,
-- last_seen, meta), P:user:U:conns (conn -> "node since_ms[ meta]").

local p = ARGV[1]
local node = ARGV[2]
local users = p .. ':users'
local node_users = p .. ':node:' .. node .. ':users'
local node_rooms = p .. ':node:' .. node .. ':rooms'

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

-- Decrements field in hash; deletes it at or below zero. Returns the new count.
local function decr(key, field)
  local n = redis.call('HINCRBY', key, field, -1)
  if n <= 0 then
    redis.call('HDEL', key, field)
  end
  return n
end

-- Room members, each followed by their metadata ("" when none).
local function snapshot(rkey)
  local r = {}
  for _, m in ipairs(redis.call('HKEYS', rkey)) do
    r[#r + 1] = m
    r[#r + 1] = redis.call('HGET', p .. ':user:' .. m, 'meta') or ''
  end
  return r
end

local out = {}
local i = 3
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'C' then
    local u = ARGV[i + 1]
    i = i + 2
    redis.call('HINCRBY', node_users, u, 1)
    redis.call('INCR', p .. ':connections')
    if redis.call('HINCRBY', users, u, 1) == 1 then
      out[#out + 1] = redis.call('HINCRBY', p .. ':user:' .. u, 'seq', 1)
    else
      out[#out + 1] = 0
    end
  elseif op == 'D' then
    local u = ARGV[i + 1]
    i = i + 2
    decr(node_users, u)
    -- Below zero means the store lost this user's count (Redis restarted
    -- empty): there is no online to undo, so no event.
    local left = decr(users, u)
    if left >= 0 then
      redis.call('DECR', p .. ':connections')
    end
    if left == 0 then
      local ukey = p .. ':user:' .. u
      redis.call('HSET', ukey, 'last_seen', now_ms)
      out[#out + 1] = {redis.call('HINCRBY', ukey, 'seq', 1), now_ms}
    else
      out[#out + 1] = {0, 0}
    end
  elseif op == 'J' then
    local room, u = ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    local rkey = p .. ':room:' .. room
    redis.call('HINCRBY', node_rooms, room .. ' ' .. u, 1)
    local first = redis.call('HINCRBY', rkey, u, 1) == 1 and 1 or 0
    local r = snapshot(rkey)
    table.insert(r, 1, first)
    out[#out + 1] = r
  elseif op == 'L' then
    local room, u = ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    decr(node_rooms, room .. ' ' .. u)
    out[#out + 1] = decr(p .. ':room:' .. room, u) == 0 and 1 or 0
  elseif op == 'M' then
    out[#out + 1] = snapshot(p .. ':room:' .. ARGV[i + 1])
    i = i + 2
  elseif op == 'P' then
    local n = tonumber(ARGV[i + 1])
    local r = {}
    for k = 1, n do
      local u = ARGV[i + 1 + k]
      r[#r + 1] = redis.call('HEXISTS', users, u)
      r[#r + 1] = tonumber(redis.call('HGET', p .. ':user:' .. u, 'seq') or 0)
    end
    out[#out + 1] = r
    i = i + 2 + n
  elseif op == 'A' then
    local u, conn, meta = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    i = i + 4
    local record = node .. ' ' .. now_ms
    if meta ~= '' then
      record = record .. ' ' .. meta
      redis.call('HSET', p .. ':user:' .. u, 'meta', meta)
    end
    redis.call('HSET', p .. ':user:' .. u .. ':conns', conn, record)
    out[#out + 1] = 1
  elseif op == 'X' then
    redis.call('HDEL', p .. ':user:' .. ARGV[i + 1] .. ':conns', ARGV[i + 2])
    i = i + 3
    out[#out + 1] = 1
  else
    return redis.error_reply('ERR presenced batch: unknown op ' .. tostring(op))
  end
end
return out
