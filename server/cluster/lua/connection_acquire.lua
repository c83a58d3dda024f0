-- Take a connection slot on this node unless a cluster-wide limit is reached.
-- KEYS: user hash, IP hash, node's connection-keys set. ARGV: node, per user, per IP.
-- Returns '' when admitted, else the exceeded limit ('user' or 'ip').
if total(KEYS[1]) >= tonumber(ARGV[2]) then return 'user' end
if total(KEYS[2]) >= tonumber(ARGV[3]) then return 'ip' end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('SADD', KEYS[3], KEYS[1], KEYS[2])
return ''
