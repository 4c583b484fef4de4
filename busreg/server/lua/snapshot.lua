-- One service's instances and revision, read atomically. KEYS[1] the partition's state
-- hash, KEYS[2] its rev hash, KEYS[3] the service's hash s:<svc>, KEYS[4] the partition's
-- operator overrides (ovr); ARGV[1] service.
-- Entries are version (36 bytes) .. stored JSON (no service, instance_id: see apply.lua);
-- subscribers get the full instance JSON, with an override merged (override.lua). The 4th
-- element is 1 while the partition has no state yet or is rebuilding it (apply.lua): what
-- it holds then is not the registry's.
local service = ARGV[1]
local VW = 36  -- version width, as in apply.lua
local SEP = '\31'
local st = redis.call('HMGET', KEYS[1], 'epoch', 'rebuild')
local epoch = st[1] or ''
local rebuilding = (st[1] == false or st[2] ~= false) and 1 or 0
local rev = redis.call('HGET', KEYS[2], service) or '0'
local all = redis.call('HGETALL', KEYS[3])
local overrides = redis.call('HLEN', KEYS[4]) > 0  -- rare: skip the lookups without any
local out = {}
for i = 1, #all, 2 do
  local j = '{"instance_id":"' .. all[i] .. '","service":"' .. service .. '",'
    .. string.sub(all[i + 1], VW + 2)  -- past the version and the stored JSON's '{'
  local o = overrides and redis.call('HGET', KEYS[4], service .. SEP .. all[i])
  if o then j = with_override(j, o) end  -- override.lua, in front of this script
  out[#out + 1] = j
end
return {epoch, rev, out, rebuilding}
