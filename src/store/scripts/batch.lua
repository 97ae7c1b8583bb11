-- Applies one registry batch atomically, decides its transitions and
-- publishes them. Runs after common.lua.
--
-- KEYS: none. Every key is derived from ARGV[1] (the prefix), so one
--   script call touches many users and rooms; for Redis Cluster, give the
--   prefix a hash tag ("{presence}") so all keys share one slot.
-- ARGV[1] prefix, ARGV[2] node id, ARGV[3] lease length ms, ARGV[4] "1" to
-- require this node's lease (see below), then the ops, each a code and its
-- args:
--   C user            a connection of user came up
--   D user reason     a connection of user went away
--   J room user       a connection of user joined room
--   L room user reason  a connection of user left room
--   M room            read room's members
--   P n user1..usern  read n users' presence
--   A user conn meta  record connection conn of user on this node ("" = no
--                     metadata; again: new metadata, same since_ms); a
--                     non-empty meta becomes the user's meta
--   X user conn       forget that record
--   R n (user conn meta)*n m (room user count)*m reason
--                     make this node's contribution exactly that (see
--                     reassert below; reason: of the offline and left
--                     events it takes) and renew its lease
-- A batch that writes (and does not start with R) asks for the lease check:
-- it is refused with a NOLEASE error, before any write, when this node has
-- no lease (it was reaped as dead, or Redis lost its data): the node must
-- reassert first, or its counts would go wrong. Reads need no lease.
-- Returns {feed seq before the first event, outcome per op...}:
--   C -> seq if the user went online, else 0
--   D -> {seq, last_seen_ms} if the user went offline, else {0, 0}
--   J -> {1 if the user's first connection in room else 0, member, meta, ...}
--   L -> 1 if the user's last connection left room, else 0
--   M -> {member, meta, ...}   (meta: the member's P:user:U meta, "" if none)
--   P -> {online 0|1, seq, ...} two integers per user
--   A, X -> 1
--   R -> {event, ...} the events it published (as on the channel)
-- Every transition is published on P:events as "seq kind args", seq from
-- the P:events:seq counter:
--   "N online user useq", "N offline user useq last_seen reason",
--   "N joined room user", "N left room user reason".
-- Keys written: P:connections (live connections, cluster-wide), P:users,
-- P:node:N:users, P:room:R, P:node:N:rooms (field "room user": neither may
-- contain a space), P:user:U (seq, last_seen, meta), P:user:U:conns
-- (conn -> "node since_ms[ meta]"), P:nodes, P:events:seq.

local lease_ms = tonumber(ARGV[3])
local node_users = p .. ':node:' .. node .. ':users'
local node_rooms = p .. ':node:' .. node .. ':rooms'

if ARGV[4] == '1' and not redis.call('ZSCORE', p .. ':nodes', node) then
  return redis.error_reply('NOLEASE node ' .. node .. ' has no lease')
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

-- Makes this node's contribution to the shared counts exactly what it
-- holds: for each user and (room, user), the difference between what the
-- node's bookkeeping says and what it really has is added to the shared
-- count, and a count crossing zero is a transition. Connection records of
-- this node are rewritten; records of connections it still holds keep
-- their since_ms.
local function reassert(want_users, want_conns, want_rooms, reason)
  local events = {}
  local have_rooms = counts(node_rooms)
  local fields = {}
  for f in pairs(have_rooms) do fields[f] = true end
  for f in pairs(want_rooms) do fields[f] = true end
  for f in pairs(fields) do
    local delta = (want_rooms[f] or 0) - (have_rooms[f] or 0)
    if delta ~= 0 then
      local room, u = string.match(f, '^(%S+) (%S+)$')
      local before, after = add(p .. ':room:' .. room, u, delta)
      if before <= 0 and after > 0 then
        events[#events + 1] = publish('joined ' .. room .. ' ' .. u)
      elseif before > 0 and after <= 0 then
        events[#events + 1] = publish('left ' .. room .. ' ' .. u .. ' ' .. reason)
      end
    end
  end
  redis.call('DEL', node_rooms)
  for f, n in pairs(want_rooms) do
    redis.call('HSET', node_rooms, f, n)
  end

  local have_users = counts(node_users)
  local all = {}
  for u in pairs(have_users) do all[u] = true end
  for u in pairs(want_users) do all[u] = true end
  for u in pairs(all) do
    local delta = (want_users[u] or 0) - (have_users[u] or 0)
    if delta ~= 0 then
      local before, after = add(users, u, delta)
      redis.call('INCRBY', p .. ':connections', math.max(after, 0) - math.max(before, 0))
      if before <= 0 and after > 0 then
        events[#events + 1] = 'online ' .. u .. ' ' .. went_online(u)
      elseif before > 0 and after <= 0 then
        local _, event = went_offline(u, reason)
        events[#events + 1] = event
      end
    end
    -- This node's connection records of u: drop the gone, add the new.
    local ckey = p .. ':user:' .. u .. ':conns'
    local flat = redis.call('HGETALL', ckey)
    local mine = want_conns[u] or {}
    local present = {}
    for k = 1, #flat, 2 do
      local conn, record = flat[k], flat[k + 1]
      if mine[conn] ~= nil then
        present[conn] = true
      elseif string.sub(record, 1, #node + 1) == node .. ' ' then
        redis.call('HDEL', ckey, conn)
      end
    end
    for conn, meta in pairs(mine) do
      if not present[conn] then
        local record = node .. ' ' .. now_ms
        if meta ~= '' then
          record = record .. ' ' .. meta
          redis.call('HSET', p .. ':user:' .. u, 'meta', meta)
        end
        redis.call('HSET', ckey, conn, record)
      end
    end
  end
  redis.call('DEL', node_users)
  for u, n in pairs(want_users) do
    redis.call('HSET', node_users, u, n)
  end
  redis.call('ZADD', p .. ':nodes', now_ms + lease_ms, node)
  return events
end

local out = {base}
local i = 5
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'C' then
    local u = ARGV[i + 1]
    i = i + 2
    redis.call('HINCRBY', node_users, u, 1)
    redis.call('INCR', p .. ':connections')
    if redis.call('HINCRBY', users, u, 1) == 1 then
      out[#out + 1] = went_online(u)
    else
      out[#out + 1] = 0
    end
  elseif op == 'D' then
    local u, reason = ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    add(node_users, u, -1)
    -- Below zero means the store lost this user's count (Redis restarted
    -- empty): there is no online to undo, so no event.
    local _, left = add(users, u, -1)
    if left >= 0 then
      redis.call('DECR', p .. ':connections')
    end
    if left == 0 then
      local s = went_offline(u, reason)
      out[#out + 1] = {s, now_ms}
    else
      out[#out + 1] = {0, 0}
    end
  elseif op == 'J' then
    local room, u = ARGV[i + 1], ARGV[i + 2]
    i = i + 3
    local rkey = p .. ':room:' .. room
    redis.call('HINCRBY', node_rooms, room .. ' ' .. u, 1)
    local first = redis.call('HINCRBY', rkey, u, 1) == 1 and 1 or 0
    if first == 1 then
      publish('joined ' .. room .. ' ' .. u)
    end
    local r = snapshot(rkey)
    table.insert(r, 1, first)
    out[#out + 1] = r
  elseif op == 'L' then
    local room, u, reason = ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    i = i + 4
    add(node_rooms, room .. ' ' .. u, -1)
    local _, left_in_room = add(p .. ':room:' .. room, u, -1)
    if left_in_room == 0 then
      publish('left ' .. room .. ' ' .. u .. ' ' .. reason)
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
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
    local ckey = p .. ':user:' .. u .. ':conns'
    -- Attaching a recorded connection again (new metadata from a join)
    -- keeps its since_ms.
    local old = redis.call('HGET', ckey, conn)
    local since = old and string.match(old, '^%S+ (%d+)') or now_ms
    local record = node .. ' ' .. since
    if meta ~= '' then
      record = record .. ' ' .. meta
      redis.call('HSET', p .. ':user:' .. u, 'meta', meta)
    end
    redis.call('HSET', ckey, conn, record)
    out[#out + 1] = 1
  elseif op == 'X' then
    redis.call('HDEL', p .. ':user:' .. ARGV[i + 1] .. ':conns', ARGV[i + 2])
    i = i + 3
    out[#out + 1] = 1
  elseif op == 'R' then
    local want_users, want_conns, want_rooms = {}, {}, {}
    local n = tonumber(ARGV[i + 1])
    i = i + 2
    for _ = 1, n do
      local u, conn, meta = ARGV[i], ARGV[i + 1], ARGV[i + 2]
      i = i + 3
      want_users[u] = (want_users[u] or 0) + 1
      want_conns[u] = want_conns[u] or {}
      want_conns[u][conn] = meta
    end
    local m = tonumber(ARGV[i])
    i = i + 1
    for _ = 1, m do
      want_rooms[ARGV[i] .. ' ' .. ARGV[i + 1]] = tonumber(ARGV[i + 2])
      i = i + 3
    end
    local reason = ARGV[i]
    i = i + 1
    out[#out + 1] = reassert(want_users, want_conns, want_rooms, reason)
  else
    return redis.error_reply('ERR presenced batch: unknown op ' .. tostring(op))
  end
end
published()
return out
