-- Every service of a partition with its revision and instance count, read atomically.
-- KEYS[1] the partition's state hash, KEYS[2] its rev hash, then s:<svc> of the services
-- the caller knows (Redis Cluster only guarantees declared keys). If the partition has a
-- service the caller did not declare, nothing is counted: the reply is {'undeclared', missing
-- services...}, and the caller asks again with them.
local st, revs = KEYS[1], KEYS[2]
local p = string.sub(st, 1, -6)  -- the prefix: KEYS[1] is p .. 'state'
local declared = {}
for i = 3, #KEYS do declared[KEYS[i]] = true end
local all = redis.call('HGETALL', revs)
local missing = {'undeclared'}
for i = 1, #all, 2 do
  if not declared[p .. 's:' .. all[i]] then missing[#missing + 1] = all[i] end
end
if #missing > 1 then return missing end
local out = {redis.call('HGET', st, 'epoch') or ''}
for i = 1, #all, 2 do
  out[#out + 1] = all[i]
  out[#out + 1] = all[i + 1]
  out[#out + 1] = redis.call('HLEN', p .. 's:' .. all[i])
end
return out
