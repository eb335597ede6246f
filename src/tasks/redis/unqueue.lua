-- Takes a canceled task off its client's waiting list, and the client off its level's turns when
-- that was its last task.
-- KEYS: the client's waiting list, the level's turns.
-- ARGV: task id, client.
redis.call('LREM', KEYS[1], 0, ARGV[1])
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('LREM', KEYS[2], 0, ARGV[2])
end
return 1
