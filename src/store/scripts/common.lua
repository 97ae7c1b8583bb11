-- Shared prelude of batch.lua and reap.lua: the server prepends it to
-- each (see store/redis.rs), so both publish events the same way.
--
-- ARGV[1] prefix, ARGV[2] this node's id.

local p = ARGV[1]
local node = ARGV[2]
local users = p .. ':users'
local channel = p .. ':events'
local seq_key = p .. ':events:seq'

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

-- Events are numbered cluster-wide: "seq kind args" on P:events.
local base = tonumber(redis.call('GET', seq_key) or 0)
local seq = base
local function publish(event)
  seq = seq + 1
  redis.call('PUBLISH', channel, seq .. ' ' .. event)
  return event
end

-- Stores the last event number; call once, at the end.
local function published()
  if seq > base then
    redis.call('SET', seq_key, seq)
  end
end

-- Adds delta to field in hash, deleting it at or below zero; returns the
-- count before and after.
local function add(key, field, delta)
  local after = redis.call('HINCRBY', key, field, delta)
  if after <= 0 then
    redis.call('HDEL', key, field)
  end
  return after - delta, after
end

local function went_online(u)
  local s = redis.call('HINCRBY', p .. ':user:' .. u, 'seq', 1)
  publish('online ' .. u .. ' ' .. s)
  return s
end

-- Returns the new seq and the event.
local function went_offline(u, reason)
  local ukey = p .. ':user:' .. u
  redis.call('HSET', ukey, 'last_seen', now_ms)
  local s = redis.call('HINCRBY', ukey, 'seq', 1)
  return s, publish('offline ' .. u .. ' ' .. s .. ' ' .. now_ms .. ' ' .. reason)
end

-- A hash as a Lua table of numbers.
local function counts(key)
  local t = {}
  local flat = redis.call('HGETALL', key)
  for k = 1, #flat, 2 do
    t[flat[k]] = tonumber(flat[k + 1])
  end
  return t
end

