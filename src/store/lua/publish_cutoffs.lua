-- Publishes new rank cut-offs. Only the owner of partition 0 computes them (Kafka's group
-- assignment decides who that is); the partition's fencing epoch keeps a stale owner from
-- publishing. KEYS[1] partition 0 meta   KEYS[2] cut-offs hash
-- ARGV[1] owner epoch   ARGV[2] cut-offs JSON (its version field is set here)
-- Returns the new version, or -1 when fenced.
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return -1
end
local version = redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('HSET', KEYS[2], 'data', ARGV[2])
return version
