-- A user's chosen status, kept only while the user is online somewhere.
-- KEYS: presence hash, status. ARGV: status.
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('SET', KEYS[2], ARGV[1]) end
return 0
