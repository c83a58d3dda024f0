-- A connection opened on this node. Returns 1 if it is the user's first in the cluster.
-- KEYS: presence hash, status, node's users set, online set. ARGV: node, user.
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('SADD', KEYS[3], ARGV[2])
if total(KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], 'online')
  redis.call('SADD', KEYS[4], ARGV[2])
  return 1
end
return 0
