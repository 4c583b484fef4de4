-- Controller membership: refresh this worker's liveness and list the live workers, and the
-- partitions that have live leases (standby workers tick only those; their owners keep the
-- set: PartitionStore.set_busy).
-- KEYS[1] workers zset, KEYS[2] busy set (partition numbers)
-- ARGV[1] worker id ('' to only read), ARGV[2] ttl ms
-- Returns {Redis ms now, {id, deadline ms, ...} of the live workers, {busy partitions}}.
-- (readers without write access: PartitionStore.live_workers)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1]) end
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES'), redis.call('SMEMBERS', KEYS[2])}
