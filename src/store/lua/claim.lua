-- Claims a partition for a new owner: bumps the fencing epoch (so any previous owner's next
-- commit fails) and returns it with where to resume: the next offset (-1: nothing applied
-- yet), the number of commits so far, the partition's event-time clock ('' if none) and the
-- hash of the rules version whose sweep completed ('' if none) and the rank cut-offs the
-- partition last finished applying ('' if none); the leader epoch of the record before
-- the next offset ('' if unknown); last, the latest rules sweep started ('' if none).
--
-- ARGV[1] is the last outbox id a committed Kafka transaction published ('' if none). The
-- entries up to it went out already (a previous owner may have died between its Kafka commit
-- and its trim) and are trimmed here, before anyone publishes again. If the stream's last
-- generated id is behind it, Redis lost writes (a restored snapshot, a lagging replica): every
-- entry left is then an old one, published already (nothing can be appended between the loss
-- and this claim: commits check the stored offset), so they are trimmed as well, and the
-- stream's id moves to the published one so that new entries sort after everything Kafka has.
-- Dead letters among the entries trimmed in that case are moved to the parked stream
-- (KEYS[3]) instead, with the reason ARGV[5]: Redis may have lost their parking too. The
-- seventh value returned says which case happened ('trimmed', 'behind' or ''), the last how
-- many dead letters were parked again. ARGV[6] lists (space-separated) the outbox ids of the
-- dead letters the published position records as parked: found at or before the published
-- id when the stream is not behind (Redis restored from before a parking, from a moment that
-- already held the round Kafka took last), they are parked again too, not trimmed.
--
-- ARGV[2] is the claimant's rules version. The partition remembers, in the order they first
-- claimed it, the rules versions that ran it (field 'versions', a JSON array of the latest
-- 32). A version that ran the partition before the latest one is older: its claim is refused
-- and changes nothing (not even the epoch), returning {'OLDER', latest, next offset} — otherwise a rolling
-- restart with two versions would move customers back and forth as partitions change hands.
-- A version never seen is newer and becomes the latest.
--
-- ARGV[4] is the claimant's rules text. The partition keeps the text of its latest version
-- (field 'rules_text', with the version it is of in 'rules_text_of') and of the one before it
-- ('prior_rules_text', moved there when a newer version first claims; none if the text kept
-- was not the latest version's): after Redis lost writes back to before a rules change, the input
-- applied before the change is replayed under the rules it first ran under. The prior text is
-- returned tenth ('' if none).
--
-- The partition's sequence floor (meta 'seq_floor', '0' if none: see commit.lua) is returned
-- last.
--
-- ARGV[3] is the input topic's id now ('' : unknown, not checked). The stored offset is paired
-- with the id of the topic it was read from (field 'offset_topic', '<next_offset>:<id>', kept
-- paired by every commit). A pair whose offset is still the stored one and whose id differs
-- means the topic was deleted and created again: its offsets name other records, so the
-- claim is refused and changes nothing, returning {'RECREATED', stored id, next offset}. An
-- offset moved by anything else (an operator's HSET, an older tierd) no longer pairs, and is
-- paired with the current id here.
-- KEYS[1] meta hash, KEYS[2] outbox stream, KEYS[3] parked stream
local topic = ARGV[3]
if topic ~= '' then
  local at = redis.call('HGET', KEYS[1], 'next_offset') or '-1'
  local paired = redis.call('HGET', KEYS[1], 'offset_topic')
  if paired and at ~= '-1' then
    local pat, id = string.match(paired, '^(%-?%d+):(.+)$')
    if pat == at and id ~= topic then
      return {'RECREATED', id, at}
    end
  end
end
local mine = ARGV[2]
local raw = redis.call('HGET', KEYS[1], 'versions')
local versions = {}
if raw then
  versions = cjson.decode(raw)
end
local latest = versions[#versions]
if latest ~= mine then
  for _, v in ipairs(versions) do
    if v == mine then
      return {'OLDER', latest, redis.call('HGET', KEYS[1], 'next_offset') or '-1'}
    end
  end
  table.insert(versions, mine)
  if #versions > 32 then
    table.remove(versions, 1)
  end
  redis.call('HSET', KEYS[1], 'versions', cjson.encode(versions))
  local text = redis.call('HGET', KEYS[1], 'rules_text')
  if text and redis.call('HGET', KEYS[1], 'rules_text_of') == latest then
    redis.call('HSET', KEYS[1], 'prior_rules_text', text)
  else
    redis.call('HDEL', KEYS[1], 'prior_rules_text')
  end
  redis.call('HSET', KEYS[1], 'rules_text', ARGV[4], 'rules_text_of', mine)
elseif redis.call('HGET', KEYS[1], 'rules_text_of') ~= mine then
  -- Kept since this version first claimed, or (a version an older tierd first ran here) from
  -- now on.
  redis.call('HSET', KEYS[1], 'rules_text', ARGV[4], 'rules_text_of', mine)
end

local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local next_offset = redis.call('HGET', KEYS[1], 'next_offset') or '-1'
if topic ~= '' then
  redis.call('HSET', KEYS[1], 'offset_topic', next_offset .. ':' .. topic)
end
local commits = redis.call('HGET', KEYS[1], 'commits') or '0'
local clock = redis.call('HGET', KEYS[1], 'clock') or ''
local rules = redis.call('HGET', KEYS[1], 'rules') or ''
local cutoffs = redis.call('HGET', KEYS[1], 'cutoffs') or ''

local outbox = ''
local parked_again = 0
local published = ARGV[1]
local pms, pseq = string.match(published, '^(%d+)-(%d+)$')
if pms then
  local lms, lseq = '0', '0'
  local exists = redis.call('EXISTS', KEYS[2]) == 1
  if exists then
    local info = redis.call('XINFO', 'STREAM', KEYS[2])
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        lms, lseq = string.match(info[i + 1], '^(%d+)-(%d+)$')
      end
    end
  end
  -- Millisecond parts have 13 digits: exact as Lua numbers.
  local behind = tonumber(lms) < tonumber(pms)
    or (tonumber(lms) == tonumber(pms) and tonumber(lseq) < tonumber(pseq))
  -- Parks the stream entry `entry` if it is a dead letter. Removed as it is parked: a script
  -- that fails part-way (Redis does not undo its earlier writes) leaves no letter in both
  -- streams for the claim's retry.
  local function park(entry)
    local f = {}
    local flat = entry[2]
    for i = 1, #flat, 2 do
      f[flat[i]] = flat[i + 1]
    end
    if f['t'] == 'd' or f['t'] == 'dn' then
      redis.call('XADD', KEYS[3], '*', 't', f['t'], 'k', f['k'] or '', 'v', f['v'] or '',
        'h', f['h'] or '',
        'e', ARGV[5], 'i', entry[1])
      redis.call('XDEL', KEYS[2], entry[1])
      parked_again = parked_again + 1
    end
  end
  if behind and exists then
    -- Every entry left was trimmed once and brought back. The changes among them went out,
    -- but a dead letter may have been parked instead (Kafka refused it), never delivered,
    -- with its parking lost too: dead letters are parked again so that none is lost (one
    -- that had been delivered goes out once more, byte-identical). Not when the stream is
    -- not behind: entries up to the published id are then a round whose trim a crash
    -- prevented, delivered, except the dead letters Kafka records as parked (below).
    local from = '-'
    while true do
      -- Dead letters carry whole input records: a few at a time.
      local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', 10)
      if #batch == 0 then
        break
      end
      for _, entry in ipairs(batch) do
        park(entry)
      end
      from = '(' .. batch[#batch][1]
    end
  elseif exists then
    for id in string.gmatch(ARGV[6] or '', '%S+') do
      local ms, seq = string.match(id, '^(%d+)-(%d+)$')
      local upto = ms and (tonumber(ms) < tonumber(pms)
        or (tonumber(ms) == tonumber(pms) and tonumber(seq) <= tonumber(pseq)))
      if upto then
        for _, entry in ipairs(redis.call('XRANGE', KEYS[2], id, id)) do
          park(entry)
        end
      end
    end
  end
  redis.call('XTRIM', KEYS[2], 'MINID', pms .. '-' .. string.format('%d', tonumber(pseq) + 1))
  outbox = 'trimmed'
  if behind then
    if exists then
      redis.call('XSETID', KEYS[2], published)
    else
      redis.call('XADD', KEYS[2], published, 't', '')
      redis.call('XDEL', KEYS[2], published)
    end
    outbox = 'behind'
    -- The millisecond part of the last id the restored stream had generated (0: no stream):
    -- every change Redis lost was added after it. Kept until Redis loses writes again (a
    -- replay a later owner goes on with reads the output topic back from there).
    redis.call('HSET', KEYS[1], 'restored_at', lms)
  end
end
-- The leader epoch counts only for the offset it was stored with: a next_offset moved since
-- (an operator's HSET, a commit by an older tierd) starts unvalidated instead of pairing with
-- a stale epoch, which librdkafka would take for a truncation.
local offset_epoch = ''
local paired = redis.call('HGET', KEYS[1], 'offset_epoch')
if paired then
  local at, e = string.match(paired, '^(%-?%d+):(%d+)$')
  if at == next_offset then
    offset_epoch = e
  end
end
local sweep = redis.call('HGET', KEYS[1], 'sweep') or ''
local prior = redis.call('HGET', KEYS[1], 'prior_rules_text') or ''
local seq_floor = redis.call('HGET', KEYS[1], 'seq_floor') or '0'
return {tostring(epoch), next_offset, commits, clock, rules, cutoffs, outbox, offset_epoch, sweep,
  prior, tostring(parked_again), seq_floor, redis.call('HGET', KEYS[1], 'restored_at') or '',
  redis.call('HGET', KEYS[1], 'restate') or ''}
