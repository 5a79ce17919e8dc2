-- Fenced, atomic commit of one partition batch. tierd computes every state in Rust; this
-- script only checks ownership and position, then writes. All keys share one hash tag.
--
-- KEYS[1] meta hash {epoch, next_offset, offset_epoch, offset_topic, commits, clock, rules,
-- sweep, cutoffs, rerank, versions, seq_floor}
-- KEYS[2] outbox stream   KEYS[3] tier counts hash   KEYS[4] export snapshot lease
-- KEYS[5] export snapshot hash (snapshot.lua)   KEYS[6..s-1] sorted sets (timers, ranks)
-- KEYS[s..] customer state keys, one per value at the end of ARGV (s = ARGV[9])
-- ARGV[1] owner epoch   ARGV[2] the next offset the owner believes is stored (-1: none)
-- ARGV[3] batch first offset   ARGV[4] batch end offset (exclusive; equal to the first for a
-- commit of fired timers, a sweep or a re-ranking only)   ARGV[5] the number of commits the
-- owner believes are stored   ARGV[6] the partition's event-time clock ('' : unchanged)
-- ARGV[7] hash of a rules version whose sweep this commit completes ('' : none)
-- ARGV[8] rank cut-offs this commit finishes applying, JSON ('' : none)
-- ARGV[9] index s of the first state key
-- ARGV[10] progress of the re-ranking under way, JSON ('' : unchanged, '-' : done, remove it)
-- ARGV[11] leader epoch of the batch's last input record ('-' : no input, unchanged; '' :
-- unknown, forget the stored one); stored as '<next_offset>:<epoch>' so that an offset moved
-- by anything else (an operator's HSET, an older tierd) never pairs with a stale epoch
-- ARGV[12] the highest tier-change sequence among the outbox entries ('' : none), written on
-- each entry as field 'q' (the publisher keeps the highest published: a replay that cannot
-- reproduce what was published numbers changes above it)
-- ARGV[13] the partition's sequence floor the changes were numbered above, or that was raised
-- over them (a restatement, src/partition/restate.rs) ('' : none), stored as meta 'seq_floor'
-- and written on each entry as field 'f'
-- ARGV[14] n outbox entries, then n x (kind, key, value, headers)
-- then a sorted-set upserts, then a x (key index, score, member)
-- then r sorted-set removals, then r x (key index, member)
-- then c tier-count deltas, then c x (tier, delta)
-- then one state value per customer key ('' : delete the key, the customer was erased)
-- Returns {'OK', previous next_offset, outbox length} | {'ALREADY', next_offset}
--       | {'FENCED', stored epoch, next_offset} | {'DIVERGED', next_offset}
local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch')
if epoch ~= ARGV[1] then
  return {'FENCED', epoch or '', redis.call('HGET', meta, 'next_offset') or ''}
end
local stored = tonumber(redis.call('HGET', meta, 'next_offset') or '-1')
local commits = tonumber(redis.call('HGET', meta, 'commits') or '0')
local expected = tonumber(ARGV[2])
local first = tonumber(ARGV[3])
local stop = tonumber(ARGV[4])
local expected_commits = tonumber(ARGV[5])
if commits == expected_commits + 1 and stored == stop then
  -- This very commit was applied by an earlier call whose reply was lost.
  return {'ALREADY', tostring(stored)}
end
if stored ~= expected or commits ~= expected_commits or first < expected then
  -- Redis no longer holds what the owner committed (lost writes, restored backup) or the
  -- batch overlaps it: the owner's cache cannot be trusted; it must reload and seek.
  return {'DIVERGED', tostring(stored)}
end
local first_state = tonumber(ARGV[9])
local i = 14
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  -- 'o': the input offset this commit leaves the partition at (a replay after Redis lost
  -- writes knows how far the published changes reach into the input).
  -- (Three calls rather than one over a table of fields: no table per entry; under a floor,
  -- a commit without changes writes an empty 'q'.)
  if ARGV[12] == '' and ARGV[13] == '' then
    redis.call('XADD', KEYS[2], '*', 't', ARGV[i], 'k', ARGV[i + 1], 'v', ARGV[i + 2], 'h', ARGV[i + 3], 'o', ARGV[4])
  elseif ARGV[13] == '' then
    redis.call('XADD', KEYS[2], '*', 't', ARGV[i], 'k', ARGV[i + 1], 'v', ARGV[i + 2], 'h', ARGV[i + 3], 'o', ARGV[4], 'q', ARGV[12])
  else
    redis.call('XADD', KEYS[2], '*', 't', ARGV[i], 'k', ARGV[i + 1], 'v', ARGV[i + 2], 'h', ARGV[i + 3], 'o', ARGV[4], 'q', ARGV[12], 'f', ARGV[13])
  end
  if ARGV[i] == 's' then
    -- A rules sweep started: a resumed sweep keeps its time (see store::outbox::RulesSweep).
    redis.call('HSET', meta, 'sweep', ARGV[i + 2])
  end
  i = i + 4
end
local a = tonumber(ARGV[i]); i = i + 1
for _ = 1, a do
  redis.call('ZADD', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
local r = tonumber(ARGV[i]); i = i + 1
for _ = 1, r do
  redis.call('ZREM', KEYS[tonumber(ARGV[i])], ARGV[i + 1])
  i = i + 2
end
local c = tonumber(ARGV[i]); i = i + 1
for _ = 1, c do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  i = i + 2
end
-- While a `tierd export` reads a snapshot of the partition (its lease exists), the value a
-- state key had when the snapshot opened is saved before its first overwrite or deletion
-- ('' : absent then), with the lease's time to live. A hash without its '~open' field was
-- evicted: the snapshot is void, its lease removed (the export sees it lapsed).
local saving = redis.call('EXISTS', KEYS[4]) == 1
if saving and redis.call('HEXISTS', KEYS[5], '~open') == 0 then
  redis.call('DEL', KEYS[4], KEYS[5])
  saving = false
end
for k = first_state, #KEYS do
  if saving and redis.call('HEXISTS', KEYS[5], KEYS[k]) == 0 then
    redis.call('HSET', KEYS[5], KEYS[k], redis.call('GET', KEYS[k]) or '')
  end
  if ARGV[i] == '' then
    redis.call('DEL', KEYS[k])
  else
    redis.call('SET', KEYS[k], ARGV[i])
  end
  i = i + 1
end
if saving then
  redis.call('PEXPIRE', KEYS[5], math.max(redis.call('PTTL', KEYS[4]), 1))
end
redis.call('HSET', meta, 'next_offset', ARGV[4], 'commits', tostring(commits + 1))
-- The topic id the offset was read from stays paired with it (see claim.lua).
local paired = redis.call('HGET', meta, 'offset_topic')
if paired then
  local at, id = string.match(paired, '^(%-?%d+):(.+)$')
  if tonumber(at) == stored then
    redis.call('HSET', meta, 'offset_topic', ARGV[4] .. ':' .. id)
  end
end
if ARGV[6] ~= '' then
  redis.call('HSET', meta, 'clock', ARGV[6])
end
if ARGV[7] ~= '' then
  redis.call('HSET', meta, 'rules', ARGV[7])
end
if ARGV[11] == '' then
  redis.call('HDEL', meta, 'offset_epoch')
elseif ARGV[11] ~= '-' then
  redis.call('HSET', meta, 'offset_epoch', ARGV[4] .. ':' .. ARGV[11])
end
if ARGV[8] ~= '' then
  redis.call('HSET', meta, 'cutoffs', ARGV[8])
end
if ARGV[13] ~= '' and redis.call('HGET', meta, 'seq_floor') ~= ARGV[13] then
  redis.call('HSET', meta, 'seq_floor', ARGV[13])
end
if ARGV[10] == '-' then
  redis.call('HDEL', meta, 'rerank')
elseif ARGV[10] ~= '' then
  redis.call('HSET', meta, 'rerank', ARGV[10])
end
return {'OK', tostring(stored), tostring(redis.call('XLEN', KEYS[2]))}
