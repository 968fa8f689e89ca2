-- wrk script for the churn/soak tests: every request carries a tenant id.
--
-- Environment (read once per thread):
--   TRL_WRK_MODE     "distinct" (default): a new id per request, "<prefix><thread>-<n>"
--                    "cycle": ids "<prefix>0" .. "<prefix><TRL_WRK_TENANTS-1>" in turn
--   TRL_WRK_PREFIX   id prefix (default "t")
--   TRL_WRK_TENANTS  tenant count for "cycle" (default 8)
--   TRL_WRK_LIMIT    requests per thread; the thread stops after sending that many (0 = no
--                    limit, -d bounds the run). A few extra may be in flight when it stops.
-- done() prints one line "WRK_RESULT {json}" for the test to parse.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  mode = os.getenv("TRL_WRK_MODE") or "distinct"
  prefix = os.getenv("TRL_WRK_PREFIX") or "t"
  ntenants = tonumber(os.getenv("TRL_WRK_TENANTS") or "8")
  limit = tonumber(os.getenv("TRL_WRK_LIMIT") or "0")
  base = prefix .. tostring(tid) .. "-"
  hdrs = {}
  sent = 0
end

function request()
  sent = sent + 1
  if limit > 0 and sent >= limit then
    wrk.thread:stop()
  end
  if mode == "cycle" then
    hdrs["x-tenant-id"] = prefix .. tostring(sent % ntenants)
  else
    hdrs["x-tenant-id"] = base .. tostring(sent)
  end
  return wrk.format("GET", "/", hdrs)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout))
end
