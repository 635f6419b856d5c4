#!/usr/bin/env bash
# Autoscaler benchmark: one full scale-out / scale-in cycle against a quickstart-like config
# (process provider, `scalegate demo-backend --latency-ms 50`, 1 to 4 instances, target 4 in
# flight per instance, sync 2 s, scale-down window 10 s instead of the quickstart's 30 s).
#
# Phases: idle pool of 1 → load step (wrk -c 32) for LOAD_SECS → light load (wrk -c 2) while the
# pool shrinks back to 1. Reported: time from the load step until the first added instance has
# served a request (and until all 4 have), time from the end of the step until the pool shrank,
# and every failed request (non-2xx and socket errors, from wrk) over the whole cycle (target 0).
# Also checks that no instance process outlives the gateway (SIGTERM).
#
#   flock -x /tmp/scalegate-quiet.lock bench/autoscale.sh      # needs target/release/scalegate
#   LOAD_SECS=20 BIN=target/debug/scalegate bench/autoscale.sh
set -euo pipefail
cd "$(dirname "$0")/.."

LOAD_SECS=${LOAD_SECS:-15}
BIN=${BIN:-$PWD/target/release/scalegate}
PORTS=${PORTS:-45001-45010}
for tool in wrk python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/autoscale.sh: $tool is missing (scripts/test installs wrk)" >&2; exit 2; }
done
[ -x "$BIN" ] || { echo "bench/autoscale.sh: $BIN missing: run cargo build --release first" >&2; exit 2; }

work=$(mktemp -d)
gateway_pid=""
cleanup() {
  [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null || true
  jobs -p | xargs -r kill 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
access_log = false
shutdown_grace = "5s"

[upstreams.app]
strategy = "least_conn"
instances = []
[upstreams.app.health]
interval = "1s"
rise = 1
[upstreams.app.autoscale]
min = 1
max = 4
command = "{self} demo-backend --port {port} --latency-ms 50"
port_range = "$PORTS"
target = { in_flight_per_instance = 4 }
sync_period = "2s"
startup_grace = "2s"
scale_down = { stabilization = "10s" }

[[routes]]
upstream = "app"
EOF

LOG_LEVEL=warn "$BIN" serve --config "$work/gateway.toml" >"$work/gateway.out" 2>"$work/gateway.err" &
gateway_pid=$!
for _ in $(seq 100); do
  grep -q "admin listening" "$work/gateway.out" 2>/dev/null && break
  sleep 0.1
done
proxy=$(sed -n 's/^proxy listening on //p' "$work/gateway.out")
admin=$(sed -n 's/^admin listening on //p' "$work/gateway.out")
[ -n "$proxy" ] && [ -n "$admin" ] || { echo "gateway did not start" >&2; cat "$work/gateway.err" >&2; exit 1; }

now() { date +%s.%N; }
# Instances taking traffic that served at least one request / the autoscaler's current count.
serving() {
  curl -s "http://$admin/api/upstreams" | python3 -c '
import json, sys
instances = json.load(sys.stdin)["upstreams"][0]["instances"]
print(sum(1 for i in instances if i["state"] == "up" and i["requests"] > 0))'
}
current() {
  curl -s "http://$admin/api/autoscale" | python3 -c '
import json, sys; print(json.load(sys.stdin)["upstreams"][0]["current"])'
}
pids() {
  curl -s "http://$admin/api/autoscale" | python3 -c '
import json, sys
print(" ".join(str(i["pid"]) for i in json.load(sys.stdin)["upstreams"][0]["instances"] if i["pid"]))'
}
# Failed requests in a wrk report: non-2xx/3xx plus socket errors.
wrk_errors() {
  python3 - "$1" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
for m in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
    errors += sum(int(n) for n in m)
requests = re.search(r"(\d+) requests in", text)
print(errors, requests.group(1) if requests else 0)
PY
}

for _ in $(seq 100); do
  [ "$(curl -s "http://$admin/api/upstreams" | grep -o '"state":"up"' | wc -l)" -ge 1 ] && break
  sleep 0.1
done
curl -s -o /dev/null "http://$proxy/warm"
echo "pool ready: $(current) instance(s); proxy $proxy, admin $admin"

# Light load through the whole cycle: scale-in happens under traffic.
light_secs=$((LOAD_SECS + 40))
wrk -t 1 -c 2 -d "${light_secs}s" "http://$proxy/light" >"$work/light.txt" 2>&1 &
light_pid=$!
sleep 1

step=$(now)
wrk -t 2 -c 32 -d "${LOAD_SECS}s" --latency "http://$proxy/step" >"$work/step.txt" 2>&1 &
step_pid=$!
first_added="" all_added=""
while kill -0 "$step_pid" 2>/dev/null; do
  n=$(serving)
  t=$(now)
  [ -z "$first_added" ] && [ "$n" -ge 2 ] && first_added=$(awk "BEGIN{printf \"%.2f\", $t - $step}")
  [ -z "$all_added" ] && [ "$n" -ge 4 ] && all_added=$(awk "BEGIN{printf \"%.2f\", $t - $step}")
  sleep 0.1
done
wait "$step_pid" || true
calm=$(now)
peak=$(current)
shrank="" back_to_one=""
deadline=$(( $(date +%s) + 40 ))
while [ "$(date +%s)" -lt "$deadline" ]; do
  c=$(current)
  t=$(now)
  [ -z "$shrank" ] && [ "$c" -lt "$peak" ] && shrank=$(awk "BEGIN{printf \"%.2f\", $t - $calm}")
  if [ "$c" -eq 1 ] && [ "$(serving)" -le 1 ]; then back_to_one=$(awk "BEGIN{printf \"%.2f\", $t - $calm}"); break; fi
  sleep 0.2
done
sleep 2
kill -INT "$light_pid" 2>/dev/null || true
wait "$light_pid" || true

child_pids=$(pids)
kill -TERM "$gateway_pid"
wait "$gateway_pid" || true
gateway_pid=""
survivors=""
for p in $child_pids; do
  if [ -e "/proc/$p" ] && ! grep -q ') Z' "/proc/$p/stat" 2>/dev/null; then survivors="$survivors $p"; fi
done

read -r step_errors step_requests < <(wrk_errors "$work/step.txt")
read -r light_errors light_requests < <(wrk_errors "$work/light.txt")
echo
echo "== autoscale cycle (load step: wrk -c 32 for ${LOAD_SECS}s on 50 ms instances; light: wrk -c 2) =="
printf 'load step -> first added instance serving: %ss\n' "${first_added:-never}"
printf 'load step -> all 4 instances serving:      %ss\n' "${all_added:-never}"
printf 'load end  -> first scale-in (window 10s):  %ss\n' "${shrank:-never}"
printf 'load end  -> back to 1 instance:           %ss\n' "${back_to_one:-never}"
printf 'requests: step %s, light %s; failed: step %s, light %s (target 0)\n' \
  "$step_requests" "$light_requests" "$step_errors" "$light_errors"
grep -E "Requests/sec|50%|99%" "$work/step.txt" | sed 's/^/step /'
printf 'instance processes left after gateway SIGTERM: %s\n' "${survivors:-none}"
[ -z "$survivors" ] && [ "$step_errors" -eq 0 ] && [ "$light_errors" -eq 0 ]
