-- Take ownership of a partition if it is free (or already ours), with a new fencing token.
-- KEYS[1] the partition's state hash, KEYS[2] its lease key; ARGV[1] worker id, ARGV[2] lease ms, ARGV[3] epoch if new,
-- ARGV[4] a random nonce of this acquisition
-- The lease key expires on Redis' clock, never the worker's (invariant 8). The token is
-- "<epoch>/<n>.<nonce>": n grows with every acquisition and the epoch changes if Redis lost
-- the partition's state. n alone can repeat: a failover to a replica that missed the last
-- HINCRBY hands out the same n again; the nonce makes two acquisitions' tokens differ
-- even then, so two workers never hold one token (invariant 3).
local st, lease = KEYS[1], KEYS[2]
local cur = redis.call('GET', lease)
if cur then
  local owner = string.match(cur, '^(.*)|')
  if owner ~= ARGV[1] then return {0, cur} end
end
local epoch = redis.call('HGET', st, 'epoch')
if not epoch then
  -- new state: a first start, or Redis lost the partition; the first apply decides
  -- whether history must be replayed quietly first (see apply.lua, "Rebuild")
  epoch = ARGV[3]
  redis.call('HSET', st, 'epoch', epoch, 'rebuild', 'pending')
end
local token = epoch .. '/' .. redis.call('HINCRBY', st, 'fence_n', 1) .. '.' .. ARGV[4]
redis.call('HSET', st, 'fence', token)
redis.call('SET', lease, ARGV[1] .. '|' .. token, 'PX', ARGV[2])
local s = redis.call('HMGET', st, 'offset', 'clock')
return {1, token, epoch, s[1] or '-1', s[2] or ''}
