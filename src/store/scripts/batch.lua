-- Applies one registry batch atomically, decides its transitions and
-- publishes them. Runs after common.lua.
--
-- KEYS: none. Every key is derived from ARGV[1] (the prefix), so one call
--   touches many users and rooms; for Redis Cluster, give the prefix a
--   hash tag ("{presence}") so all keys share one slot.
-- ARGV[1] prefix, ARGV[2] node id, ARGV[3] lease length ms, ARGV[4] "1" to
--   require this node's lease (see below), ARGV[5] the ops: a MessagePack
--   array of arrays, each its code and its arguments (store/redis/codec.rs
--   writes them; nil is "none"):
--   {'C', user}              a connection of user came up
--   {'D', user, reason}      a connection of user went away
--   {'J', room, user}        a connection of user joined room
--   {'L', room, user, reason}  a connection of user left room
--   {'M', room}              read room's members
--   {'P', {user...}}         read these users' presence
--   {'A', user, conn, meta}  record connection conn of user on this node
--                            (again: new metadata, same since_ms); a meta
--                            becomes the user's meta
--   {'X', user, conn}        forget that record
--   {'R', {{user, conn, meta}...}, {{room, user, count}...}, reason}
--                            make this node's contribution exactly that
--                            (see reassert below; reason: of the offline
--                            and left events it takes) and renew its lease
-- A batch that writes (and does not start with R) asks for the lease check:
-- it is refused with a NOLEASE error, before any write, when this node has
-- no lease (it was reaped as dead, or Redis lost its data): the node must
-- reassert first, or its counts would go wrong. Reads need no lease.
-- Returns MessagePack {feed number before the first event, {outcome...}},
-- one outcome per op: {e = {event...}, m = {member...}, p = {presence...}}
--   e: the events the op published, as on the channel (every op)
--   m: J, M: the room's members after the op, each {user = u, meta = m}
--   p: P: per user, in order, {online = bool, seq = n}

local lease_ms = tonumber(ARGV[3])
local node_users = key.node_users(node)
local node_rooms = key.node_rooms(node)

if ARGV[4] == '1' and not redis.call('ZSCORE', key.nodes(), node) then
  return redis.error_reply('NOLEASE node ' .. node .. ' has no lease')
end

-- Room members, each with their metadata.
local function snapshot(room)
  local r = {}
  for _, m in ipairs(redis.call('HKEYS', key.room(room))) do
    r[#r + 1] = {user = m, meta = redis.call('HGET', key.user(m), 'meta') or nil}
  end
  return r
end

local function record(u, conn, meta, since)
  redis.call('HSET', key.user_conns(u), conn, conn_record(node, since, meta))
  if meta then
    redis.call('HSET', key.user(u), 'meta', meta)
  end
end

-- Makes this node's contribution to the shared counts exactly what it
-- holds: for each user and (room, user), the difference between what the
-- node's bookkeeping says and what it really has is added to the shared
-- count, and a count crossing zero is a transition. Connection records of
-- this node are rewritten; records of connections it still holds keep
-- their since_ms.
local function reassert(want_users, want_conns, want_rooms, reason)
  local have_rooms = counts(node_rooms)
  local fields = {}
  for f in pairs(have_rooms) do fields[f] = true end
  for f in pairs(want_rooms) do fields[f] = true end
  for f in pairs(fields) do
    local delta = (want_rooms[f] or 0) - (have_rooms[f] or 0)
    if delta ~= 0 then
      local room, u = split_room_field(f)
      local before, after = add(key.room(room), u, delta)
      if before <= 0 and after > 0 then
        publish(event.joined(room, u))
      elseif before > 0 and after <= 0 then
        publish(event.left(room, u, reason))
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
      local before, after = add(key.users(), u, delta)
      redis.call('INCRBY', key.connections(), math.max(after, 0) - math.max(before, 0))
      if before <= 0 and after > 0 then
        went_online(u)
      elseif before > 0 and after <= 0 then
        went_offline(u, reason)
      end
    end
    -- This node's connection records of u: drop the gone, add the new.
    local mine = want_conns[u] or {}
    local present = drop_conn_records(u, node, mine)
    for conn, meta in pairs(mine) do
      if not present[conn] then
        record(u, conn, meta or nil, now_ms)
      end
    end
  end
  redis.call('DEL', node_users)
  for u, n in pairs(want_users) do
    redis.call('HSET', node_users, u, n)
  end
  redis.call('ZADD', key.nodes(), now_ms + lease_ms, node)
end

local outcomes = {}
for _, op in ipairs(cmsgpack.unpack(ARGV[5])) do
  local code = op[1]
  local out = {}
  if code == 'C' then
    local u = op[2]
    redis.call('HINCRBY', node_users, u, 1)
    redis.call('INCR', key.connections())
    if redis.call('HINCRBY', key.users(), u, 1) == 1 then
      went_online(u)
    end
  elseif code == 'D' then
    local u, reason = op[2], op[3]
    add(node_users, u, -1)
    -- Below zero means the store lost this user's count (Redis restarted
    -- empty): there is no online to undo, so no event.
    local _, left = add(key.users(), u, -1)
    if left >= 0 then
      redis.call('DECR', key.connections())
    end
    if left == 0 then
      went_offline(u, reason)
    end
  elseif code == 'J' then
    local room, u = op[2], op[3]
    redis.call('HINCRBY', node_rooms, room_field(room, u), 1)
    if redis.call('HINCRBY', key.room(room), u, 1) == 1 then
      publish(event.joined(room, u))
    end
    out.m = snapshot(room)
  elseif code == 'L' then
    local room, u, reason = op[2], op[3], op[4]
    add(node_rooms, room_field(room, u), -1)
    local _, left_in_room = add(key.room(room), u, -1)
    if left_in_room == 0 then
      publish(event.left(room, u, reason))
    end
  elseif code == 'M' then
    out.m = snapshot(op[2])
  elseif code == 'P' then
    local r = {}
    for _, u in ipairs(op[2]) do
      r[#r + 1] = {
        online = redis.call('HEXISTS', key.users(), u) == 1,
        seq = tonumber(redis.call('HGET', key.user(u), 'seq') or 0),
      }
    end
    out.p = r
  elseif code == 'A' then
    local u, conn, meta = op[2], op[3], op[4]
    -- Attaching a recorded connection again (new metadata from a join)
    -- keeps its since_ms.
    local old = redis.call('HGET', key.user_conns(u), conn)
    record(u, conn, meta, old and read_conn_record(old).since_ms or now_ms)
  elseif code == 'X' then
    redis.call('HDEL', key.user_conns(op[2]), op[3])
  elseif code == 'R' then
    local want_users, want_conns, want_rooms = {}, {}, {}
    for _, c in ipairs(op[2]) do
      local u, conn, meta = c[1], c[2], c[3]
      want_users[u] = (want_users[u] or 0) + 1
      want_conns[u] = want_conns[u] or {}
      -- false, not nil: a connection without metadata is still held.
      want_conns[u][conn] = meta or false
    end
    for _, r in ipairs(op[3]) do
      want_rooms[room_field(r[1], r[2])] = r[3]
    end
    reassert(want_users, want_conns, want_rooms, op[4])
  else
    return redis.error_reply('ERR presenced batch: unknown op ' .. tostring(code))
  end
  out.e = take_decided()
  outcomes[#outcomes + 1] = out
end
published()
return cmsgpack.pack({base, outcomes})
