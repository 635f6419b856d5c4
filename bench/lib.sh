# Shared pieces of the benchmark scripts (sourced, not run). The layout they build is the fair one
# for a 2-core machine: the proxy under test alone on PROXY_CPU with one worker; the instances
# and wrk together on LOAD_CPU.
export PATH="$PATH:/usr/sbin:/sbin"
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
RUNS=${RUNS:-3}
# Words put before the proxy under test's command (a profiler, for one); empty by default.
PROXY_WRAP=${PROXY_WRAP:-}
DURATION=${DURATION:-10s}

bench_init() { # tools...
  for tool in wrk taskset python3 "$@"; do
    command -v "$tool" >/dev/null || { echo "$0: $tool is missing (scripts/test installs it)" >&2; exit 2; }
  done
  # SCALEGATE_BIN: another build to measure (an A/B against an older commit).
  if [ -z "${SCALEGATE_BIN:-}" ]; then
    cargo build --release --quiet
  fi
  SCALEGATE=${SCALEGATE_BIN:-$PWD/target/release/scalegate}
  WORK=$(mktemp -d)
  RESULTS=$WORK/results.tsv
  PIDS=()
  trap bench_cleanup EXIT INT TERM
}
bench_cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq "${WAIT_TRIES:-200}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

# A one-worker, foreground nginx config in DIR whose http block ends with HTTP_TAIL.
write_nginx_conf() { # DIR HTTP_TAIL
  local dir=$1; mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<CONF
worker_processes 1; daemon off; master_process off; error_log /dev/null crit; pid $dir/pid;
events { worker_connections 8192; }
http { access_log off; client_body_temp_path $dir; proxy_temp_path $dir;
  fastcgi_temp_path $dir; uwsgi_temp_path $dir; scgi_temp_path $dir;
  keepalive_requests 1000000;
  $2 }
CONF
}

# A throwaway ECDSA P-256 certificate for bench.test and 127.0.0.1: DIR/cert.pem, DIR/key.pem.
make_cert() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench.test -addext "subjectAltName=DNS:bench.test,IP:127.0.0.1" \
    -keyout "$1/key.pem" -out "$1/cert.pem" 2>/dev/null
}

# nginx `return 200 "ok"`, one worker, on LOAD_CPU; appends the port to BACKENDS.
BACKENDS=()
start_nginx_backend() {
  local port dir; port=$(free_port); dir=$WORK/backend$port
  write_nginx_conf "$dir" "server { listen 127.0.0.1:$port backlog=4096; location / { return 200 \"ok\"; } }"
  taskset -c "$LOAD_CPU" nginx -c "$dir/nginx.conf" -p "$dir" &
  PIDS+=($!); BACKENDS+=("$port"); wait_port "$port"
}

# scalegate NAME on PROXY_CPU in front of BACKENDS; EXTRA is appended to [upstreams.app] and the
# config (routes etc.) may be extended with ROUTE_EXTRA. Sets PORT[NAME] and PID[NAME].
declare -A PORT PID
start_scalegate() { # NAME [UPSTREAM_EXTRA] [TAIL_EXTRA]
  local name=$1 port list=""; port=$(free_port)
  for b in "${BACKENDS[@]}"; do list+="\"127.0.0.1:$b\", "; done
  cat >"$WORK/$name.toml" <<CONF
${SERVER_EXTRA:-}
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$(free_port)"
access_log = false
${SERVER_KEYS:-}
[upstreams.app]
strategy = "least_conn"
keepalive = 1024
instances = [${list%, }]
${2:-}
[[routes]]
upstream = "app"
${3:-}
CONF
  # shellcheck disable=SC2086 # PROXY_WRAP is a list of words
  LOG_LEVEL=warn taskset -c "$PROXY_CPU" $PROXY_WRAP "$SCALEGATE" serve --config "$WORK/$name.toml" >/dev/null &
  PID[$name]=$!; PORT[$name]=$port; PIDS+=($!); wait_port "$port"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Busy jiffies (user, nice, system, irq, softirq) and all jiffies of CPU N so far, from
# /proc/stat; idle, iowait and time stolen by the hypervisor are not busy.
cpu_jiffies() { awk -v cpu="cpu$1" '$1 == cpu { for (i = 2; i <= NF; i++) all += $i; print $2 + $3 + $4 + $7 + $8, all }' /proc/stat; }

# One wrk run against NAME (SCHEME, default http; extra wrk flags in WRK_ARGS); appends "name
# conns rps p50us p99us cpu_us_per_req errors requests load_cpu_busy_percent" to RESULTS. A NAME
# without a PID (wrk straight at an instance) gets no CPU figure.
measure() { # NAME CONNS [PATH]
  local name=$1 conns=$2 path=${3:-/} pid=${PID[$1]:-} before=0 after=0 load0 load1 out
  [ -n "$pid" ] && before=$(cpu_ticks "$pid")
  load0=$(cpu_jiffies "$LOAD_CPU")
  # shellcheck disable=SC2086 # WRK_ARGS is a list of words
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d"$DURATION" --latency ${WRK_ARGS:-} "${SCHEME:-http}://127.0.0.1:${PORT[$name]}$path")
  load1=$(cpu_jiffies "$LOAD_CPU")
  [ -n "$pid" ] && after=$(cpu_ticks "$pid")
  echo "$out" | awk -v name="$name" -v conns="$conns" -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" \
    -v has_pid="${pid:+1}" -v load="$load0 $load1" '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return v*1000; if (v ~ /s$/) return v*1000000; return v }
    /^ +50%/ { p50 = us($2) } /^ +99%/ { p99 = us($2) }
    / requests in / { reqs = $1 }
    /Non-2xx/ { bad += $NF } /Socket errors/ { n = split($0, e, /[^0-9]+/); for (i = 1; i <= n; i++) bad += e[i] }
    /^Requests\/sec/ { rps = $2 }
    END { split(load, j, " "); busy = (j[3] - j[1]) * 100 / (j[4] - j[2])
          cpu = has_pid ? ticks / hz * 1e6 / reqs : "nan"
          printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.0f\n", name, conns, rps, p50, p99, cpu, bad + 0, reqs, busy }' >>"$RESULTS"
  tail -n 1 "$RESULTS" | awk -F'\t' '{printf "  %-16s c=%-4s %9.0f req/s  p50 %6.0f us  p99 %6.0f us  cpu %5.1f us/req  load CPU %3s %%  errors %s\n", $1, $2, $3, $4, $5, $6, $9, $7}'
}

warm() { for name in "$@"; do taskset -c "$LOAD_CPU" wrk -t1 -c64 -d1s "${SCHEME:-http}://127.0.0.1:${PORT[$name]}${WARM_PATH:-/}" >/dev/null; done; }

# Markdown table of medians per (name, conns) with each name's req/s ratio to BASE, and how busy
# LOAD_CPU was where the rows say (when it is near 100 %, wrk and the instances cap the req/s).
summarize() { # BASE
  python3 - "$RESULTS" "$1" <<'PY'
import sys, statistics, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
base_name = sys.argv[2]
cells = collections.defaultdict(list)
for name, conns, rps, p50, p99, cpu, bad, *rest in rows:
    busy = float(rest[1]) if len(rest) > 1 else float("nan")
    cells[(name, int(conns))].append((float(rps), float(p50), float(p99), float(cpu), int(bad), busy))
names = list(dict.fromkeys(r[0] for r in rows))
conns = sorted({int(r[1]) for r in rows})
show_load = any(len(r) > 8 for r in rows)
fmt = lambda v, spec: "-" if v != v else format(v, spec)  # NaN: not measured
print()
print(f"| proxy | conns | req/s (median) | p50 µs | p99 µs | CPU µs/req | req/s vs {base_name} | errors |"
      + (" load CPU busy |" if show_load else ""))
print("|---|---|---|---|---|---|---|---|" + ("---|" if show_load else ""))
for c in conns:
    base = cells.get((base_name, c))
    base = statistics.median(x[0] for x in base) if base else None
    for n in names:
        xs = cells[(n, c)]
        med = lambda i: statistics.median(x[i] for x in xs)
        ratio = f"{med(0) / base:.2f}" if base else "-"
        print(f"| {n} | {c} | {med(0):.0f} | {med(1):.0f} | {med(2):.0f} | {fmt(med(3), '.1f')} | {ratio} | {sum(x[4] for x in xs)} |"
              + (f" {fmt(med(5), '.0f')} % |" if show_load else ""))
PY
}

# nginx as the proxy under test on PROXY_CPU in front of BACKENDS (least_conn, keepalive 1024, as
# the shared benchmarking notes ask); LISTEN_EXTRA goes on the listen line, SERVER_EXTRA into
# the server block (TLS settings).
start_nginx_proxy() { # [LISTEN_EXTRA] [SERVER_EXTRA]
  local port dir=$WORK/nginx-proxy servers=""; port=$(free_port)
  for b in "${BACKENDS[@]}"; do servers+="server 127.0.0.1:$b; "; done
  write_nginx_conf "$dir" "
  upstream app { least_conn; $servers keepalive 1024; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$port ${1:-} backlog=4096; ${2:-}
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
  # shellcheck disable=SC2086 # PROXY_WRAP is a list of words
  taskset -c "$PROXY_CPU" $PROXY_WRAP nginx -c "$dir/nginx.conf" -p "$dir" &
  PID[nginx]=$!; PORT[nginx]=$port; PIDS+=($!); wait_port "$port"
}

# HAProxy as the proxy under test on PROXY_CPU (nbthread 1, leastconn, http-reuse always);
# BIND_EXTRA goes on the bind line (TLS settings).
start_haproxy_proxy() { # [BIND_EXTRA]
  local port i=0 servers=""; port=$(free_port)
  for b in "${BACKENDS[@]}"; do i=$((i+1)); servers+="  server b$i 127.0.0.1:$b
"; done
  cat >"$WORK/haproxy.cfg" <<CONF
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
  bind 127.0.0.1:$port ${1:-}
  default_backend app
backend app
  balance leastconn
$servers
CONF
  # shellcheck disable=SC2086 # PROXY_WRAP is a list of words
  taskset -c "$PROXY_CPU" $PROXY_WRAP haproxy -f "$WORK/haproxy.cfg" -db &
  PID[haproxy]=$!; PORT[haproxy]=$port; PIDS+=($!); wait_port "$port"
}
