-- Gives a task a stopping worker still runs back to the queue at once, first of its client's
-- waiting tasks, instead of leaving it to be taken over after the visibility timeout.
-- KEYS: task hash, queued set, the client's waiting list, the level's turns, work stream, doorbell.
-- ARGV: owner token, record JSON (queued again), consumer group, updates channel, task id, client.
-- Returns the new version, or 0 when the task is no longer this worker's or its client asked to
-- cancel it (the worker that takes it over then ends it as canceled).
local current = redis.call('HMGET', KEYS[1], 'owner', 'status', 'entry', 'cancel')
if current[1] ~= ARGV[1] or current[2] ~= 'processing' or current[4] == '1' then
  return 0
end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', 'queued', 'owner', '')
redis.call('HDEL', KEYS[1], 'entry')
redis.call('SADD', KEYS[2], ARGV[5])
redis.call('LPUSH', KEYS[3], ARGV[5])
if redis.call('LLEN', KEYS[3]) == 1 then
  redis.call('LPUSH', KEYS[4], ARGV[6])
end
if current[3] then
  redis.call('XACK', KEYS[5], ARGV[3], current[3])
  redis.call('XDEL', KEYS[5], current[3])
end
redis.call('LPUSH', KEYS[6], '1')
redis.call('LTRIM', KEYS[6], 0, 0)
redis.call('PUBLISH', ARGV[4], version .. ' ' .. ARGV[5] .. ' ' .. ARGV[2])
return version
