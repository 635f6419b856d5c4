#!/usr/bin/env bash
# TLS termination side by side: scalegate vs nginx (ssl, 1 worker) vs HAProxy (ssl, nbthread 1),
# same ECDSA P-256 self-signed certificate (made here with openssl), same two nginx `return 200`
# instances behind plain HTTP, alternating runs. Proxy alone on CPU 0; instances and load
# generators on CPU 1 (see /work/shared/BENCHMARKING.md). Three loads:
#   keepalive  wrk over HTTPS keep-alive, -c 64: TLS record cost on top of proxying.
#   full       a full handshake per request: parallel `openssl s_time -new` clients (wrk cannot
#              do this: after a close it keeps its SSL session and resumes), one HTTP/1.1
#              request with Connection: close per connection.
#   resumed    wrk with Connection: close: a new TCP connection per request, the TLS session
#              resumed (wrk keeps the session across reconnects; every proxy here allows it).
# Per cell: median req/s and proxy CPU µs per request (utime+stime from /proc / requests).
#
#   flock -x /tmp/scalegate-quiet.lock bench/tls.sh
#   RUNS=5 DURATION=10s MODES="full" bench/tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
. bench/lib.sh
PROXIES=${PROXIES:-"scalegate nginx haproxy"}
MODES=${MODES:-"keepalive full resumed"}
STIME_CLIENTS=${STIME_CLIENTS:-8}
bench_init nginx haproxy openssl
start_nginx_backend
start_nginx_backend

CERT=$WORK/cert.pem KEY=$WORK/key.pem
make_cert "$WORK"
cat "$CERT" "$KEY" >"$WORK/haproxy.pem"

start_scalegate_tls() {
  local tls; tls=$(free_port)
  start_scalegate scalegate "" "[tls]
listen = \"127.0.0.1:$tls\"
cert = \"$CERT\"
key = \"$KEY\""
  wait_port "$tls"; PORT[scalegate]=$tls
}
start_nginx() {
  start_nginx_proxy ssl "ssl_certificate $CERT; ssl_certificate_key $KEY; ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;"
}
start_haproxy() { start_haproxy_proxy "ssl crt $WORK/haproxy.pem"; }
for proxy in $PROXIES; do
  case $proxy in
    scalegate) start_scalegate_tls ;;
    *) "start_$proxy" ;;
  esac
done
sleep 0.5
for proxy in $PROXIES; do
  echo "$proxy: $(openssl s_client -connect "127.0.0.1:${PORT[$proxy]}" -servername bench.test </dev/null 2>/dev/null |
    awk '/^New,/ {print $2, $NF} /Server Temp Key/ {sub(/.*Key: /, ""); print "key exchange", $0}' | paste -sd' ')"
done

# s_time sends "GET <page> HTTP/1.0": the page carries an HTTP/1.1 head so every proxy answers
# 200 from an instance and then closes.
STIME_PAGE=$'/ HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\nX-Pad:'
# STIME_CLIENTS parallel `openssl s_time -new` for DURATION against NAME; appends a results row.
measure_full() { # NAME
  local name=$1 pid=${PID[$1]} secs=${DURATION%s} before after started ended conns=0 bytes=0 n b
  local clients=()
  before=$(cpu_ticks "$pid"); started=$(date +%s%N)
  for i in $(seq "$STIME_CLIENTS"); do
    taskset -c "$LOAD_CPU" openssl s_time -connect "127.0.0.1:${PORT[$name]}" -new -www "$STIME_PAGE" \
      -time "$secs" >"$WORK/stime.$i" 2>&1 &
    clients+=($!)
  done
  wait "${clients[@]}"
  ended=$(date +%s%N); after=$(cpu_ticks "$pid")
  for i in $(seq "$STIME_CLIENTS"); do
    read -r n b < <(awk '/real seconds/ {print $1, $(NF-4)}' "$WORK/stime.$i")
    conns=$((conns + ${n:-0})); bytes=$((bytes + ${n:-0} * ${b:-0}))
  done
  awk -v name="$name" -v c="$STIME_CLIENTS" -v n="$conns" -v t="$(( (ended - started) / 1000000 ))e-3" \
    -v ticks=$((after - before)) -v hz="$(getconf CLK_TCK)" -v per=$((conns > 0 ? bytes / conns : 0)) '
    BEGIN { printf "%s\t%s\t%.0f\t0\t0\t%.1f\t%d\t%d\n", name, c, n / t, ticks / hz * 1e6 / n, per < 100 ? n : 0, n }' >>"$RESULTS"
  tail -n 1 "$RESULTS" | awk -F'\t' -v per=$((conns > 0 ? bytes / conns : 0)) \
    '{printf "  %-16s %9.0f handshakes/s  cpu %6.1f us/handshake  (%s bytes read per connection)\n", $1, $3, $6, per}'
}

for mode in $MODES; do
  RESULTS=$WORK/$mode.tsv
  SCHEME=https WRK_ARGS=""
  case $mode in
    keepalive) echo; echo "== HTTPS keep-alive, wrk -c64, $DURATION x $RUNS"; warm $PROXIES ;;
    full) echo; echo "== full handshake per request, $STIME_CLIENTS x openssl s_time -new, $DURATION x $RUNS" ;;
    resumed) echo; echo "== new connection per request, session resumed, wrk -c64 Connection: close, $DURATION x $RUNS"
      WRK_ARGS="-H Connection:close" ;;
  esac
  for _ in $(seq "$RUNS"); do
    for proxy in $PROXIES; do
      if [ "$mode" = full ]; then measure_full "$proxy"; else measure "$proxy" 64; fi
    done
  done
  summarize scalegate
done
echo
echo "$(date -u +%Y-%m-%d): $(nproc) CPUs, $(openssl version), nginx $(nginx -v 2>&1 | sed 's/.*\///'), $(haproxy -v | head -n1 | awk '{print "HAProxy", $3}')"
