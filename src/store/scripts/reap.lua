-- Reaps every node whose lease has expired, except the caller. Runs after
-- common.lua.
--
-- ARGV[1] prefix, ARGV[2] the reaping node.
-- For each dead node N, in one atomic step: subtract its room and user
-- counts (P:node:N:rooms, P:node:N:users) from the shared ones, publishing
-- "left room user node_lost" and "offline user seq last_seen node_lost" for
-- every count that reaches zero; drop its connection records and live
-- connections; delete its bookkeeping and its lease. Every survivor runs
-- this every second: whichever runs first does the work, the others find
-- nothing, so each event is published exactly once.
-- Returns {events published, node id...}.

local dead = redis.call('ZRANGEBYSCORE', p .. ':nodes', '-inf', '(' .. now_ms, 'LIMIT', 0, 64)
local reaped = {0}
for _, n in ipairs(dead) do
  if n ~= node then
    local n_users = p .. ':node:' .. n .. ':users'
    local n_rooms = p .. ':node:' .. n .. ':rooms'
    for f, count in pairs(counts(n_rooms)) do
      local room, u = string.match(f, '^(%S+) (%S+)$')
      local before, after = add(p .. ':room:' .. room, u, -count)
      if before > 0 and after <= 0 then
        publish('left ' .. room .. ' ' .. u .. ' node_lost')
      end
    end
    local prefix = n .. ' '
    for u, count in pairs(counts(n_users)) do
      local before, after = add(users, u, -count)
      redis.call('DECRBY', p .. ':connections', math.max(before, 0) - math.max(after, 0))
      if before > 0 and after <= 0 then
        went_offline(u, 'node_lost')
      end
      local ckey = p .. ':user:' .. u .. ':conns'
      local flat = redis.call('HGETALL', ckey)
      for k = 1, #flat, 2 do
        if string.sub(flat[k + 1], 1, #prefix) == prefix then
          redis.call('HDEL', ckey, flat[k])
        end
      end
    end
    redis.call('DEL', n_users, n_rooms)
    redis.call('ZREM', p .. ':nodes', n)
    reaped[#reaped + 1] = n
  end
end
reaped[1] = seq - base
published()
return reaped
