-- Claims a partition for a new owner: bumps the fencing epoch (so any previous owner's next
-- commit fails) and returns it with the offset to resume from (-1: nothing applied yet).
-- KEYS[1] meta hash
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local next_offset = redis.call('HGET', KEYS[1], 'next_offset') or '-1'
return {tostring(epoch), next_offset}
