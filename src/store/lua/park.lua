-- Moves one outbox entry to the parked stream (a dead letter Kafka refuses for good, or one
-- Redis losing writes brought back), for the partition's current owner only, and only while
-- the entry is still in the outbox: a letter the claim or another publisher parked already is
-- not parked twice (it would be delivered twice).
-- KEYS[1] outbox stream, KEYS[2] parked stream, KEYS[3] meta hash (the claim epoch).
-- ARGV[1] the entry's id, ARGV[2] the publisher's claim epoch, ARGV[3..6] its fields t, k, v, h,
-- ARGV[7] the reason. The parked entry keeps the outbox id it had (field 'i'): a publisher
-- starting on the partition records it in the published position (see claim.lua, ARGV[6]).
-- Returns 1 (parked), 0 (no longer in the outbox: nothing done) or -1 (another claim is
-- current: nothing done).
if redis.call('HGET', KEYS[3], 'epoch') ~= ARGV[2] then
  return -1
end
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', 't', ARGV[3], 'k', ARGV[4], 'v', ARGV[5], 'h', ARGV[6],
  'e', ARGV[7], 'i', ARGV[1])
return 1
