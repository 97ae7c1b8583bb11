-- Shared prelude of batch.lua and reap.lua: the server prepends it to each
-- (store/redis/mod.rs), so both spell keys, build events and publish them
-- the same way. This is the only Lua place that names a key or an event;
-- the layout is documented in docs/operations.md ("Redis keys").
--
-- ARGV[1] prefix, ARGV[2] this node's id, ARGV[3] the offline grace, ms
-- (0: none).
--
-- Everything that crosses between Rust and Lua is MessagePack (cmsgpack
-- here, store/redis/codec.rs there), so any string and any JSON text
-- (metadata) travels unchanged: nothing is split on spaces.

local p = ARGV[1]
local node = ARGV[2]
local grace_ms = tonumber(ARGV[3])

local key = {}
-- user -> live connection count, cluster-wide
function key.users() return p .. ':users' end
-- live connections, cluster-wide
function key.connections() return p .. ':connections' end
-- user -> connection count on node n
function key.node_users(n) return p .. ':node:' .. n .. ':users' end
-- room_field(room, user) -> count on node n
function key.node_rooms(n) return p .. ':node:' .. n .. ':rooms' end
-- user -> that user's connections in room r
function key.room(r) return p .. ':room:' .. r end
-- user -> that member's room state (JSON text), while a member of room r
function key.room_state(r) return p .. ':room_state:' .. r end
-- seq, last_seen, meta of user u
function key.user(u) return p .. ':user:' .. u end
-- connection id -> conn_record(...) of user u
function key.user_conns(u) return p .. ':user:' .. u .. ':conns' end
-- node -> lease deadline
function key.nodes() return p .. ':nodes' end
-- Offline grace: a user whose last connection ended stays in key.users
-- with count 0 and is here with the grace's deadline; the offline's reason
-- and last_seen wait in key.user(u) (grace_reason, grace_at).
function key.grace() return p .. ':grace' end
-- A room member likewise stays in key.room(r) with count 0 and is here as
-- room_field(r, u) with the deadline, its reason in key.room_grace_reasons.
function key.room_grace() return p .. ':room_grace' end
function key.room_grace_reasons() return p .. ':room_grace:reasons' end
-- the event channel, and the number of the last event published on it
function key.events() return p .. ':events' end
function key.events_seq() return p .. ':events:seq' end

-- A (room, user) pair as one field of key.node_rooms: neither a room name
-- nor a user id may contain a space (src/ids.rs).
local function room_field(room, u) return room .. ' ' .. u end
local function split_room_field(f) return string.match(f, '^(%S+) (%S+)$') end

-- A connection record: which node holds it, since when, its metadata.
local function conn_record(n, since, meta)
  return cmsgpack.pack({node = n, since_ms = since, meta = meta})
end
local function read_conn_record(packed) return cmsgpack.unpack(packed) end

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

-- The events, field for field protocol::Event (src/protocol.rs).
local event = {}
function event.online(u, seq)
  return {type = 'online', user = u, seq = seq}
end
function event.offline(u, seq, last_seen, reason)
  return {type = 'offline', user = u, seq = seq, last_seen = last_seen, reason = reason}
end
function event.joined(room, u)
  return {type = 'joined', room = room, user = u}
end
function event.left(room, u, reason)
  return {type = 'left', room = room, user = u, reason = reason}
end
-- from: the connection that sent it (it does not hear it; not on the wire)
function event.updated(room, u, state, from)
  return {type = 'updated', room = room, user = u, state = state, from = from}
end

-- A member is gone from room: so is their room state.
local function forget_member(room, u)
  redis.call('HDEL', key.room(room), u)
  redis.call('HDEL', key.room_state(room), u)
end

-- Events are numbered cluster-wide and published as [number, event]. The
-- events of the op being applied are also kept for its outcome.
local base = tonumber(redis.call('GET', key.events_seq()) or 0)
local seq = base
local decided = {}
local function publish(ev)
  seq = seq + 1
  redis.call('PUBLISH', key.events(), cmsgpack.pack({seq, ev}))
  decided[#decided + 1] = ev
end

-- The events published since the last call.
local function take_decided()
  local d = decided
  decided = {}
  return d
end

-- What the op being applied did that is no event (graces, corrections),
-- by the names of store::Tally.
local tally = {}
local tallied = false
local function count(name, n)
  tally[name] = (tally[name] or 0) + (n or 1)
  tallied = true
end

-- The tally since the last call, nil if nothing was counted.
local function take_tally()
  if not tallied then return nil end
  local t = tally
  tally = {}
  tallied = false
  return t
end

-- Stores the last event number; call once, at the end.
local function published()
  if seq > base then
    redis.call('SET', key.events_seq(), seq)
  end
end

-- Adds delta to field in hash, deleting it at or below zero; returns the
-- count before and after.
local function add(k, field, delta)
  local after = redis.call('HINCRBY', k, field, delta)
  if after <= 0 then
    redis.call('HDEL', k, field)
  end
  return after - delta, after
end

local function went_online(u)
  publish(event.online(u, redis.call('HINCRBY', key.user(u), 'seq', 1)))
end

local function went_offline(u, reason, at)
  local ukey = key.user(u)
  redis.call('HSET', ukey, 'last_seen', at)
  publish(event.offline(u, redis.call('HINCRBY', ukey, 'seq', 1), at, reason))
end

-- The user's count rose from 0 (or none): back within the grace (nobody
-- is told), or online.
local function user_came(u)
  if redis.call('ZREM', key.grace(), u) == 1 then
    redis.call('HDEL', key.user(u), 'grace_reason', 'grace_at')
    count('grace_cancelled_users')
  else
    went_online(u)
  end
end

-- The user's count fell to `after`: at 0 their grace starts (graced and a
-- grace configured) or they are offline; below 0 the store had lost their
-- count (Redis restarted empty) and there is nothing to undo.
local function user_ended(u, after, reason, graced)
  if after < 0 then
    redis.call('HDEL', key.users(), u)
  elseif graced and grace_ms > 0 then
    redis.call('ZADD', key.grace(), now_ms + grace_ms, u)
    redis.call('HSET', key.user(u), 'grace_reason', reason, 'grace_at', now_ms)
    count('grace_started_users')
  else
    redis.call('HDEL', key.users(), u)
    went_offline(u, reason, now_ms)
  end
end

-- A room member's count rose from 0 (or none): back within the grace, or
-- joined.
local function member_came(room, u)
  local f = room_field(room, u)
  if redis.call('ZREM', key.room_grace(), f) == 1 then
    redis.call('HDEL', key.room_grace_reasons(), f)
    count('grace_cancelled_rooms')
  else
    -- A fresh member starts with no state, whatever a lost count left.
    redis.call('HDEL', key.room_state(room), u)
    publish(event.joined(room, u))
  end
end

-- A room member's count fell to `after`, as user_ended.
local function member_ended(room, u, after, reason, graced)
  if after < 0 then
    forget_member(room, u)
  elseif graced and grace_ms > 0 then
    local f = room_field(room, u)
    redis.call('ZADD', key.room_grace(), now_ms + grace_ms, f)
    redis.call('HSET', key.room_grace_reasons(), f, reason)
    count('grace_started_rooms')
  else
    forget_member(room, u)
    publish(event.left(room, u, reason))
  end
end

-- Adds delta to a live count and settles what crossing zero means:
-- user_came/member_came on the way up, user_ended/member_ended on the way
-- down. Returns the count after.
local function add_user(u, delta, reason, graced)
  local after = redis.call('HINCRBY', key.users(), u, delta)
  local before = after - delta
  if before <= 0 and after > 0 then
    user_came(u)
  elseif before > 0 and after <= 0 then
    user_ended(u, after, reason, graced)
  elseif after < 0 then
    redis.call('HDEL', key.users(), u)
  end
  return before, after
end

local function add_member(room, u, delta, reason, graced)
  local after = redis.call('HINCRBY', key.room(room), u, delta)
  local before = after - delta
  if before <= 0 and after > 0 then
    member_came(room, u)
  elseif before > 0 and after <= 0 then
    member_ended(room, u, after, reason, graced)
  elseif after < 0 then
    forget_member(room, u)
  end
  return before, after
end

-- A hash as a Lua table of numbers.
local function counts(k)
  local t = {}
  local flat = redis.call('HGETALL', k)
  for i = 1, #flat, 2 do
    t[flat[i]] = tonumber(flat[i + 1])
  end
  return t
end

-- Drops node n's records of user u's connections, except those in keep;
-- returns the kept ones present and how many were dropped.
local function drop_conn_records(u, n, keep)
  local ckey = key.user_conns(u)
  local flat = redis.call('HGETALL', ckey)
  local present = {}
  local dropped = 0
  for i = 1, #flat, 2 do
    local conn = flat[i]
    if keep and keep[conn] ~= nil then
      present[conn] = true
    elseif read_conn_record(flat[i + 1]).node == n then
      redis.call('HDEL', ckey, conn)
      dropped = dropped + 1
    end
  end
  return present, dropped
end
