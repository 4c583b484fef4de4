-- Controller membership: refresh this worker's liveness and list the live workers.
-- KEYS[1] workers zset; ARGV[1] worker id, ARGV[2] ttl ms (readers: PartitionStore.live_workers)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
return {now, redis.call('ZRANGE', KEYS[1], 0, -1)}
