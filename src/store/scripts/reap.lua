-- Reaps every node whose lease has expired, except the caller. Runs after
-- common.lua.
--
-- ARGV[1] prefix, ARGV[2] the reaping node, ARGV[3] offline grace ms.
-- For each dead node N, in one atomic step: subtract its room and user
-- counts (key.node_rooms(N), key.node_users(N)) from the shared ones; a
-- count that reaches zero starts its grace (reason node_lost), or, with no
-- grace, is published as left / offline at once; drop its connection
-- records and live connections; delete its bookkeeping and its lease. A
-- user who reconnected elsewhere before the reap keeps a count above zero:
-- nothing happens to them. Every survivor runs this every second:
-- whichever runs first does the work, the others find nothing, so each
-- grace and event happens exactly once.
-- Returns MessagePack {events = published, nodes = {node id...}, t = tally}
-- (t as in batch.lua; absent when nothing).

local dead = redis.call('ZRANGEBYSCORE', key.nodes(), '-inf', '(' .. now_ms, 'LIMIT', 0, 64)
local reaped = {}
for _, n in ipairs(dead) do
  if n ~= node then
    local n_users = key.node_users(n)
    local n_rooms = key.node_rooms(n)
    for f, c in pairs(counts(n_rooms)) do
      local room, u = split_room_field(f)
      add_member(room, u, -c, 'node_lost', true)
    end
    for u, c in pairs(counts(n_users)) do
      local before, after = add_user(u, -c, 'node_lost', true)
      redis.call('DECRBY', key.connections(), math.max(before, 0) - math.max(after, 0))
      drop_conn_records(u, n, nil)
    end
    redis.call('DEL', n_users, n_rooms)
    redis.call('ZREM', key.nodes(), n)
    reaped[#reaped + 1] = n
  end
end
published()
return cmsgpack.pack({events = seq - base, nodes = reaped, t = take_tally()})
