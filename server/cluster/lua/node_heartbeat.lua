-- Refresh this node in the registry and list the nodes not refreshed in time. Redis' clock.
-- KEYS: nodes zset, node info hash. ARGV: node, dead after (secs), node info JSON.
-- Returns {1 if the node was not registered, dead node ids...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local missing = redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
redis.call('ZADD', KEYS[1], string.format('%.6f', now), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local out = {missing and 1 or 0}
local limit = string.format('(%.6f', now - tonumber(ARGV[2]))
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', limit)) do
  table.insert(out, node)
end
return out
