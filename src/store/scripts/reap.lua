-- Reaps every node whose lease has expired, except the caller. Runs after
-- common.lua.
--
-- ARGV[1] prefix, ARGV[2] the reaping node.
-- For each dead node N, in one atomic step: subtract its room and user
-- counts (key.node_rooms(N), key.node_users(N)) from the shared ones,
-- publishing left and offline with reason node_lost for every count that
-- reaches zero; drop its connection records and live connections; delete
-- its bookkeeping and its lease. Every survivor runs this every second:
-- whichever runs first does the work, the others find nothing, so each
-- event is published exactly once.
-- Returns MessagePack {events published, {node id...}}.

local dead = redis.call('ZRANGEBYSCORE', key.nodes(), '-inf', '(' .. now_ms, 'LIMIT', 0, 64)
local reaped = {}
for _, n in ipairs(dead) do
  if n ~= node then
    local n_users = key.node_users(n)
    local n_rooms = key.node_rooms(n)
    for f, count in pairs(counts(n_rooms)) do
      local room, u = split_room_field(f)
      local before, after = add(key.room(room), u, -count)
      if before > 0 and after <= 0 then
        publish(event.left(room, u, 'node_lost'))
      end
    end
    for u, count in pairs(counts(n_users)) do
      local before, after = add(key.users(), u, -count)
      redis.call('DECRBY', key.connections(), math.max(before, 0) - math.max(after, 0))
      if before > 0 and after <= 0 then
        went_offline(u, 'node_lost')
      end
      drop_conn_records(u, n, nil)
    end
    redis.call('DEL', n_users, n_rooms)
    redis.call('ZREM', key.nodes(), n)
    reaped[#reaped + 1] = n
  end
end
published()
return cmsgpack.pack({seq - base, reaped})
