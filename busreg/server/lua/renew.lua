-- Extend our lease; 0 if another token is current (we were fenced).
-- KEYS[1] the partition's state hash, KEYS[2] its lease key; ARGV[1] "<worker>|<token>", ARGV[2] token, ARGV[3] lease ms
-- A lease key that expired while nobody else acquired the partition (our token is still the
-- fence: no other writer can have existed) is simply taken back, so a worker stalled a bit
-- longer than its lease does not restart its partitions for nothing.
local st, lease = KEYS[1], KEYS[2]
if redis.call('HGET', st, 'fence') ~= ARGV[2] then return 0 end
local cur = redis.call('GET', lease)
if cur == ARGV[1] then
  redis.call('PEXPIRE', lease, ARGV[3])
  return 1
end
if not cur then
  redis.call('SET', lease, ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
