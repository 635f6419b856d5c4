#!/usr/bin/env bash
# Pipelining in front of instances that take time to answer: scalegate with `pipeline = 1` (off)
# and its default (`pipeline = 32`) in front of the same two demo backends answering after LATENCY_MS (async,
# so an instance answers many connections side by side, as application servers do), same wrk
# load, alternating runs. Fair layout of bench/lib.sh. A line's requests are answered one after
# another, so pipelining must stay out of the way of such instances: the two rows should match.
#
#   bench/slow_instances.sh                              # 10 ms, 64 connections, 10 s, 3 runs
#   LATENCY_MS=1 RUNS=3 DURATION=5s CONNS="64 256" bench/slow_instances.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
CONNS=${CONNS:-"64"}
bench_init

for _ in 1 2; do
  port=$(free_port)
  taskset -c "$LOAD_CPU" "$SCALEGATE" demo-backend --port "$port" --latency-ms "${LATENCY_MS:-10}" >/dev/null 2>&1 &
  PIDS+=($!); BACKENDS+=("$port"); wait_port "$port"
done
start_scalegate unpipelined "pipeline = 1"
start_scalegate pipelined "${PIPELINE:+pipeline = $PIPELINE}"
warm unpipelined pipelined
for conns in $CONNS; do
  for _ in $(seq "$RUNS"); do
    for name in unpipelined pipelined; do measure "$name" "$conns"; done
  done
done
summarize unpipelined
