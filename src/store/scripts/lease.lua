-- Extends a node's lease, on the Redis clock.
--
-- KEYS[1] the nodes zset (P:nodes)
-- ARGV[1] node id, ARGV[2] lease length in milliseconds
-- Returns the new deadline, Unix milliseconds.
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return deadline
