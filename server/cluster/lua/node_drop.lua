-- Drop everything a node recorded. ARGV: prefix, node, forget (1: leave the registry
-- too), other registered nodes... Returns {users now offline everywhere,
-- {{user, who JSON, rooms the user is in on no other node...}...}}.
-- The keys are computed here, so they must all live in one Redis (no Redis Cluster).
local p, node = ARGV[1], ARGV[2]
local function k(...) return table.concat({p, ...}, ':') end
local offline = {}
local users_key = k('node', node, 'users')
for _, u in ipairs(redis.call('SMEMBERS', users_key)) do
  local h = k('presence', u)
  redis.call('HDEL', h, node)
  if total(h) <= 0 then
    redis.call('DEL', h, k('status', u))
    redis.call('SREM', k('online'), u)
    table.insert(offline, u)
  end
end
local left = {}
local roomusers_key = k('node', node, 'roomusers')
local who_key = k('node', node, 'who')
for _, u in ipairs(redis.call('SMEMBERS', roomusers_key)) do
  local rooms_key = k('rooms', node, u)
  local entry = {u, redis.call('HGET', who_key, u) or ''}
  for _, room in ipairs(redis.call('SMEMBERS', rooms_key)) do
    local elsewhere = false
    for i = 4, #ARGV do
      if redis.call('SISMEMBER', k('rooms', ARGV[i], u), room) == 1 then
        elsewhere = true
        break
      end
    end
    if not elsewhere then table.insert(entry, room) end
  end
  if #entry > 2 then table.insert(left, entry) end
  redis.call('DEL', rooms_key)
end
local connkeys_key = k('node', node, 'connkeys')
for _, key in ipairs(redis.call('SMEMBERS', connkeys_key)) do redis.call('HDEL', key, node) end
redis.call('DEL', users_key, roomusers_key, who_key, connkeys_key)
if ARGV[3] == '1' then
  redis.call('ZREM', k('nodes'), node)
  redis.call('HDEL', k('nodeinfo'), node)
end
return {offline, left}
