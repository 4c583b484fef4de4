-- Remove a worker from the live set (graceful stop). KEYS[1] workers zset; ARGV[1] id
return redis.call('ZREM', KEYS[1], ARGV[1])
