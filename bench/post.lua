-- wrk script for bench/_common.py: POST the file named by $BODY with $CONTENT_TYPE, then
-- print one RESULT line that post_load() parses. 503 answers (refusals: the pipeline could
-- not take the request now) are counted apart from other non-2xx answers.
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
local f = assert(io.open(os.getenv("BODY"), "rb"))
wrk.body = f:read("*a")
f:close()

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

refused = 0

function response(status, headers, body)
  if status == 503 then
    refused = refused + 1
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local r = 0
  for _, thread in ipairs(threads) do
    r = r + thread:get("refused")
  end
  io.write(string.format(
    "RESULT requests=%d duration_s=%.3f non_2xx=%d errors=%d p50_ms=%.3f p99_ms=%.3f " ..
    "refused=%d\n",
    summary.requests, summary.duration / 1e6, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, r))
end
