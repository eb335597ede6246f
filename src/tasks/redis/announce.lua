-- A worker node's announcement: what it serves, live until TTL ms from now by Redis' own clock,
-- so that the hosts' clocks need not agree.
-- KEYS: descriptions hash, expiry sorted set.
-- ARGV: worker name, description (JSON), ttl ms.
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ms + tonumber(ARGV[3]), ARGV[1])
return 1
