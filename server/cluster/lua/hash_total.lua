-- Helper, prepended to the scripts that use it: the sum of a hash's values
-- (a count kept per node, e.g. node -> connections).
local function total(key)
  local n = 0
  for _, v in ipairs(redis.call('HVALS', key)) do n = n + tonumber(v) end
  return n
end
