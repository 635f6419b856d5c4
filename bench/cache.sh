#!/usr/bin/env bash
# Cache-hit path: scalegate with the route cached (every request a hit after warm-up) against
# the same route uncached, and against nginx proxy_cache answering the same hits, alternating
# runs in one session. Targets: cached ≥ 1.5× uncached, and ≥ nginx proxy_cache.
#
#   flock -x /tmp/scalegate-quiet.lock bench/cache.sh     # 64 connections, 5 s, 3 runs each
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
. bench/lib.sh
CONNS=${CONNS:-64}
bench_init nginx
start_nginx_backend

# nginx as a caching proxy, alone on PROXY_CPU with one worker, like scalegate.
start_nginx_cache() { # NAME
  local name=$1 port dir; port=$(free_port); dir=$WORK/$name; mkdir -p "$dir/cache"
  write_nginx_conf "$dir" "
  proxy_cache_path $dir/cache levels=1:2 keys_zone=hot:10m max_size=256m;
  upstream app { server 127.0.0.1:${BACKENDS[0]}; keepalive 1024; }
  server { listen 127.0.0.1:$port backlog=4096;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_cache hot; proxy_cache_valid 200 60s; proxy_cache_lock on;
      add_header X-Cache-Status \$upstream_cache_status; } }"
  taskset -c "$PROXY_CPU" nginx -c "$dir/nginx.conf" -p "$dir" &
  PID[$name]=$!; PORT[$name]=$port; PIDS+=($!); wait_port "$port"
}

start_scalegate cached "" 'cache = { ttl = "60s" }'
start_scalegate uncached
start_nginx_cache nginx-cache
WARM_PATH=/hot warm cached uncached nginx-cache
for name in cached nginx-cache; do
  status=$(curl -s -o /dev/null -D - "http://127.0.0.1:${PORT[$name]}/hot" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-cache-status" {print $2}')
  [ "$status" = HIT ] || { echo "$name is not answering hits (X-Cache-Status: $status)" >&2; exit 1; }
done
for conns in $CONNS; do
  for _ in $(seq "$RUNS"); do
    measure cached "$conns" /hot
    measure uncached "$conns" /hot
    measure nginx-cache "$conns" /hot
  done
done
summarize uncached
