-- Keeps a running task's work entry from being reclaimed while its worker is alive (XCLAIM to
-- the same consumer resets the entry's idle time), and tells the worker whether to stop.
-- KEYS: task hash, work stream.
-- ARGV: owner token, consumer group, consumer, entry id.
-- Returns -1 when the task is no longer this worker's, 1 when a cancel was requested, else 0.
local current = redis.call('HMGET', KEYS[1], 'owner', 'status', 'cancel')
if current[1] ~= ARGV[1] or current[2] ~= 'processing' then
  return -1
end
redis.call('XCLAIM', KEYS[2], ARGV[2], ARGV[3], 0, ARGV[4], 'JUSTID')
if current[3] == '1' then
  return 1
end
return 0
