-- Writes a task's record if the caller still holds it, and publishes the change. The guard is
-- either the version the caller read (compare-and-set) or the owner token of the worker running
-- it; so two writers can never both record a final state.
-- KEYS: task hash, queued set, work stream.
-- ARGV: guard kind ('version' | 'owner'), guard value, task id, record JSON, status, owner,
--       final ('1' | '0'), result TTL in seconds, consumer group, updates channel.
-- Returns the new version, or 0 when the guard no longer holds.
local current = redis.call('HMGET', KEYS[1], 'version', 'owner', 'status', 'entry')
if not current[1] then
  return 0
end
if current[3] == 'done' or current[3] == 'failed' or current[3] == 'canceled' then
  return 0
end
if ARGV[1] == 'version' and current[1] ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'owner' and (current[2] ~= ARGV[2] or current[3] ~= 'processing') then
  return 0
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'record', ARGV[4], 'status', ARGV[5], 'owner', ARGV[6])
if ARGV[5] ~= 'queued' then
  redis.call('SREM', KEYS[2], ARGV[3])
end
if ARGV[7] == '1' then
  if current[4] then
    redis.call('XACK', KEYS[3], ARGV[9], current[4])
    redis.call('XDEL', KEYS[3], current[4])
  end
  redis.call('HDEL', KEYS[1], 'cancel')
  redis.call('EXPIRE', KEYS[1], ARGV[8])
end
redis.call('PUBLISH', ARGV[10], version .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return version
