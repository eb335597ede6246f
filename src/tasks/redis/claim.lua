-- Picks the task a worker runs next and delivers it to that worker through the work stream, where
-- its entry stays pending until the task's final state, so a dead worker's task is taken over.
-- Entries that earlier versions added straight to the stream are delivered first. Otherwise the
-- rules of `tasks::schedule`: the highest level passed over `bound` times, else the highest level
-- that waits; within it, the client whose turn it is, and that client's oldest task.
-- KEYS: work stream, passed-over hash, queued set, doorbell.
-- ARGV: consumer group, consumer, bound, key prefix ('deskgen:').
-- The levels' turns and waiting lists and the task hashes are named from the prefix, so this
-- script wants one Redis, not a cluster.
-- Returns {entry id, task id} (the task id empty for an entry without one), or nil when no task
-- waits.
local earlier = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if earlier then
  local entry = earlier[1][2][1]
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'task_id' then
      return {entry[1], fields[i + 1]}
    end
  end
  return {entry[1], ''}
end

local prefix = ARGV[4]
local bound = tonumber(ARGV[3])
local levels = {'high', 'normal', 'low'}

local function turns(level)
  return prefix .. 'waiting:' .. level
end

local function waits(level)
  return redis.call('LLEN', turns(level)) > 0
end

-- The next client's oldest task still queued; the client keeps a turn while it has tasks.
local function pop(level)
  local key = turns(level)
  while true do
    local client = redis.call('LPOP', key)
    if not client then
      return nil
    end
    local list = key .. ':' .. client
    local task = redis.call('LPOP', list)
    while task and redis.call('HGET', prefix .. 'task:' .. task, 'status') ~= 'queued' do
      task = redis.call('LPOP', list)
    end
    if redis.call('LLEN', list) > 0 then
      redis.call('RPUSH', key, client)
    end
    if task then
      return task
    end
  end
end

local order = {}
for rank, level in ipairs(levels) do
  if waits(level) and tonumber(redis.call('HGET', KEYS[2], level) or 0) >= bound then
    table.insert(order, rank)
  end
end
for rank = 1, #levels do
  table.insert(order, rank)
end
local served, task
for _, rank in ipairs(order) do
  task = pop(levels[rank])
  if task then
    served = rank
    break
  end
end
if not task then
  return nil
end
redis.call('HSET', KEYS[2], levels[served], 0)
for lower = served + 1, #levels do
  if waits(levels[lower]) then
    redis.call('HINCRBY', KEYS[2], levels[lower], 1)
  end
end

local entry = redis.call('XADD', KEYS[1], '*', 'task_id', task)
redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
redis.call('HSET', prefix .. 'task:' .. task, 'entry', entry)
-- The set still holds this task until its worker marks it processing.
if redis.call('SCARD', KEYS[3]) > 1 then
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, 0)
end
return {entry, task}
