-- tenant-ratelimit-service: GCRA over one or more buckets, all or nothing, on Redis's clock.
-- The representation and the math are documented in service/src/units.rs (a Rust model of
-- this script, unit-tested against the filter's src/bucket.rs).
--
-- KEYS[i]   a bucket: value struct.pack('<Bddd', 1, D, T, I): debt in U = 2^-10 us, Redis
--           time in us when written, interval in U it was written with; absent = full.
--           (25 bytes; the text form "D T I" of earlier builds is still read.)
-- ARGV[1]   "d" = debit: admit every key or none; "r" = refund an earlier debit.
-- ARGV[2]   refund only: the Redis time (us) the debit ran at.
-- ARGV[3i], ARGV[3i+1], ARGV[3i+2]   key i's interval (U), capacity, cost.
-- Returns {now_us, then per key: allowed (1/0), tokens remaining, U until full, U until
-- this cost fits (0 if allowed)}.
-- Every number stays an integer below 2^53 (checked at config time), so doubles are exact;
-- multiplying by 1024 only moves the exponent, and the stored doubles are the numbers
-- themselves (packed, no decimal conversion: formatting and parsing text was a third of the
-- script's time).
local fmod, tonumber, call, pack, unpack = math.fmod, tonumber, redis.call, struct.pack, struct.unpack
local t = call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local refund = ARGV[1] == 'r'
local debt = {}
-- Keys read by this call (a key named twice is read once), with the interval to write.
local wkey, wint, nw = {}, {}, 0
local out = {now}
local no = 1
local all = true
local before = {}
-- Keys whose stored state was carried over to a changed limit (the value carried): written
-- back even when the request is denied, so the carried state refills from now on.
local carried = {}

-- Whole tokens in `spare` U: floor(spare / interval), exact (fmod is exact on doubles).
local function tokens(spare, interval)
  if spare <= 0 then return 0 end
  return (spare - fmod(spare, interval)) / interval
end

-- Writes a bucket that is not full; it expires when full again (rounded up to the next ms:
-- early expiry would grant tokens).
local function store(key, d, interval)
  call('SET', key, pack('<Bddd', 1, d, now, interval), 'PX', (d - fmod(d, 1024000)) / 1024000 + 1)
end

for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 3 * i
  local interval = tonumber(ARGV[base])
  local cap = tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 2])
  local tau = cap * interval
  local d = debt[key]
  if d == nil then
    d = 0
    local v = call('GET', key)
    if v then
      local sd, st, si
      if #v == 25 and v:byte(1) == 1 then
        local _
        _, sd, st, si = unpack('<Bddd', v)
      else
        sd, st, si = v:match('^(%d+) (%d+) (%d+)$')
        sd = tonumber(sd); st = tonumber(st); si = tonumber(si)
      end
      if sd and st and si then
        local elapsed = now - st
        -- A clock that went backwards (failover to a skewed replica) refills nothing.
        if elapsed < 0 then elapsed = 0 end
        d = sd - elapsed * 1024
        if d < 0 then d = 0 end
        -- The limit changed since the write: the tokens already spent stay spent (rounded
        -- up), at most the new capacity, as bucket::rescale in the filter.
        if si ~= interval and d > 0 and si > 0 then
          local spent = tokens(d, si)
          if fmod(d, si) > 0 then spent = spent + 1 end
          if spent > cap then spent = cap end
          d = spent * interval
          carried[key] = d
        end
        -- Same rate, smaller capacity (the key holds no capacity): at most the new one.
        if d > tau then
          d = tau
          carried[key] = d
        end
      end
    end
    nw = nw + 1
    wkey[nw] = key
    wint[nw] = interval
  end
  before[i] = d
  if refund then
    local elapsed = now - tonumber(ARGV[2])
    if elapsed < 0 then elapsed = 0 end
    -- Only the part of the debit that cannot have refilled yet: never more than the bucket
    -- would hold had the debit not happened.
    local give = cost * interval - elapsed * 1024
    if give > 0 then d = d - give end
    if d < 0 then d = 0 end
    debt[key] = d
    out[no + 1] = 1; out[no + 2] = tokens(tau - d, interval); out[no + 3] = d; out[no + 4] = 0
  else
    local next = d + cost * interval
    if cost <= cap and next <= tau then
      debt[key] = next
      out[no + 1] = 1; out[no + 2] = tokens(tau - next, interval); out[no + 3] = next; out[no + 4] = 0
    else
      debt[key] = d
      all = false
      local retry = next - tau
      if cost > cap then retry = -1 end
      out[no + 1] = 0; out[no + 2] = tokens(tau - d, interval); out[no + 3] = d; out[no + 4] = retry
    end
  end
  no = no + 4
end

if refund or all then
  for j = 1, nw do
    local key = wkey[j]
    local d = debt[key]
    if d <= 0 then
      -- Full again: a missing key is a full bucket, so nothing needs keeping.
      call('DEL', key)
    else
      store(key, d, wint[j])
    end
  end
else
  -- A state carried over to a changed limit is written as it is now (no debit), so it
  -- refills from here; left unwritten, the old debt would be clamped again on every call.
  for j = 1, nw do
    local d = carried[wkey[j]]
    if d and d > 0 then store(wkey[j], d, wint[j]) end
  end
  -- Someone was denied: nothing is debited, so report every admitted descriptor as it was.
  for i = 1, #KEYS do
    local o = 4 * i - 2
    if out[o] == 1 then
      local base = 3 * i
      local interval = tonumber(ARGV[base])
      local tau = tonumber(ARGV[base + 1]) * interval
      out[o + 1] = tokens(tau - before[i], interval)
      out[o + 2] = before[i]
    end
  end
end
return out
