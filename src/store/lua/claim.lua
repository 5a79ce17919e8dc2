-- Claims a partition for a new owner: bumps the fencing epoch (so any previous owner's next
-- commit fails) and returns it with where to resume: the next offset (-1: nothing applied
-- yet), the number of commits so far, the partition's event-time clock ('' if none) and the
-- hash of the rules version whose sweep completed ('' if none) and the rank cut-offs the
-- partition last finished applying ('' if none).
-- KEYS[1] meta hash
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local next_offset = redis.call('HGET', KEYS[1], 'next_offset') or '-1'
local commits = redis.call('HGET', KEYS[1], 'commits') or '0'
local clock = redis.call('HGET', KEYS[1], 'clock') or ''
local rules = redis.call('HGET', KEYS[1], 'rules') or ''
local cutoffs = redis.call('HGET', KEYS[1], 'cutoffs') or ''
return {tostring(epoch), next_offset, commits, clock, rules, cutoffs}
