#!/usr/bin/env bash
# Cost of per-request metrics: the same scalegate with `server.metrics = true` (default) and
# `false`, side by side, alternating runs. Target: metrics on ≥ 0.98× the requests/s of off.
#
#   bench/metrics.sh                 # 64 connections, 10 s, 5 runs each
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
. bench/lib.sh
CONNS=${CONNS:-64}
bench_init nginx
start_nginx_backend
start_nginx_backend
start_scalegate metrics-on
SERVER_KEYS="metrics = false" start_scalegate metrics-off
warm metrics-on metrics-off
for conns in $CONNS; do
  for _ in $(seq "$RUNS"); do
    measure metrics-on "$conns"
    measure metrics-off "$conns"
  done
done
summarize metrics-off
