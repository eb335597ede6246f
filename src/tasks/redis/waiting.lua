-- The waiting tasks as `tasks::schedule` keeps them, to tell a task's place.
-- KEYS: passed-over hash.
-- ARGV: key prefix ('deskgen:').
-- Returns {passed high, passed normal, passed low, high, normal, low}, each level a list of
-- {client, {task id, …}} in turn order, with only the tasks still queued.
local prefix = ARGV[1]
local levels = {'high', 'normal', 'low'}
local reply = {}
for _, level in ipairs(levels) do
  table.insert(reply, tonumber(redis.call('HGET', KEYS[1], level) or 0))
end
for _, level in ipairs(levels) do
  local key = prefix .. 'waiting:' .. level
  local clients = {}
  for _, client in ipairs(redis.call('LRANGE', key, 0, -1)) do
    local tasks = {}
    for _, task in ipairs(redis.call('LRANGE', key .. ':' .. client, 0, -1)) do
      if redis.call('HGET', prefix .. 'task:' .. task, 'status') == 'queued' then
        table.insert(tasks, task)
      end
    end
    table.insert(clients, {client, tasks})
  end
  table.insert(reply, clients)
end
return reply
