-- The descriptions of the worker nodes whose announcement has not run out, in name order; the
-- others (killed, or gone without a word) are forgotten.
-- KEYS: descriptions hash, expiry sorted set.
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ms)) do
  redis.call('HDEL', KEYS[1], name)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
local live = redis.call('ZRANGE', KEYS[2], 0, -1)
table.sort(live)
if #live == 0 then
  return {}
end
return redis.call('HMGET', KEYS[1], unpack(live))
