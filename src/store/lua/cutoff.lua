-- Computes one rank cut-off atomically over the partitions' sorted sets of a rank, so the
-- population, the extremes and every count come from one consistent moment (no commit can
-- interleave). KEYS: the rank's sorted set of every partition.
-- ARGV[1], ARGV[2]: the band's share as numerator / denominator (top 1% = 1 / 100).
-- Returns {population, k-th largest value, customers at or above it, k} (values are whole
-- numbers within +-(2^53 - 1), exact as doubles); {0} when nobody is ranked; an error reply
-- if a score lies beyond. Within that range the bisection always ends: `mid` is a whole
-- number strictly above `lo` and at most `hi`.
local n = 0
for i = 1, #KEYS do
  n = n + redis.call('ZCARD', KEYS[i])
end
if n == 0 then
  return {0}
end
local num, den = tonumber(ARGV[1]), tonumber(ARGV[2])
local k = math.ceil(n * num / den)
if k < 1 then k = 1 end
if k > n then k = n end
local lo, hi
for i = 1, #KEYS do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  local last = redis.call('ZRANGE', KEYS[i], -1, -1, 'WITHSCORES')
  if first[2] then
    local a, b = tonumber(first[2]), tonumber(last[2])
    if lo == nil or a < lo then lo = a end
    if hi == nil or b > hi then hi = b end
  end
end
-- Sorted-set scores are doubles: whole numbers are exact only within +-2^53, and beyond it
-- the bisection below could round its midpoint back onto `lo` and never end (blocking Redis).
-- tierd never writes values beyond +-(2^53 - 1) (a customer's lifetime totals stop there, so
-- a cut-off one above a value is still exact); refuse to search over any that got there
-- some other way (or any fractional one, where the midpoint can equal `lo` as well) instead
-- of hanging.
local exact = 9007199254740991
if lo < -exact or hi > exact or lo ~= math.floor(lo) or hi ~= math.floor(hi) then
  return redis.error_reply('ERR ranked value beyond +-(2^53 - 1) or not whole in a rank sorted set: ' ..
    string.format('%.0f', lo) .. ' .. ' .. string.format('%.0f', hi))
end
local function count_ge(v)
  -- Whole numbers as text: Lua's default number formatting keeps only 14 digits.
  local bound = string.format('%.0f', v)
  local c = 0
  for i = 1, #KEYS do
    c = c + redis.call('ZCOUNT', KEYS[i], bound, '+inf')
  end
  return c
end
-- The largest v with count_ge(v) >= k.
while lo < hi do
  local mid = lo + math.floor((hi - lo + 1) / 2)
  if count_ge(mid) >= k then lo = mid else hi = mid - 1 end
end
return {n, string.format('%.0f', lo), count_ge(lo), k}
