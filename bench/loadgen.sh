#!/usr/bin/env bash
# Requests/s of `scalegate bench` against wrk's, same connection count, against nginx
# `return 200` on loopback: nginx (one worker) pinned to CPU 1, the load generator to CPU 0,
# one generator thread each. Runs alternate wrk / scalegate ROUNDS times; prints each run,
# the medians and the ratio. Installs nothing.
#
# Usage: bench/loadgen.sh [ROUNDS]            (default 3)
# Env:   CONNS=64 DURATION=5s SCALEGATE=target/release/scalegate
# Run it alone on the machine: flock -x /tmp/scalegate-quiet.lock bench/loadgen.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"

rounds=${1:-3}
conns=${CONNS:-64}
duration=${DURATION:-5s}
scalegate=${SCALEGATE:-target/release/scalegate}

for tool in nginx wrk taskset python3; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "loadgen.sh: $tool is missing (Debian: apt-get install nginx-light wrk util-linux python3)" >&2
    exit 1
  fi
done
if [ ! -x "$scalegate" ]; then
  echo "loadgen.sh: $scalegate not found; build it with: cargo build --release" >&2
  exit 1
fi

dir=$(mktemp -d)
nginx_pid=""
cleanup() {
  if [ -n "$nginx_pid" ]; then kill "$nginx_pid" 2>/dev/null || true; wait "$nginx_pid" 2>/dev/null || true; fi
  rm -rf "$dir"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$dir/nginx.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  # Measure the load generators, not reconnects: never close a keep-alive connection.
  keepalive_requests 100000000;
  server {
    listen 127.0.0.1:$port;
    location / { return 200 "ok"; }
  }
}
EOF
taskset -c 1 nginx -e "$dir/error.log" -c "$dir/nginx.conf" &
nginx_pid=$!
for _ in $(seq 50); do
  if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null; then break; fi
  sleep 0.1
done
url="http://127.0.0.1:$port/"

# Parsers: each prints one line per run, "TOOL RPS P50_MS P99_MS [note]".
cat >"$dir/wrk.py" <<'EOF'
import re, sys
text = sys.stdin.read()
def ms(value):
    number, unit = re.match(r"([\d.]+)(us|ms|s)", value).groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
p50 = ms(re.search(r"50%\s+(\S+)", text).group(1))
p99 = ms(re.search(r"99%\s+(\S+)", text).group(1))
errors = re.search(r"Socket errors: (.*)", text)
note = f"  (socket errors: {errors.group(1)})" if errors else ""
print(f"wrk {rps:.0f} {p50:.3f} {p99:.3f}{note}")
EOF
cat >"$dir/scalegate.py" <<'EOF'
import json, sys
report = json.load(sys.stdin)
latency = report["latency_us"]
errors = report["errors"]["total"]
note = f"  (errors: {errors})" if errors else ""
print(f"scalegate {report['rps']:.0f} {latency['p50'] / 1000:.3f} {latency['p99'] / 1000:.3f}{note}")
EOF
cat >"$dir/table.py" <<'EOF'
import statistics, sys
runs = {"wrk": [], "scalegate": []}
print(f"{'tool':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
for line in sys.stdin:
    print(line.rstrip())
    tool, rps, p50, p99 = line.split()[:4]
    runs[tool].append((float(rps), float(p50), float(p99)))
medians = {tool: [statistics.median(column) for column in zip(*rows)] for tool, rows in runs.items()}
print("median:")
for tool, (rps, p50, p99) in medians.items():
    print(f"{tool:<10} {rps:>9.0f} {p50:>8.3f} {p99:>8.3f}")
ratio = medians["scalegate"][0] / medians["wrk"][0]
print(f"ratio scalegate/wrk (median req/s): {ratio:.3f}")
EOF

run_wrk() {
  taskset -c 0 wrk -t1 -c"$conns" -d"$duration" --latency "$url" | python3 "$dir/wrk.py"
}
run_scalegate() {
  taskset -c 0 "$scalegate" bench --threads 1 -c "$conns" -d "$duration" --json "$url" \
    | python3 "$dir/scalegate.py"
}

echo "nginx return 200 on 127.0.0.1:$port (CPU 1); generators on CPU 0, 1 thread, -c $conns, $duration per run"
# A short unmeasured run first, so neither tool meets a cold server.
taskset -c 0 wrk -t1 -c"$conns" -d1s "$url" >/dev/null
for _ in $(seq "$rounds"); do
  run_wrk
  run_scalegate
done | python3 "$dir/table.py"
