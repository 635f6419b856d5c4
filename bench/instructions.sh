#!/usr/bin/env bash
# User-space instructions per proxied request (valgrind callgrind's Ir): scalegate, nginx and
# HAProxy in the layout of compare.sh, one at a time under callgrind. Unlike CPU time, counts of
# instructions do not move with this machine's noise, so changes of a few percent show. They
# leave out the kernel (about two thirds of every proxy's CPU per request on loopback) and what
# cache misses and branch misses cost, and include each proxy's start-up (well under 1 %).
#
#   bench/instructions.sh                              # 64 connections, 6 s per proxy
#   PROXIES=scalegate bench/instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-64}
DURATION=${DURATION:-6s}
PROXIES=${PROXIES:-"scalegate nginx haproxy"}
command -v valgrind >/dev/null || { echo "$0: valgrind is missing (apt-get install valgrind)" >&2; exit 2; }
bench_init nginx haproxy
start_nginx_backend
start_nginx_backend
# Under valgrind a proxy starts in seconds, not milliseconds.
WAIT_TRIES=600
PROXY_WRAP="valgrind -q --tool=callgrind --callgrind-out-file=$WORK/callgrind.%p"

echo "| proxy | requests | instructions per request |"
echo "|---|---|---|"
for proxy in $PROXIES; do
  case $proxy in
    scalegate) start_scalegate scalegate ;;
    *) "start_${proxy}_proxy" ;;
  esac
  requests=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" "http://127.0.0.1:${PORT[$proxy]}/" |
    awk '/ requests in / {print $1}')
  kill -TERM "${PID[$proxy]}"
  wait "${PID[$proxy]}" || true
  instructions=$(awk '/^summary:/ {print $2}' "$WORK/callgrind.${PID[$proxy]}")
  echo "| $proxy | $requests | $((instructions / requests)) |"
done
