-- Queues a task unless its id is known already or the global queue is full.
-- KEYS: task hash, queued set, work stream.
-- ARGV: task id, record JSON, capacity.
-- Returns {1, ''} when queued, {0, record} for a known id, {-1, ''} when full.
local existing = redis.call('HGET', KEYS[1], 'record')
if existing then
  return {0, existing}
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {-1, ''}
end
local entry = redis.call('XADD', KEYS[3], '*', 'task_id', ARGV[1])
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'status', 'queued', 'version', 1, 'owner', '', 'entry', entry)
redis.call('SADD', KEYS[2], ARGV[1])
return {1, ''}
