-- A consistent read of one partition's customer states while tierd commits to it (`tierd
-- export`), by copy-on-write: while the lease KEYS[2] holds an export's id, the commit script
-- saves the value each state key had when the snapshot opened into the hash KEYS[3] (state
-- key -> value, '' : absent then), before the key's first overwrite or deletion. A key not in
-- the hash has not been written since, so its current value is its value at the snapshot.
--
-- KEYS[1] meta hash   KEYS[2] lease (string: the export's id, with a time to live)
-- KEYS[3] snapshot hash   KEYS[4..] ('read' only) state keys to read
-- ARGV[1] 'open' | 'read' | 'close'   ARGV[2] the export's id   ARGV[3] the lease's time to
-- live, ms (each 'read' renews it, and the hash's)
-- The hash holds the field '~open' from the open on (never a state key: those start with the
-- partition's key base): a lease whose hash lost it (a `volatile-*` eviction policy evicted
-- the hash) is treated as lapsed, by the commit script and here.
-- open:  {'OK', commits, next_offset} (the partition's position at the snapshot)
--      | {'BUSY', the id holding the lease} (an export reads this partition: ids are unique
--        per run, and a run closes before it opens again)
-- read:  {'OK' | 'LOST', one value per key ('' : absent at the snapshot)}; 'LOST': the lease
--        expired or was taken, the values are the current ones, not the snapshot's
-- close: {'OK'} (the lease and the hash removed if still this export's)
local mode, id, ttl = ARGV[1], ARGV[2], ARGV[3]
local holder = redis.call('GET', KEYS[2])
if mode == 'open' then
  if holder then
    return {'BUSY', holder}
  end
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[2], id, 'PX', ttl)
  redis.call('HSET', KEYS[3], '~open', '1')
  redis.call('PEXPIRE', KEYS[3], ttl)
  return {'OK', redis.call('HGET', KEYS[1], 'commits') or '',
          redis.call('HGET', KEYS[1], 'next_offset') or ''}
elseif mode == 'read' then
  local held = holder == id and redis.call('HEXISTS', KEYS[3], '~open') == 1
  if held then
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
  local out = {held and 'OK' or 'LOST'}
  for k = 4, #KEYS do
    local v = held and redis.call('HGET', KEYS[3], KEYS[k])
    if not v then
      v = redis.call('GET', KEYS[k]) or ''
    end
    out[#out + 1] = v
  end
  return out
else
  if holder == id then
    redis.call('DEL', KEYS[2], KEYS[3])
  end
  return {'OK'}
end
