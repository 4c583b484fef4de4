-- Shared by apply.lua and snapshot.lua (busreg.server.store puts it in front of both): what
-- subscribers see of an instance with an operator override.
--
-- j: the full instance JSON; o: the ovr entry (incarnation, 20 digits, .. override JSON).
-- The effective status goes in "status" and the override itself in "override". The
-- instance's own DOWN or STARTING wins over an override (Eureka's DownOrStartingRule: an
-- operator cannot make a failing instance UP). The stored JSON has sorted keys, so the
-- top-level status follows metadata at the one place '},"status":"' can occur (inside
-- metadata, '"' is escaped).
local function with_override(j, o)
  local ojson = string.sub(o, 21)
  local forced = string.match(ojson, '^{"status":"([A-Z_]+)"')
  local _, e = string.find(j, '},"status":"', 1, true)
  local close = string.find(j, '"', e + 1, true)
  local own = string.sub(j, e + 1, close - 1)
  if own == 'UP' or own == 'OUT_OF_SERVICE' then
    j = string.sub(j, 1, e) .. forced .. string.sub(j, close)
  end
  return string.sub(j, 1, -2) .. ',"override":' .. ojson .. '}'
end

