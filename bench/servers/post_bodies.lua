-- wrk script for bench/serve_bench.py: POSTs JSON bodies read from a file (one per line),
-- each connection's thread cycling through them, and prints the result as one JSON line.
--
--   wrk -t T -c C -d 20s --latency --timeout 10s -s post_bodies.lua URL -- BODIES_FILE
--
-- Extra headers (Authorization) come from wrk's -H. done() prints
--   KILN_WRK {"requests", "duration_us", "bytes", "errors": {...}, "error_total",
--             "latency_us": {"mean", "max", "p50", "p90", "p99", "p999"}}
-- where errors.status counts answers with a status >= 400 (wrk's own count) and the others
-- are socket errors; latency percentiles are wrk's, in microseconds.

local bodies = {}
local index = 0
local started = 0

function setup(thread)
  -- Threads start at different offsets so they do not all send the same body at once.
  thread:set("offset", started * 7919)
  started = started + 1
end

function init(args)
  local path = args[1]
  local file = assert(io.open(path, "r"), "cannot open bodies file " .. tostring(path))
  for line in file:lines() do
    if #line > 0 then
      bodies[#bodies + 1] = line
    end
  end
  file:close()
  assert(#bodies > 0, "no bodies in " .. path)
  index = (offset or 0) % #bodies
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  index = index % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[index])
end

function done(summary, latency, requests)
  local e = summary.errors
  local total = e.connect + e.read + e.write + e.status + e.timeout
  io.write(string.format(
    'KILN_WRK {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"error_total": %d, "latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, '
      .. '"p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout, total,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
