#!/usr/bin/env bash
# scalegate's instance side by protocol: HTTP/1.1, h2c, HTTP/1.1 over TLS and h2 (TLS) to the
# same two nginx `return 200 "ok"` instances (each listening four ways), same wrk load over
# plain HTTP/1.1 from the clients, alternating runs. Fair layout of bench/lib.sh: scalegate
# alone on CPU 0, instances and wrk on CPU 1. The TLS instances use a throwaway self-signed
# certificate (insecure_skip_verify; verification cost is per handshake, not per request).
#
#   bench/upstream_protocols.sh                         # 64 connections, 10 s, 3 runs
#   RUNS=3 DURATION=5s CONNS="64 256" NAMES="h1 h2c" bench/upstream_protocols.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-"64"}
NAMES=${NAMES:-"h1 h2c https h2"}
bench_init nginx openssl
make_cert "$WORK"

# One nginx instance on LOAD_CPU listening as h1, h2c, https and h2; appends its ports.
H1=() H2C=() HTTPS=() H2=()
start_instance() {
  local dir p1 p2 p3 p4
  p1=$(free_port) p2=$(free_port) p3=$(free_port) p4=$(free_port) dir=$WORK/instance$p1
  write_nginx_conf "$dir" "http2_max_concurrent_streams 1024;
  ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem;
  server { listen 127.0.0.1:$p1 backlog=4096; listen 127.0.0.1:$p2 http2 backlog=4096;
    listen 127.0.0.1:$p3 ssl backlog=4096; listen 127.0.0.1:$p4 ssl http2 backlog=4096;
    location / { return 200 \"ok\"; } }"
  taskset -c "$LOAD_CPU" nginx -c "$dir/nginx.conf" -p "$dir" &
  PIDS+=($!); wait_port "$p1"
  H1+=("$p1") H2C+=("$p2") HTTPS+=("$p3") H2+=("$p4")
}
start_instance
start_instance

for name in $NAMES; do
  case $name in
    h1) BACKENDS=("${H1[@]}") extra="" ;;
    h2c) BACKENDS=("${H2C[@]}") extra='protocol = "h2c"' ;;
    https) BACKENDS=("${HTTPS[@]}") extra='tls = { insecure_skip_verify = true }' ;;
    h2) BACKENDS=("${H2[@]}") extra=$'protocol = "h2"\ntls = { insecure_skip_verify = true }' ;;
    *) echo "unknown protocol $name" >&2; exit 2 ;;
  esac
  start_scalegate "$name" "$extra"
done
# shellcheck disable=SC2086
warm $NAMES
for run in $(seq "$RUNS"); do
  echo "run $run"
  for conns in $CONNS; do
    for name in $NAMES; do measure "$name" "$conns"; done
  done
done
summarize h1
