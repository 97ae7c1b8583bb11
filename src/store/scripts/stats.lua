-- Cluster-wide counts, on the Redis clock.
--
-- KEYS[1] the users hash (P:users), KEYS[2] the nodes zset (P:nodes),
-- KEYS[3] the connection counter (P:connections), KEYS[4] the grace zset
-- (P:grace)
-- Returns {users online (those in the grace included), live connections,
-- nodes whose lease is still ahead, users in the grace}.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {
  redis.call('HLEN', KEYS[1]),
  tonumber(redis.call('GET', KEYS[3]) or 0),
  redis.call('ZCOUNT', KEYS[2], '(' .. now_ms, '+inf'),
  redis.call('ZCARD', KEYS[4]),
}
