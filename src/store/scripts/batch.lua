-- Applies one registry batch atomically, decides its transitions and
-- publishes them. Runs after common.lua.
--
-- KEYS: none. Every key is derived from ARGV[1] (the prefix), so one call
--   touches many users and rooms; for Redis Cluster, give the prefix a
--   hash tag ("{presence}") so all keys share one slot.
-- ARGV[1] prefix, ARGV[2] node id, ARGV[3] offline grace ms (0: none),
--   ARGV[4] lease length ms, ARGV[5] "1" to require this node's lease (see
--   below), ARGV[6] the ops: a MessagePack array of arrays, each its code
--   and its arguments (store/redis/codec.rs writes them; nil is "none";
--   graced: true when a last connection ends after the grace):
--   {'C', user}              a connection of user came up (ends their
--                            grace if they are in one)
--   {'D', user, reason, graced}  a connection of user went away
--   {'J', room, user}        a connection of user joined room (ends the
--                            membership's grace if it is in one)
--   {'L', room, user, reason, graced}  a connection of user left room
--   {'M', room}              read room's members
--   {'U', room, user, conn, state}  conn set user's state in room (a JSON
--                            text; latest wins); only for a member
--   {'P', {user...}}         read these users' presence
--   {'A', user, conn, meta}  record connection conn of user on this node
--                            (again: new metadata, same since_ms); a meta
--                            becomes the user's meta
--   {'X', user, conn}        forget that record
--   {'R', {{user, conn, meta}...}, {{room, user, count}...}, reason}
--                            make this node's contribution exactly that
--                            (see reassert below; reason: of the offline
--                            and left events it takes, after the grace)
--                            and renew its lease
--   {'E'}                    end the graces (any node's) that ran out
-- A batch that writes (and does not start with R) asks for the lease check:
-- it is refused with a NOLEASE error, before any write, when this node has
-- no lease (it was reaped as dead, or Redis lost its data): the node must
-- reassert first, or its counts would go wrong. Reads need no lease.
-- Returns MessagePack {feed number before the first event, {outcome...}},
-- one outcome per op: {e = {event...}, m = {member...}, p = {presence...},
-- t = {name = count...}}
--   e: the events the op published, as on the channel (every op)
--   m: J, M: the room's members after the op, each {user = u, meta = m,
--      state = s}
--      (a member in the grace included)
--   p: P: per user, in order, {online = bool, seq = n} (in the grace:
--      online)
--   t: what it did that is no event, by the names of store::Tally (absent
--      when nothing)

local lease_ms = tonumber(ARGV[4])
-- Most graces of each kind one E ends; it says when more are due.
local EXPIRE_MAX = 1000
local node_users = key.node_users(node)
local node_rooms = key.node_rooms(node)

if ARGV[5] == '1' and not redis.call('ZSCORE', key.nodes(), node) then
  return redis.error_reply('NOLEASE node ' .. node .. ' has no lease')
end

-- Room members, each with their metadata and room state.
local function snapshot(room)
  local r = {}
  local states = redis.call('HGETALL', key.room_state(room))
  local state = {}
  for i = 1, #states, 2 do
    state[states[i]] = states[i + 1]
  end
  for _, m in ipairs(redis.call('HKEYS', key.room(room))) do
    r[#r + 1] = {user = m, meta = redis.call('HGET', key.user(m), 'meta') or nil, state = state[m]}
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
      add_member(room, u, delta, reason, true)
      count('corrected_room_counts')
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
      local before, after = add_user(u, delta, reason, true)
      redis.call('INCRBY', key.connections(), math.max(after, 0) - math.max(before, 0))
      count('corrected_user_counts')
    end
    -- This node's connection records of u: drop the gone, add the new.
    local mine = want_conns[u] or {}
    local present, dropped = drop_conn_records(u, node, mine)
    if dropped > 0 then count('corrected_connections', dropped) end
    for conn, meta in pairs(mine) do
      if not present[conn] then
        record(u, conn, meta or nil, now_ms)
        count('corrected_connections')
      end
    end
  end
  redis.call('DEL', node_users)
  for u, n in pairs(want_users) do
    redis.call('HSET', node_users, u, n)
  end
  redis.call('ZADD', key.nodes(), now_ms + lease_ms, node)
end

-- Ends the graces that ran out, rooms first (a disconnect leaves its rooms
-- before it goes offline). A grace whose count is no longer 0 was ended
-- otherwise (a lost count) and goes silently.
local function expire()
  local rooms = redis.call('ZRANGEBYSCORE', key.room_grace(), '-inf', now_ms, 'LIMIT', 0, EXPIRE_MAX)
  for _, f in ipairs(rooms) do
    redis.call('ZREM', key.room_grace(), f)
    local reason = redis.call('HGET', key.room_grace_reasons(), f)
    redis.call('HDEL', key.room_grace_reasons(), f)
    local room, u = split_room_field(f)
    if redis.call('HGET', key.room(room), u) == '0' then
      forget_member(room, u)
      publish(event.left(room, u, reason))
      count('grace_expired_rooms')
    end
  end
  local users = redis.call('ZRANGEBYSCORE', key.grace(), '-inf', now_ms, 'LIMIT', 0, EXPIRE_MAX)
  for _, u in ipairs(users) do
    redis.call('ZREM', key.grace(), u)
    local ukey = key.user(u)
    local held = redis.call('HMGET', ukey, 'grace_reason', 'grace_at')
    redis.call('HDEL', ukey, 'grace_reason', 'grace_at')
    if redis.call('HGET', key.users(), u) == '0' then
      redis.call('HDEL', key.users(), u)
      went_offline(u, held[1] or 'closed', tonumber(held[2]) or now_ms)
      count('grace_expired_users')
    end
  end
  if #rooms == EXPIRE_MAX or #users == EXPIRE_MAX then
    tally.expire_more = true
    tallied = true
  end
end

local outcomes = {}
for _, op in ipairs(cmsgpack.unpack(ARGV[6])) do
  local code = op[1]
  local out = {}
  if code == 'C' then
    local u = op[2]
    redis.call('HINCRBY', node_users, u, 1)
    redis.call('INCR', key.connections())
    add_user(u, 1)
  elseif code == 'D' then
    local u, reason, graced = op[2], op[3], op[4]
    add(node_users, u, -1)
    -- Below zero means the store lost this user's count (Redis restarted
    -- empty): there is no online to undo, so no event.
    local _, left = add_user(u, -1, reason, graced)
    if left >= 0 then
      redis.call('DECR', key.connections())
    end
  elseif code == 'J' then
    local room, u = op[2], op[3]
    redis.call('HINCRBY', node_rooms, room_field(room, u), 1)
    add_member(room, u, 1)
    out.m = snapshot(room)
  elseif code == 'L' then
    local room, u, reason, graced = op[2], op[3], op[4], op[5]
    add(node_rooms, room_field(room, u), -1)
    add_member(room, u, -1, reason, graced)
  elseif code == 'M' then
    out.m = snapshot(op[2])
  elseif code == 'U' then
    local room, u, conn, state = op[2], op[3], op[4], op[5]
    -- Only a member has a state (a leave may have overtaken the update).
    if redis.call('HEXISTS', key.room(room), u) == 1 then
      redis.call('HSET', key.room_state(room), u, state)
      publish(event.updated(room, u, state, conn))
    end
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
  elseif code == 'E' then
    expire()
  else
    return redis.error_reply('ERR presenced batch: unknown op ' .. tostring(code))
  end
  out.e = take_decided()
  out.t = take_tally()
  outcomes[#outcomes + 1] = out
end
published()
return cmsgpack.pack({base, outcomes})
