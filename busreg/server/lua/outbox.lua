-- Drop the n entries just confirmed by the broker and return the next ones (fenced).
-- KEYS[1] partition prefix; ARGV[1] token, ARGV[2] n done, ARGV[3] how many to return
local p = KEYS[1]
if redis.call('HGET', p .. 'state', 'fence') ~= ARGV[1] then
  return redis.error_reply('FENCED token ' .. ARGV[1] .. ' is not current')
end
local box = p .. 'outbox'
local done = tonumber(ARGV[2])
if done > 0 then redis.call('LTRIM', box, done, -1) end
return redis.call('LRANGE', box, 0, tonumber(ARGV[3]) - 1)
