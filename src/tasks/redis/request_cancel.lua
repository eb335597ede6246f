-- Flags a running task for cancellation and tells its worker. The flag stays for a worker that
-- missed the message (or takes the task over later).
-- KEYS: task hash.
-- ARGV: task id, cancel channel.
-- Returns 1 when flagged, 0 when the task is not processing (any more).
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then
  return 0
end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
