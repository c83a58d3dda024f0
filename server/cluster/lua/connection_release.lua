-- Give back a connection slot this node held.
-- KEYS: user hash, IP hash, node's connection-keys set. ARGV: node.
for i = 1, 2 do
  if redis.call('HINCRBY', KEYS[i], ARGV[1], -1) <= 0 then
    redis.call('HDEL', KEYS[i], ARGV[1])
    redis.call('SREM', KEYS[3], KEYS[i])
  end
end
return 0
