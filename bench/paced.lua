-- A fixed load instead of as much as the proxy takes: each connection waits 1 ms after every
-- answer before its next request, so 64 connections offer about 40-50k requests/s whatever
-- the proxy, below what any of them can carry. Its p99 is then the latency each proxy adds,
-- not how the machine's scheduler treats a saturated load. wrk times each request from its
-- write, so the wait is not counted.
--   WRK_ARGS="-s bench/paced.lua" CONNS=64 bench/compare.sh
function delay()
  return 1
end
