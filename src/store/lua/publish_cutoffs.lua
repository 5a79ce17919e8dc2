-- Publishes new rank cut-offs. Only the owner of partition 0 computes them (Kafka's group
-- assignment decides who that is); the partition's fencing epoch keeps a stale owner from
-- publishing. KEYS[1] partition 0 meta   KEYS[2] cut-offs hash
-- ARGV[1] owner epoch   ARGV[2] cut-offs JSON (its version field is set here)
-- ARGV[3] version floor: the new version is above it too (after Redis lost writes, versions
-- already applied and published are never issued again for other values)
-- ARGV[4] the stored version the cut-offs were computed after (0: none stored): a publication
-- that arrives after a later one (a call that timed out and ran late) changes nothing
-- Returns the new version, -1 when fenced, -2 when another version was published since.
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return -1
end
local version = tonumber(redis.call('HGET', KEYS[2], 'version') or '0')
if version ~= tonumber(ARGV[4] or '0') then
  return -2
end
local floor = tonumber(ARGV[3] or '0')
if floor > version then
  version = floor
end
version = version + 1
redis.call('HSET', KEYS[2], 'version', version, 'data', ARGV[2])
return version
