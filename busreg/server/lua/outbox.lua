-- Trim the outbox entries the broker confirmed and return the next ones (fenced).
-- KEYS[1] the partition's state hash, KEYS[2] its outbox list; ARGV[1] token, ARGV[2] number of the first entry not yet
-- confirmed (-1: none confirmed by this call), ARGV[3] how many entries to return.
-- Returns {number of the first entry returned, entries...}.
--
-- Entries are numbered: the list's head has number state.obase, and every trim moves it.
-- Trimming "up to entry n" is idempotent: if this ran and its reply was lost, running it
-- again (the same n) trims nothing more, so no entry is dropped before it was published.
local st, box = KEYS[1], KEYS[2]
if redis.call('HGET', st, 'fence') ~= ARGV[1] then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is not current')
end
local base = tonumber(redis.call('HGET', st, 'obase') or '0')
local upto = tonumber(ARGV[2])
if upto > base then
  local n = math.min(upto - base, redis.call('LLEN', box))
  if n > 0 then redis.call('LTRIM', box, n, -1) end
  base = base + n
  redis.call('HSET', st, 'obase', base)
end
local out = redis.call('LRANGE', box, 0, tonumber(ARGV[3]) - 1)
table.insert(out, 1, base)
return out
