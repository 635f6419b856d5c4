#!/usr/bin/env bash
# Requests/s of `scalegate bench` against wrk's at the same connection count, against nginx
# `return 200` on loopback: nginx (one worker) pinned to CPU 1, the load generator to CPU 0 with
# one thread. wrk and scalegate alternate RUNS times; medians and the ratio are printed.
#
#   bench/loadgen.sh                     # 64 connections, 5 s runs, 3 runs each
#   RUNS=5 CONNS=128 bench/loadgen.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5s}
LOAD_CPU=1 # nginx here; the generators take CPU 0
. bench/lib.sh
CONNS=${CONNS:-64}
GEN_CPU=0
bench_init nginx
start_nginx_backend
url="http://127.0.0.1:${BACKENDS[0]}/"

# Both append "tool conns rps p50us p99us 0 errors" rows, the format summarize reads.
run_wrk() {
  taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "$url" | awk -v conns="$CONNS" '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return v*1000; if (v ~ /s$/) return v*1000000; return v }
    /^ +50%/ { p50 = us($2) } /^ +99%/ { p99 = us($2) } /^Requests\/sec/ { rps = $2 }
    /Socket errors/ { n = split($0, e, /[^0-9]+/); for (i = 1; i <= n; i++) bad += e[i] }
    END { printf "wrk\t%s\t%s\t%s\t%s\t0\t%d\n", conns, rps, p50, p99, bad }' >>"$RESULTS"
}
run_scalegate() {
  taskset -c "$GEN_CPU" "$SCALEGATE" bench --threads 1 -c "$CONNS" -d "$DURATION" --json "$url" |
    python3 -c 'import json, sys; r = json.load(sys.stdin); l = r["latency_us"]
print("scalegate-bench\t%s\t%.0f\t%s\t%s\t0\t%d" % (sys.argv[1], r["rps"], l["p50"], l["p99"], r["errors"]["total"]))' "$CONNS" >>"$RESULTS"
}

echo "nginx return 200 on CPU 1; generators on CPU 0, one thread, -c $CONNS, $DURATION per run"
taskset -c "$GEN_CPU" wrk -t1 -c"$CONNS" -d1s "$url" >/dev/null # nobody meets a cold server
for _ in $(seq "$RUNS"); do
  run_wrk && tail -n 1 "$RESULTS"
  run_scalegate && tail -n 1 "$RESULTS"
done
summarize wrk
