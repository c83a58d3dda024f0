-- Take `cost` tokens from a continuously refilled bucket, by Redis' clock.
-- KEYS: bucket hash. ARGV: capacity, refill per second, cost, expire ms.
-- Returns {allowed, retry_after_ms}. Same arithmetic as RateLimiter.hit.
local capacity, rate, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or capacity
local ts = tonumber(b[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed, retry = 1, 0
if tokens >= cost then
  tokens = tokens - cost
else
  allowed, retry = 0, math.ceil((cost - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {allowed, retry}
