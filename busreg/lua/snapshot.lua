-- One service's instances and revision, read atomically. KEYS[1] prefix; ARGV[1] service
local p = KEYS[1]
local epoch = redis.call('HGET', p .. 'state', 'epoch') or ''
local rev = redis.call('HGET', p .. 'rev', ARGV[1]) or '0'
return {epoch, rev, redis.call('HVALS', p .. 's:' .. ARGV[1])}
