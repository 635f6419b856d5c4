#!/usr/bin/env bash
# Side-by-side proxy comparison on one machine: scalegate vs nginx vs HAProxy in front of the same
# two nginx `return 200 "ok"` instances, same wrk load, alternating runs (A B C A B C ...).
#
# Layout (see BENCHMARKING notes in the README): each proxy alone on CPU 0 with one worker; the
# instances and wrk on CPU 1. Reported per cell: median requests/s, p50, p99 (from wrk), proxy CPU
# time per request (utime+stime from /proc over the run / requests), and the ratio to scalegate.
#
#   bench/compare.sh                   # 64 and 256 connections, 10 s runs, 3 runs per cell
#   RUNS=5 DURATION=5s CONNS="64" bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

RUNS=${RUNS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-"64 256"}
PROXIES=${PROXIES:-"scalegate nginx haproxy"}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

for tool in nginx haproxy wrk taskset python3; do
  command -v "$tool" >/dev/null || { echo "bench/compare.sh: $tool is missing (scripts/test installs it)" >&2; exit 2; }
done
cargo build --release --quiet
bin=$PWD/target/release/scalegate

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# Two instances: nginx, one worker each, pinned with the load generator.
backends=()
for i in 1 2; do
  port=$(free_port)
  mkdir -p "$work/b$i"
  cat >"$work/b$i/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; error_log /dev/null crit; pid $work/b$i/pid;
events { worker_connections 4096; }
http { access_log off; client_body_temp_path $work/b$i; proxy_temp_path $work/b$i;
  fastcgi_temp_path $work/b$i; uwsgi_temp_path $work/b$i; scgi_temp_path $work/b$i;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$port backlog=4096; location / { return 200 "ok"; } } }
CONF
  taskset -c "$LOAD_CPU" nginx -c "$work/b$i/nginx.conf" -p "$work/b$i" &
  pids+=($!)
  backends+=("$port")
done
for p in "${backends[@]}"; do wait_port "$p"; done

declare -A proxy_port proxy_pid
start_scalegate() {
  local port; port=$(free_port)
  cat >"$work/scalegate.toml" <<CONF
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:0"
access_log = false
[upstreams.app]
strategy = "least_conn"
keepalive = 1024
instances = ["127.0.0.1:${backends[0]}", "127.0.0.1:${backends[1]}"]
[[routes]]
upstream = "app"
CONF
  LOG_LEVEL=warn taskset -c "$PROXY_CPU" "$bin" serve --config "$work/scalegate.toml" >/dev/null &
  proxy_pid[scalegate]=$!; proxy_port[scalegate]=$port
}
start_nginx() {
  local port; port=$(free_port)
  mkdir -p "$work/px"
  cat >"$work/px/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; error_log /dev/null crit; pid $work/px/pid;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $work/px; proxy_temp_path $work/px;
  fastcgi_temp_path $work/px; uwsgi_temp_path $work/px; scgi_temp_path $work/px;
  keepalive_requests 1000000;
  upstream app { least_conn; server 127.0.0.1:${backends[0]}; server 127.0.0.1:${backends[1]}; keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$port backlog=4096;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
  taskset -c "$PROXY_CPU" nginx -c "$work/px/nginx.conf" -p "$work/px" &
  proxy_pid[nginx]=$!; proxy_port[nginx]=$port
}
start_haproxy() {
  local port; port=$(free_port)
  cat >"$work/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:$port
  default_backend app
backend app
  balance leastconn
  server b1 127.0.0.1:${backends[0]}
  server b2 127.0.0.1:${backends[1]}
CONF
  taskset -c "$PROXY_CPU" haproxy -f "$work/haproxy.cfg" -db &
  proxy_pid[haproxy]=$!; proxy_port[haproxy]=$port
}
for proxy in $PROXIES; do "start_$proxy"; pids+=("${proxy_pid[$proxy]}"); done
for proxy in $PROXIES; do wait_port "${proxy_port[$proxy]}"; done
sleep 0.5
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/${proxy_pid[scalegate]:-self}/status")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
results="$work/results.tsv"
for proxy in $PROXIES; do # warm pools and caches, not counted
  taskset -c "$LOAD_CPU" wrk -t1 -c64 -d1s "http://127.0.0.1:${proxy_port[$proxy]}/" >/dev/null
done
for conns in $CONNS; do
  for run in $(seq "$RUNS"); do
    for proxy in $PROXIES; do
      pid=${proxy_pid[$proxy]}
      before=$(cpu_ticks "$pid")
      out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"$DURATION" --latency "http://127.0.0.1:${proxy_port[$proxy]}/")
      after=$(cpu_ticks "$pid")
      echo "$out" | awk -v proxy="$proxy" -v conns="$conns" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" '
        function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return v*1000; if (v ~ /s$/) return v*1000000; return v }
        /^ +50%/ { p50 = us($2) } /^ +99%/ { p99 = us($2) }
        / requests in / { reqs = $1 }
        /Non-2xx/ { bad += $NF } /Socket errors/ { bad += 1 }
        /^Requests\/sec/ { rps = $2 }
        END { printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", proxy, conns, rps, p50, p99, ticks / hz * 1e6 / reqs, bad + 0 }' >>"$results"
      tail -n 1 "$results" | awk -F'\t' '{printf "  %-9s c=%-4s %9.0f req/s  p50 %6.0f us  p99 %6.0f us  cpu %5.1f us/req  errors %s\n", $1, $2, $3, $4, $5, $6, $7}'
    done
  done
done

python3 - "$results" "$rss_kib" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
cells = collections.defaultdict(list)
for proxy, conns, rps, p50, p99, cpu, bad in rows:
    cells[(proxy, int(conns))].append((float(rps), float(p50), float(p99), float(cpu), int(bad)))
proxies = list(dict.fromkeys(r[0] for r in rows))
conns = sorted({int(r[1]) for r in rows})
print()
print("| proxy | conns | req/s (median) | p50 µs | p99 µs | CPU µs/req | req/s vs scalegate | errors |")
print("|---|---|---|---|---|---|---|---|")
for c in conns:
    base = statistics.median(x[0] for x in cells.get(("scalegate", c), [(0,)*5])) or None
    for p in proxies:
        xs = cells[(p, c)]
        med = lambda i: statistics.median(x[i] for x in xs)
        ratio = f"{med(0) / base:.2f}" if base else "-"
        print(f"| {p} | {c} | {med(0):.0f} | {med(1):.0f} | {med(2):.0f} | {med(3):.1f} | {ratio} | {sum(x[4] for x in xs)} |")
if sys.argv[2]:
    print(f"\nscalegate idle RSS (after start, before any load): {int(sys.argv[2]) / 1024:.1f} MiB")
PY
