-- Extends a node's lease, on the Redis clock, if it still has one.
--
-- KEYS[1] the nodes zset (P:nodes)
-- ARGV[1] node id, ARGV[2] lease length in milliseconds
-- Returns the new deadline (Unix milliseconds), or 0 when the node has no
-- lease (reaped as dead, or Redis lost its data): the node must then
-- reassert its state, which takes a new lease.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local now = redis.call('TIME')
local deadline = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[1])
return deadline
