-- Give a partition up at once (graceful stop), so a standby takes it without waiting.
-- KEYS[1] the partition's lease key; ARGV[1] "<worker>|<token>"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
