#!/usr/bin/env bash
# Cost of rate limiting: one route whose limit is never reached, with no limit, with the memory
# store and with the Redis store, side by side (alternating runs), and the Redis round trips
# each request costs (EVALSHA calls counted by Redis / requests). The gateways alone on CPU 0;
# wrk, the instances and redis-server on CPU 1. Targets: memory ≥ 0.97×, Redis ≥ 0.7× of none.
# By default every request comes from one client (one key per rule); with CLIENTS=N the rule
# counts by an X-Client header naming one of N clients in turn (bench/many_clients.lua, in
# every cell), so each decision call to Redis meets mostly different keys.
#
#   bench/ratelimit.sh                 # 64 connections, 5 s runs, 5 runs each
#   CLIENTS=10000 bench/ratelimit.sh   # 10,000 keys
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
DURATION=${DURATION:-5s}
. bench/lib.sh
CONNS=${CONNS:-64}
bench_init nginx redis-server redis-cli
start_nginx_backend
start_nginx_backend

redis_port=$(free_port)
taskset -c "$LOAD_CPU" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
redis_pid=$!
PIDS+=("$redis_pid")
wait_port "$redis_port"

key=ip
if [ -n "${CLIENTS:-}" ]; then
  key=header:X-Client
  WRK_ARGS="${WRK_ARGS:-} -s bench/many_clients.lua"
  export CLIENTS
fi
huge="rate_limits = [{ name = \"huge\", key = \"$key\", limit = 1000000000, period = \"1s\", burst = 1000000 }]"
start_scalegate none
start_scalegate memory "" "$huge"
SERVER_EXTRA=$(printf '[state]\nredis_url = "redis://127.0.0.1:%s"\n[rate_limit]\nstore = "redis"\n' "$redis_port") \
  start_scalegate redis "" "$huge"
warm none memory redis

# One field of Redis's EVALSHA stats: 3 = calls, 7 = usec_per_call (Redis's own CPU per
# decision; it shares CPU 1 with wrk and the instances).
evalsha_stat() { redis-cli -p "$redis_port" INFO commandstats | tr -d '\r' | awk -F'[=,:]' -v f="$1" '/^cmdstat_evalsha:/ {print $f}'; }
before=$(evalsha_stat 3); before=${before:-0}
redis_ticks=0
for conns in $CONNS; do
  for _ in $(seq "$RUNS"); do
    measure none "$conns"
    measure memory "$conns"
    ticks0=$(cpu_ticks "$redis_pid")
    measure redis "$conns"
    redis_ticks=$((redis_ticks + $(cpu_ticks "$redis_pid") - ticks0))
  done
done
after=$(evalsha_stat 3)
summarize none
requests=$(awk -F'\t' '$1 == "redis" {n += $8} END {print n}' "$RESULTS")
awk -v e=$((after - before)) -v n="$requests" \
  'BEGIN {printf "\nRedis: %d EVALSHA for %d requests = %.4f calls per request\n", e, n, e / n}'
echo "Redis CPU per EVALSHA (INFO commandstats usec_per_call, whole run incl. warm-up): $(evalsha_stat 7) µs"
awk -v t="$redis_ticks" -v hz="$(getconf CLK_TCK)" -v n="$requests" \
  'BEGIN {printf "Redis process CPU (utime+stime over the redis runs) per request: %.1f µs\n", t / hz * 1e6 / n}'
