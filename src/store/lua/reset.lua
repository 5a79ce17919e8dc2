-- `tierd offsets reset` of one partition of a stopped group, in one atomic step: either all
-- of it happens or none (no claim or commit can interleave, no half-done reset is left).
--
-- KEYS[1] meta hash   KEYS[2] outbox stream   KEYS[3] timer index   KEYS[4] tier counts
-- KEYS[5] the lease of an export's snapshot (snapshot.lua): a state removed under it would
-- be missing from the export, so nothing is changed while it exists
-- ARGV[1] the new next offset
-- ARGV[2] '1': remove the partition's state (customers, timers, rank sets, tier counts) and
--         what belonged to it in meta; '0': keep it
-- ARGV[3] the epoch, ARGV[4] the next offset and ARGV[5] the commit count the tool read when
--         it checked the group ('' : none): any other value now means an instance claimed or
--         committed since, and nothing is changed
-- ARGV[6] SCAN pattern of the partition's customer keys, ARGV[7] of its rank sets
-- ARGV[8] the sequence floor to store ('' : unchanged)
-- Returns {'OK', customers removed} | {'MOVED', epoch, next offset, commits}
--       | {'OUTBOX', entries not published yet} | {'EXPORTING', the export's id}
local meta = KEYS[1]
local epoch = redis.call('HGET', meta, 'epoch') or ''
local stored = redis.call('HGET', meta, 'next_offset') or ''
local commits = redis.call('HGET', meta, 'commits') or ''
if epoch ~= ARGV[3] or stored ~= ARGV[4] or commits ~= ARGV[5] then
  return {'MOVED', epoch, stored, commits}
end
local exporting = redis.call('GET', KEYS[5])
if exporting and ARGV[2] == '1' then
  return {'EXPORTING', exporting}
end
local removed = 0
if ARGV[2] == '1' then
  local pending = redis.call('XLEN', KEYS[2])
  if pending > 0 then
    return {'OUTBOX', tostring(pending)}
  end
  for _, pattern in ipairs({ARGV[6], ARGV[7]}) do
    local cursor = '0'
    repeat
      local page = redis.call('SCAN', cursor, 'MATCH', pattern, 'COUNT', 1000)
      cursor = page[1]
      if #page[2] > 0 then
        redis.call('DEL', unpack(page[2]))
        if pattern == ARGV[6] then
          removed = removed + #page[2]
        end
      end
    until cursor == '0'
  end
  redis.call('DEL', KEYS[3], KEYS[4])
  -- What belonged to the removed state: its event clock, a rules sweep or re-ranking under
  -- way. The cut-offs it applied last stay: the recount starts under them.
  redis.call('HDEL', meta, 'clock', 'sweep', 'rerank')
  if ARGV[8] ~= '' then
    redis.call('HSET', meta, 'seq_floor', ARGV[8])
  end
end
redis.call('HSET', meta, 'next_offset', ARGV[1])
-- The leader epoch and topic id stored were paired with the old offset.
redis.call('HDEL', meta, 'offset_epoch', 'offset_topic')
return {'OK', tostring(removed)}
