-- One page of a rank sorted set's members with lo <= score <= hi, in the set's order (score,
-- then member bytes), after a cursor: O(log^2 N + page), however far into the range the
-- cursor is — where LIMIT offset paging costs O(offset) per page, and shifts when a member
-- it already passed changes its score.
--
-- KEYS[1] the sorted set
-- ARGV[1] lo (inclusive)   ARGV[2] hi (inclusive; '' : no upper end)
-- ARGV[3] cursor score ('' : start at lo)   ARGV[4] cursor member   ARGV[5] page size
-- Returns {member1, score1, member2, score2, ...}
local key = KEYS[1]

-- Sorted sets order equal scores by member bytes (memcmp), not by the locale.
local function at_or_before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a <= #b
end

local start
if ARGV[3] == '' then
  start = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[1])
else
  local s, m = ARGV[3], ARGV[4]
  -- The entries with the cursor's score are [first, first + ties): find the first whose
  -- member sorts after the cursor's (the cursor member itself may be gone or re-scored).
  local first = redis.call('ZCOUNT', key, '-inf', '(' .. s)
  local ties = redis.call('ZCOUNT', key, s, s)
  local lo_i, hi_i = first, first + ties
  while lo_i < hi_i do
    local mid = math.floor((lo_i + hi_i) / 2)
    local member = redis.call('ZRANGE', key, mid, mid)[1]
    if at_or_before(member, m) then
      lo_i = mid + 1
    else
      hi_i = mid
    end
  end
  start = lo_i
  -- A cursor below lo (another range's) starts at lo.
  local from_lo = redis.call('ZCOUNT', key, '-inf', '(' .. ARGV[1])
  if start < from_lo then
    start = from_lo
  end
end
local n = tonumber(ARGV[5])
local page = redis.call('ZRANGE', key, start, start + n - 1, 'WITHSCORES')
if ARGV[2] == '' then
  return page
end
local hi = tonumber(ARGV[2])
local out = {}
for i = 1, #page, 2 do
  if tonumber(page[i + 1]) > hi then
    break
  end
  out[#out + 1] = page[i]
  out[#out + 1] = page[i + 1]
end
return out
