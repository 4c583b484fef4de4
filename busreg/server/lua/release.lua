-- Give a partition up at once (graceful stop), so a standby takes it without waiting.
-- KEYS[1] partition prefix; ARGV[1] "<worker>|<token>"
if redis.call('GET', KEYS[1] .. 'lease') == ARGV[1] then
  redis.call('DEL', KEYS[1] .. 'lease')
  return 1
end
return 0
