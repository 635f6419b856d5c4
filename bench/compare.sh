#!/usr/bin/env bash
# Side-by-side proxy comparison: scalegate vs nginx vs HAProxy in front of the same two nginx
# `return 200 "ok"` instances, same wrk load, alternating runs (A B C A B C ...). Each proxy alone
# on CPU 0 with one worker; instances and wrk on CPU 1. Per cell: median req/s, p50, p99, proxy
# CPU time per request (utime+stime from /proc over the run / requests), ratio to scalegate, and
# how busy CPU 1 was. The `direct` row is wrk straight at one instance, both on CPU 1 with no
# proxy: about the same work CPU 1 does in a proxied run, so its req/s is about the most any proxy can
# reach in this layout. `scalegate` runs its default configuration, which pipelines HTTP/1.1
# requests to the instances (`pipeline = 32`); `scalegate-unpipelined` is scalegate with
# `pipeline = 1` on its upstream, one request per instance connection at a time as nginx and
# HAProxy send them.
#
#   bench/compare.sh                                   # 64 and 256 connections, 10 s, 3 runs
#   RUNS=5 DURATION=5s CONNS="64" bench/compare.sh
#   WRK_ARGS="-s bench/paced.lua" CONNS=64 bench/compare.sh   # a fixed load (bench/paced.lua)
#   WRK_ARGS="-s bench/post.lua" CONNS=64 bench/compare.sh    # 2 KiB uploads (bench/post.lua)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-"64 256"}
PROXIES=${PROXIES:-"scalegate scalegate-unpipelined nginx haproxy direct"}
bench_init nginx haproxy
start_nginx_backend
start_nginx_backend

for proxy in $PROXIES; do
  case $proxy in
    scalegate) start_scalegate scalegate ;;
    scalegate-unpipelined) start_scalegate scalegate-unpipelined "pipeline = 1" ;;
    direct) PORT[direct]=${BACKENDS[0]} ;;
    *) "start_${proxy}_proxy" ;;
  esac
done
sleep 0.5
# The first scalegate started (PROXIES may leave the default one out).
first=${PROXIES%% *}
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/${PID[$first]:-${PID[scalegate]}}/status")
warm $PROXIES
for conns in $CONNS; do
  for _ in $(seq "$RUNS"); do
    for proxy in $PROXIES; do measure "$proxy" "$conns"; done
  done
done
summarize "$first"
echo
echo "scalegate idle RSS (after start, before any load): $((rss_kib / 1024)) MiB ($rss_kib KiB)"
