-- wrk script: each request names one of CLIENTS clients (default 10000) in X-Client, in turn,
-- so that a rate limit keyed by that header sees that many keys. The requests are made once,
-- in init, so that wrk spends on each about what it spends on a plain one.
local requests, next = {}, 0

function init()
  local clients = tonumber(os.getenv("CLIENTS") or "10000")
  for n = 1, clients do
    requests[n] = wrk.format(nil, nil, { ["X-Client"] = "client-" .. n })
  end
end

function request()
  next = next % #requests + 1
  return requests[next]
end
