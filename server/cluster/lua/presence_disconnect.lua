-- A connection closed on this node. Returns 1 if it was the user's last in the cluster.
-- KEYS: presence hash, status, node's users set, online set, user's rooms on the node,
-- node's room-users set, node's who hash. ARGV: node, user.
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[2])
  redis.call('DEL', KEYS[5])
  redis.call('SREM', KEYS[6], ARGV[2])
  redis.call('HDEL', KEYS[7], ARGV[2])
end
if total(KEYS[1]) <= 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('SREM', KEYS[4], ARGV[2])
  return 1
end
return 0
