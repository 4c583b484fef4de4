-- Every service of a partition with its revision and instance count. KEYS[1] prefix
local p = KEYS[1]
local out = {redis.call('HGET', p .. 'state', 'epoch') or ''}
local revs = redis.call('HGETALL', p .. 'rev')
for i = 1, #revs, 2 do
  out[#out + 1] = revs[i]
  out[#out + 1] = revs[i + 1]
  out[#out + 1] = redis.call('HLEN', p .. 's:' .. revs[i])
end
return out
