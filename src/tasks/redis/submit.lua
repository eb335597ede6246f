-- Queues a task unless its id is known already or the global queue is full: the task joins its
-- client's waiting list at its priority level, the client joins that level's turns unless it has
-- a turn already, and the doorbell wakes one idle worker.
-- KEYS: task hash, queued set, the client's waiting list, the level's turns, doorbell.
-- ARGV: task id, record JSON, capacity, client.
-- Returns {1, ''} when queued, {0, record} for a known id, {-1, ''} when full.
local existing = redis.call('HGET', KEYS[1], 'record')
if existing then
  return {0, existing}
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {-1, ''}
end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', 'queued', 'version', 1, 'owner', '')
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('RPUSH', KEYS[3], ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[4], ARGV[4])
end
redis.call('LPUSH', KEYS[5], '1')
redis.call('LTRIM', KEYS[5], 0, 0)
return {1, ''}
