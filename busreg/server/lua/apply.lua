-- Apply a batch of ingest events to one partition, atomically (invariants 1-5).
--
-- KEYS     the partition's keys, all under one prefix "busreg:{<ns>.<p>}:" (one hash tag:
--          one Cluster slot): state, rev, deadlines, tomb, tombdl, outbox, ovr, then s:<svc> of
--          every service the batch names and of every other service the caller knows in
--          the partition. Redis Cluster only guarantees declared keys (during a slot
--          migration an undeclared one may already be elsewhere), so the script touches
--          nothing else. Expiry or an announcement of every instance may need a service
--          the caller did not name: see "Undeclared services" below.
-- ARGV[1]  fencing token the caller holds; nothing is written unless it is current
-- ARGV[2]  max lease-clock step (ms)   ARGV[3] tombstone TTL (ms)
-- ARGV[4]  service exchange prefix     ARGV[5] number of events
-- ARGV[6]  outage grace (ms)
-- ARGV[7]  rebuild until: the stream's head offset when a rebuild began (-1: none known)
-- then 8 fields per event: offset, broker ts (ms), op, service, instance id,
--   version ("%020d%016d" of incarnation, seq: compares as a string), ttl (ms), payload
--   op U = register/heartbeat (payload: stored instance JSON, see s:<svc>)
--   op D = deregister         op N = no state change (tick; payload: dead letter or "")
--   op G = an outage mark (a tick from a worker that lost its way to the stream: its
--          leader moved or its node went away): every writer must find the stream again,
--          so expiry waits for `grace` ms of partition clock from here, as after a gap
--   op B = a batch of heartbeats (one message): its items follow as groups of their own,
--          op u (a heartbeat, fields as U) or op x (an item refused alone: payload = its
--          dead letter), applied with the batch's offset and clock or skipped with it
--   op O = an operator's status override (busreg set-status): version slot = the status
--          (UP, DOWN, OUT_OF_SERVICE; '' clears), payload = {"by","identity","reason"} JSON
--
-- Undeclared services: the script writes nothing it cannot finish. Announcing every
-- instance (after a failover or a rebuild, decided before anything is written) needs all
-- live services: if one is undeclared, the script returns {'undeclared', services...} at
-- once, and the caller calls again with them. Expiry needs the services of the due
-- leases: if one is undeclared, this call expires nothing (a later one does) and names
-- the missing services after the usual result, for the caller to call again at once.
--
-- Returns {offset, changes, applied, stale, replayed, expired, outbox length, due, number of
-- the first entry this call appended, {those entries}}, then the undeclared services of due
-- leases, if any (see above); due: see the end of the script.
--
-- Keys under the prefix:
--   state      hash  fence, epoch, offset, last_ts, clock, counters, replid
--   s:<svc>    hash  instance id -> version .. stored JSON: the 36-byte version of the
--                    newest applied event, then the canonical instance JSON without service
--                    and instance_id (codec.encode_stored; full() puts them back for
--                    subscribers). One entry instead of a second hash keyed by svc<US>id, and
--                    no copy of the key fields, save ~120 B per instance and one HGET per
--                    heartbeat.
--   deadlines  zset  svc<US>id -> lease deadline on the partition clock (ms)
--   tomb       hash  svc<US>id -> version at removal;  tombdl zset: when to forget it
--   rev        hash  svc -> revision (grows by one per visible change)
--   outbox     list  "<exchange><US><routing key><US><body>" awaiting publish
--   ovr        hash  svc<US>id -> incarnation (20 digits) .. override JSON: an operator's
--                    status override, as Eureka's overriddenStatus. It survives heartbeats
--                    and re-registrations of that incarnation; a newer incarnation, a
--                    removal or a clear drops it. Subscribers see it merged (visible()).
--
-- Rebuild after a data loss: acquire.lua marks a partition whose state it had to create
-- anew (state.rebuild = "pending"); the first batch turns that into the stream offset the
-- rebuild must reach (ARGV[7]), or clears it when nothing was there to replay. Until the
-- partition has applied that offset, events change state but announce nothing (no delta,
-- no revision): a replay of history must not tell subscribers about transitions that
-- happened long ago. Once caught up, every live instance is announced once ("added", the
-- new epoch's revisions 1..n), so subscribers converge on the caught-up state.
--
-- The partition clock advances with the broker timestamps of consumed events, by at most
-- max_step per event: it is a watermark of what was read, so a lagging worker or a broker
-- outage never expires a healthy instance (invariant 4). A larger jump means nobody could
-- write to the partition (broker outage); instances need time to reconnect and heartbeat
-- again, so expiry waits for `grace` ms of partition clock after such a gap, if the
-- partition had live leases then (with none, no instance missed a renewal).
local st, revs, dls, tomb, tombdl, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local ovr = KEYS[7]
local p = string.sub(st, 1, -6)  -- the prefix: KEYS[1] is p .. 'state'
local declared = {}
for i = 8, #KEYS do declared[KEYS[i]] = true end
local token = ARGV[1]
local max_step = tonumber(ARGV[2])
local tomb_ms = tonumber(ARGV[3])
local exch = ARGV[4]
local n = tonumber(ARGV[5])
local grace = tonumber(ARGV[6])
local FIRST = 7  -- events start after this many ARGV slots

local cur = redis.call('HMGET', st, 'fence', 'epoch', 'offset', 'last_ts', 'clock', 'grace_until',
  'rebuild', 'replid')
if cur[1] ~= token then
  return redis.error_reply('FENCED token ' .. token .. ' is not current')
end
local epoch = cur[2]
local offset = tonumber(cur[3]) or -1
local last_ts = tonumber(cur[4])
local clock = tonumber(cur[5])
local grace_until = tonumber(cur[6]) or 0
local SEP = '\31'

-- the service hash of `service`, or nil if the caller did not declare it
local function skey(service)
  local k = p .. 's:' .. service
  if declared[k] then return k end
  return nil
end

-- services named by `fields` (svc<US>id) that the caller did not declare
local function undeclared(fields)
  local missing, seen = {}, {}
  for _, field in ipairs(fields) do
    local service = string.sub(field, 1, string.find(field, SEP, 1, true) - 1)
    if not seen[service] and not skey(service) then
      seen[service] = true
      missing[#missing + 1] = service
    end
  end
  return missing
end

-- Decided before anything is written: does this call end a rebuild or follow a failover
-- (both announce every live instance, so every live service must be declared)?
local rebuild = cur[7]
local rebuild_write = nil  -- what to store in state.rebuild, once we write
if rebuild == 'pending' then
  local target = tonumber(ARGV[7])
  if target >= 0 and offset < target then
    rebuild, rebuild_write = target, target
  else
    rebuild, rebuild_write = false, false
  end
else
  rebuild = tonumber(rebuild)
end
local last_off = offset
if n > 0 then last_off = math.max(offset, tonumber(ARGV[FIRST + (n - 1) * 8 + 1])) end
local info = redis.pcall('INFO', 'replication')
local replid = type(info) == 'string' and string.match(info, 'master_replid:(%w+)') or nil
local failover = replid and cur[8] and cur[8] ~= replid
if failover or (rebuild and last_off >= rebuild) then
  local missing = undeclared(redis.call('ZRANGE', dls, 0, -1))
  if #missing > 0 then
    table.insert(missing, 1, 'undeclared')
    return missing
  end
end
if rebuild_write then
  redis.call('HSET', st, 'rebuild', rebuild_write)
elseif rebuild_write == false then
  redis.call('HDEL', st, 'rebuild')
end
local VW = 36  -- version width: "%020d%016d" of (incarnation < 2^63, seq < 2^53)
local applied, stale, replayed, changes, expired = 0, 0, 0, 0, 0
local missing = {}  -- services of due leases the caller did not declare
-- the entries this call appends to the outbox, and the number of the first: returned, so the
-- owner publishes them at once instead of reading them back (outbox.lua numbers entries)
local fresh = {}
local first_no = tonumber(redis.call('HGET', st, 'obase') or '0') + redis.call('LLEN', outbox)
local marks = 0  -- outage marks applied

-- What subscribers see: the stored JSON with service and instance_id in front. Both match
-- [A-Za-z0-9_.:@-]+ (models.py), so they need no JSON escaping.
local function full(service, iid, stored)
  return '{"instance_id":"' .. iid .. '","service":"' .. service .. '",' .. string.sub(stored, 2)
end

-- What subscribers see of an instance: with its operator override merged, if it has one
-- (with_override: override.lua, put in front of this script by the store)
local function visible(service, iid, stored)
  local j = full(service, iid, stored)
  local o = redis.call('HGET', ovr, service .. SEP .. iid)
  if not o then return j end
  return with_override(j, o)
end

local function announce(service, kind, inst, reason)
  if rebuild then return end  -- replaying history: state only (see the header)
  local rev = redis.call('HINCRBY', revs, service, 1)
  local body = '{"v":1,"kind":"' .. kind .. '","service":"' .. service .. '","epoch":"' .. epoch
    .. '","revision":' .. rev .. ',"instance":' .. inst .. ',"reason":'
    .. (reason and ('"' .. reason .. '"') or 'null') .. '}'
  local entry = exch .. service .. SEP .. kind .. SEP .. body
  redis.call('RPUSH', outbox, entry)
  changes = changes + 1
  fresh[changes] = entry
end

local function forget(field, ver)
  redis.call('HSET', tomb, field, ver)
  redis.call('ZADD', tombdl, clock + tomb_ms, field)
end

-- prev: the instance's stored entry (version .. JSON), or false if it has none
local function remove(service, iid, field, ver, reason, prev)
  local shown = prev and visible(service, iid, string.sub(prev, VW + 1))
  if prev then redis.call('HDEL', skey(service), iid) end
  redis.call('ZREM', dls, field)
  redis.call('HDEL', ovr, field)
  forget(field, ver)
  if prev then announce(service, 'removed', shown, reason) end
end

-- every live instance, once, as "added" in the (new) epoch: subscribers converge on it
local function announce_all()
  local live = redis.call('ZRANGE', dls, 0, -1)
  table.sort(live)
  for _, field in ipairs(live) do
    local cut = string.find(field, SEP, 1, true)
    local service, iid = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
    local entry = redis.call('HGET', skey(service), iid)
    if entry then announce(service, 'added', visible(service, iid, string.sub(entry, VW + 1)), nil) end
  end
end

-- A failover promotes a replica, and replication is asynchronous: writes this partition
-- had acknowledged may be gone, so revisions it published could be issued again with
-- other content. The state remembers the primary that last wrote it (its master_replid,
-- new at every promotion). Written on another one, the partition moves to a new epoch
-- whose revisions start again at 1 with the state as it is now, announced as after a
-- rebuild: groups get the state the new epoch starts from, and views, seeing the epoch
-- change, re-read their snapshot. A user without +info gets no replid (pcall): the check
-- is skipped, and the worker warns at start. (replid and failover: read above.)
if replid and cur[8] ~= replid then
  redis.call('HSET', st, 'replid', replid)
  if failover then
    epoch = 'r' .. string.sub(replid, 1, 11)
    redis.call('HSET', st, 'epoch', epoch)
    redis.call('DEL', revs)
    redis.call('HINCRBY', st, 'failovers', 1)
    announce_all()  -- (quiet while a rebuild replays: its own end announces)
  end
end

-- op U, and u (an item of a batch): a register or heartbeat
local function upsert(b)
  local service, iid, ver = ARGV[b + 4], ARGV[b + 5], ARGV[b + 6]
  local ttl, inst = tonumber(ARGV[b + 7]), ARGV[b + 8]
  local field = service .. SEP .. iid
  local sk = skey(service)
  local prev = redis.call('HGET', sk, iid)
  local fresh
  if prev then
    fresh = ver > string.sub(prev, 1, VW)
  else
    local t = redis.call('HGET', tomb, field)
    fresh = (not t) or ver > t
    if fresh and t then
      redis.call('HDEL', tomb, field)
      redis.call('ZREM', tombdl, field)
    end
  end
  if fresh then
    applied = applied + 1
    redis.call('ZADD', dls, clock + ttl, field)
    -- the version changes with every event, so the entry is always rewritten; only a
    -- change of what subscribers see is announced
    redis.call('HSET', sk, iid, ver .. inst)
    -- a new incarnation (the instance restarted) ends an operator's override
    local dropped = false
    if prev and string.sub(ver, 1, 20) > string.sub(prev, 1, 20) then
      dropped = redis.call('HDEL', ovr, field) == 1
    end
    if not prev then
      announce(service, 'added', visible(service, iid, inst), nil)
    elseif dropped or string.sub(prev, VW + 1) ~= inst then
      announce(service, 'modified', visible(service, iid, inst), nil)
    end
  else
    stale = stale + 1
  end
end

-- the dead letter in a group's payload, if any, goes out through the outbox
local function dead_letter(b)
  local dead = ARGV[b + 8]
  if dead ~= '' then
    redis.call('RPUSH', outbox, dead)
    changes = changes + 1
    fresh[changes] = dead
  end
end

-- A batch (op B: one message, one offset) is followed by its items as groups of their own:
-- u (a heartbeat) or x (an item refused alone, with its dead letter). They carry no offset
-- or time of their own: applied with their batch, or skipped with it when it is replayed.
local skipping = false
for i = 0, n - 1 do
  local b = FIRST + i * 8
  local op = ARGV[b + 3]
  if op == 'u' or op == 'x' then
    if not skipping then
      if op == 'u' then upsert(b) else dead_letter(b) end
    end
  else
    local off = tonumber(ARGV[b + 1])
    if off <= offset then
      replayed = replayed + 1
      skipping = op == 'B'
    else
      skipping = false
      offset = off
      local ts = tonumber(ARGV[b + 2])
      if last_ts == nil then
        last_ts, clock = ts, ts
      elseif ts > last_ts then
        local step = ts - last_ts
        if step > max_step then
          step = max_step
          -- the grace is for leases that could not be renewed across the gap; with none
          -- live there is nothing to wait for (a fresh or quiet partition: a grace opened
          -- then would hold back the expiry of instances that register after it)
          if redis.call('ZCARD', dls) > 0 then grace_until = clock + step + grace end
        end
        clock, last_ts = clock + step, ts
      end
      if op == 'U' then
        upsert(b)
      elseif op == 'B' then
        -- nothing of its own: its items follow
      elseif op == 'D' then
        local service, iid, ver = ARGV[b + 4], ARGV[b + 5], ARGV[b + 6]
        local field = service .. SEP .. iid
        local prev = redis.call('HGET', skey(service), iid)
        if prev and ver > string.sub(prev, 1, VW) then
          applied = applied + 1
          remove(service, iid, field, ver, 'deregistered', prev)
        else
          stale = stale + 1
          -- unknown instance: remember the deregistration so an older, late heartbeat of
          -- the same incarnation cannot register it afterwards
          if not prev then
            local t = redis.call('HGET', tomb, field)
            if (not t) or ver > t then forget(field, ver) end
          end
        end
      elseif op == 'G' then
        if redis.call('ZCARD', dls) > 0 then grace_until = math.max(grace_until, clock + grace) end
        marks = marks + 1
      elseif op == 'O' then
        -- an operator's override of a live instance (bound to its current incarnation);
        -- one for an unknown instance changes nothing (the CLI checks and says so)
        local service, iid, status = ARGV[b + 4], ARGV[b + 5], ARGV[b + 6]
        local field = service .. SEP .. iid
        local prev = redis.call('HGET', skey(service), iid)
        if prev then
          local old = redis.call('HGET', ovr, field)
          local stored = string.sub(prev, VW + 1)
          local before = visible(service, iid, stored)
          if status == '' then
            redis.call('HDEL', ovr, field)
          else
            -- the record keeps the time of the first of identical overrides (a retried
            -- publish changes nothing); "at" is broker time (ms), never the client's clock
            local body = string.sub(ARGV[b + 8], 2)
            local same = old and string.match(old, '^%d+{"status":"' .. status .. '","at":%d+,(.*)$')
            if same ~= body or string.sub(old, 1, 20) ~= string.sub(prev, 1, 20) then
              redis.call('HSET', ovr, field, string.sub(prev, 1, 20) .. '{"status":"' .. status
                .. '","at":' .. ARGV[b + 2] .. ',' .. body)
            end
          end
          applied = applied + 1
          local after = visible(service, iid, stored)
          if after ~= before then announce(service, 'modified', after, nil) end
        else
          stale = stale + 1
        end
      else
        dead_letter(b)
      end
    end
  end
end

if clock ~= nil then
  -- expiry: every lease whose deadline the watermark has passed (not during a grace)
  local due = {}
  if clock >= grace_until then
    due = redis.call('ZRANGEBYSCORE', dls, '-inf', '(' .. clock, 'LIMIT', 0, 1000)
    missing = undeclared(due)
    if #missing > 0 then due = {} end  -- all or nothing, in deadline order: see the header
  end
  for _, field in ipairs(due) do
    local cut = string.find(field, SEP, 1, true)
    local service, iid = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
    local prev = redis.call('HGET', skey(service), iid)
    remove(service, iid, field, prev and string.sub(prev, 1, VW) or '', 'expired', prev)
    expired = expired + 1
  end
  local old = redis.call('ZRANGEBYSCORE', tombdl, '-inf', clock, 'LIMIT', 0, 500)
  for _, field in ipairs(old) do
    redis.call('HDEL', tomb, field)
    redis.call('ZREM', tombdl, field)
  end
  redis.call('HSET', st, 'offset', offset, 'last_ts', last_ts, 'clock', clock,
    'grace_until', grace_until)
end
if rebuild and offset >= rebuild then
  -- caught up: announce the state the replay arrived at, once
  rebuild = false
  redis.call('HDEL', st, 'rebuild')
  announce_all()
end
if applied > 0 then redis.call('HINCRBY', st, 'applied', applied) end
if stale > 0 then redis.call('HINCRBY', st, 'stale', stale) end
if replayed > 0 then redis.call('HINCRBY', st, 'replayed', replayed) end
if expired > 0 then redis.call('HINCRBY', st, 'expired', expired) end
if marks > 0 then redis.call('HINCRBY', st, 'outage_marks', marks) end
-- When the owner must tick a quiet partition (ms of partition clock from now): when the first
-- lease falls due or the grace ends, whichever is later; -1 with no live lease (nothing can
-- expire and no gap can open a grace: a quiet partition needs no tick, see ticker.py)
local due = -1
if clock ~= nil then
  local first = redis.call('ZRANGE', dls, 0, 0, 'WITHSCORES')
  if #first > 0 then due = math.max(0, tonumber(first[2]) - clock, grace_until - clock) end
end
local out = {offset, changes, applied, stale, replayed, expired, redis.call('LLEN', outbox), due,
  first_no, fresh}
for _, service in ipairs(missing) do out[#out + 1] = service end
return out
