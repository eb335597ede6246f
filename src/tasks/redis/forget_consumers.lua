-- Removes the group's consumers that have nothing pending and have not read for a while: workers
-- that stopped, or died and had their tasks taken over. A live worker idle that long is added
-- back by its next read. Checked and removed in one step, so no entry a consumer claims
-- meanwhile is dropped with it.
-- KEYS: work stream.
-- ARGV: consumer group, least idle time in milliseconds, this process's consumer (kept).
-- Returns {{removed name, …}, {{kept name, its pending count}, …}}.
local removed, kept = {}, {}
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #fields, 2 do
    consumer[fields[i]] = fields[i + 1]
  end
  if consumer.pending == 0 and consumer.idle >= tonumber(ARGV[2]) and consumer.name ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer.name)
    table.insert(removed, consumer.name)
  else
    table.insert(kept, {consumer.name, consumer.pending})
  end
end
return {removed, kept}
