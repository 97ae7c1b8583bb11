-- Shared prelude of batch.lua and reap.lua: the server prepends it to each
-- (store/redis/mod.rs), so both spell keys, build events and publish them
-- the same way. This is the only Lua place that names a key or an event;
-- the layout is documented in docs/operations.md ("Redis keys").
--
-- ARGV[1] prefix, ARGV[2] this node's id.
--
-- Everything that crosses between Rust and Lua is MessagePack (cmsgpack
-- here, store/redis/codec.rs there), so any string and any JSON text
-- (metadata) travels unchanged: nothing is split on spaces.

local p = ARGV[1]
local node = ARGV[2]

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
-- seq, last_seen, meta of user u
function key.user(u) return p .. ':user:' .. u end
-- connection id -> conn_record(...) of user u
function key.user_conns(u) return p .. ':user:' .. u .. ':conns' end
-- node -> lease deadline
function key.nodes() return p .. ':nodes' end
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

local function went_offline(u, reason)
  local ukey = key.user(u)
  redis.call('HSET', ukey, 'last_seen', now_ms)
  publish(event.offline(u, redis.call('HINCRBY', ukey, 'seq', 1), now_ms, reason))
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

-- Drops node n's records of user u's connections, except those in keep.
local function drop_conn_records(u, n, keep)
  local ckey = key.user_conns(u)
  local flat = redis.call('HGETALL', ckey)
  local present = {}
  for i = 1, #flat, 2 do
    local conn = flat[i]
    if keep and keep[conn] ~= nil then
      present[conn] = true
    elseif read_conn_record(flat[i + 1]).node == n then
      redis.call('HDEL', ckey, conn)
    end
  end
  return present
end
