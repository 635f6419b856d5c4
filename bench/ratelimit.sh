#!/usr/bin/env bash
# Cost of rate limiting: throughput of one route whose limit is never reached, with no limit,
# with the memory store and with the Redis store, and the Redis commands each request costs.
#
# Layout (shared/BENCHMARKING.md): each gateway alone on CPU 0, wrk, the two demo backends and
# redis-server on CPU 1; wrk -c 64 for 4 s; runs alternate none/memory/redis, 5 rounds; medians
# and ratios to "none". Run it under the quiet lock after a release build:
#   flock -s /tmp/scalegate-quiet.lock cargo build --release
#   flock -x /tmp/scalegate-quiet.lock bench/ratelimit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/scalegate
DURATION=${DURATION:-4s}
CONNECTIONS=${CONNECTIONS:-64}
ROUNDS=${ROUNDS:-5}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 1; }
for tool in wrk redis-server redis-cli taskset; do
  command -v "$tool" >/dev/null || { echo "missing $tool (scripts/test installs it)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Starts a process whose stdout announces "... listening on ADDR"; sets started_addr (the
# first address) and started_pid.
start() {
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  started_pid=$!
  pids+=("$started_pid")
  for _ in $(seq 100); do
    if grep -q "listening on" "$log"; then
      started_addr=$(grep -m1 "listening on" "$log" | sed 's/.*listening on //')
      return
    fi
    sleep 0.05
  done
  echo "did not start: $*" >&2; cat "$log" >&2; exit 1
}

redis_port=$(free_port)
taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done

start "$work/b1.log" taskset -c 1 "$BIN" demo-backend --port 0; b1=$started_addr
start "$work/b2.log" taskset -c 1 "$BIN" demo-backend --port 0; b2=$started_addr

declare -A proxy_addr proxy_pid
for variant in none memory redis; do
  case $variant in
    none) limits="" ; state="" ;;
    memory) limits='rate_limits = [{ name = "huge", limit = 1000000000, period = "1s", burst = 1000000 }]'; state="" ;;
    redis) limits='rate_limits = [{ name = "huge", limit = 1000000000, period = "1s", burst = 1000000 }]'
           state=$(printf '[state]\nredis_url = "redis://127.0.0.1:%s"\n[rate_limit]\nstore = "redis"\n' "$redis_port") ;;
  esac
  cat >"$work/$variant.toml" <<TOML
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
access_log = false
$state
[upstreams.app]
instances = ["$b1", "$b2"]
[[routes]]
upstream = "app"
$limits
TOML
  # taskset execs the gateway, so the pid is the gateway's.
  LOG_LEVEL=warn start "$work/$variant.log" taskset -c 0 "$BIN" serve --config "$work/$variant.toml"
  proxy_addr[$variant]=$started_addr
  proxy_pid[$variant]=$started_pid
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)

declare -A rps cpu
evalsha_calls() { redis-cli -p "$redis_port" INFO commandstats | tr -d '\r' | awk -F'[=,:]' '/^cmdstat_evalsha:/ {print $3} END {}' | tail -1; }
total_commands() { redis-cli -p "$redis_port" INFO stats | tr -d '\r' | awk -F: '/^total_commands_processed:/ {print $2}'; }

# Warm-up: connections to the instances and Redis, page cache.
for variant in none memory redis; do
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d1s "http://${proxy_addr[$variant]}/" >/dev/null
done

requests_redis=0
evalsha_before=$(evalsha_calls); evalsha_before=${evalsha_before:-0}
commands_before=$(total_commands)
for round in $(seq "$ROUNDS"); do
  for variant in none memory redis; do
    before=$(cpu_ticks "${proxy_pid[$variant]}")
    out=$(taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"$DURATION" "http://${proxy_addr[$variant]}/")
    after=$(cpu_ticks "${proxy_pid[$variant]}")
    r=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $5}')
    [ -z "$non2xx" ] || { echo "$variant: $non2xx non-2xx responses" >&2; exit 1; }
    us=$(awk -v t=$((after - before)) -v hz="$tick" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    rps[$variant]+="$r "
    cpu[$variant]+="$us "
    [ "$variant" = redis ] && requests_redis=$((requests_redis + n))
    printf 'round %s  %-6s  %10s req/s  %6s µs CPU/req\n' "$round" "$variant" "$r" "$us"
  done
done
evalsha_after=$(evalsha_calls)
commands_after=$(total_commands)

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
none=$(echo "${rps[none]}" | median)
echo
echo "medians over $ROUNDS runs of $DURATION, wrk -c $CONNECTIONS, gateway on CPU 0:"
for variant in none memory redis; do
  m=$(echo "${rps[$variant]}" | median)
  c=$(echo "${cpu[$variant]}" | median)
  printf '  %-6s  %10.0f req/s  ratio %.3f  %s µs gateway CPU/req\n' "$variant" "$m" "$(awk -v a="$m" -v b="$none" 'BEGIN {print a / b}')" "$c"
done
evalsha_usec=$(redis-cli -p "$redis_port" INFO commandstats | tr -d '\r' | awk -F'usec_per_call=' '/^cmdstat_evalsha:/ {split($2, a, ","); print a[1]}')
# Commands counted by Redis include those the script runs (TIME, GET, SET, PEXPIREAT) and the
# INFO calls of this script; round trips from the gateway are the EVALSHA calls.
awk -v e=$((evalsha_after - evalsha_before)) -v c=$((commands_after - commands_before)) -v n="$requests_redis" -v u="$evalsha_usec" \
  'BEGIN {printf "redis: %d requests, %d EVALSHA = %.4f round trips per request (%s µs of Redis time each); %d commands counted, %.2f per request including those inside the script\n", n, e, e / n, u, c, c / n}'
