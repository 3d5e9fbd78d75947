#!/usr/bin/env bash
# The control loop at scale, on the local control plane (tests/controlplane), with the release
# operator and proxies speaking the real protocol (operator/examples/control_load.rs: many
# clients in one process, each a real subscription with a real token).
#
#   bench/control.sh [CHANGES] [SCALE]      (defaults: 50 changes, 1000 resources)
#
# 1. Propagation: 100 proxies subscribed to one resource; CHANGES spec changes one after the
#    other (a backend's port); for each, the time from the `kubectl patch` starting to the last
#    of the 100 proxies receiving (and acking) the new version. Reports p50, p99 and max.
# 2. Scale: SCALE resources, one proxy each (SCALE proxies), stats every 10 s; once every
#    resource shows 1/1, the operator's RSS and CPU over 60 s, and its status writes per minute:
#    with idle proxies (their counters stand still) and busy ones (every report changes them).
set -euo pipefail

changes=${1:-50}
scale=${2:-1000}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh" # log, die, PIDS/stop_pid
RAW=$(mktemp -d /tmp/l4p-control-bench.XXXXXX)
ns=bench
http_port=18090
grpc_port=18453

bin_dir=$("$repo/tools/build.sh" | tail -n 1)
kubectl="$bin_dir/kubectl"
(cd "$repo" && cargo build -q --release -p l4proxy-operator --bin l4proxy-operator --example control_load)
target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
operator=$target/release/l4proxy-operator
load=$target/release/examples/control_load

control_plane_up "$repo" "$kubectl" "$RAW/cp"
"$kubectl" create namespace "$ns" > /dev/null
"$kubectl" -n "$ns" create serviceaccount bench > /dev/null
"$kubectl" -n "$ns" create token bench --audience l4proxy.dev --duration 2h > "$RAW/token"

resources() { # count port: one L4Proxy p-I per I, each a listener in front of 10.0.0.1:port
    local i
    for i in $(seq 0 $(($1 - 1))); do
        printf -- '---\napiVersion: l4proxy.dev/v1alpha1\nkind: L4Proxy\nmetadata: {name: p-%d, namespace: %s}\nspec:\n  listeners:\n  - {name: web, address: "127.0.0.1:8080", backends: [{address: "10.0.0.1:%d"}]}\n' "$i" "$ns" "$2"
    done
}
start_operator() {
    "$operator" run --namespace "$ns" --lease-namespace "$ns" --identity bench \
        --http-address "127.0.0.1:$http_port" --config-service-address "127.0.0.1:$grpc_port" \
        --status-interval 10s > "$RAW/operator.log" 2>&1 &
    PIDS+=($!)
    OPERATOR=$!
    local i
    for i in $(seq 1 150); do
        "$kubectl" -n "$ns" get configmap l4proxy-ca -o jsonpath='{.data.ca\.crt}' > "$RAW/ca.crt" 2> /dev/null && [[ -s "$RAW/ca.crt" ]] && return 0
        sleep 0.2
    done
    die "the operator published no CA; see $RAW/operator.log"
}
start_load() { # resources proxies busy
    "$load" --url "https://127.0.0.1:$grpc_port" --ca "$RAW/ca.crt" --token "$RAW/token" --namespace "$ns" \
        --resources "$1" --proxies "$2" --busy "$3" > "$RAW/load.jsonl" 2> "$RAW/load.log" &
    PIDS+=($!)
    LOAD=$!
    local deadline=$((SECONDS + 300))
    until grep -q '"connected"' "$RAW/load.jsonl"; do
        ((SECONDS < deadline)) || die "the load did not connect; see $RAW/load.log"
        sleep 0.2
    done
}
metric() { curl -s "127.0.0.1:$http_port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
now_ms() { date +%s%3N; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# ---------------------------------------------------------------------------------------------
log "propagation: 100 proxies on one resource, $changes changes"
resources 1 1000 | "$kubectl" apply -f - > /dev/null
start_operator
start_load 1 100 false
latencies=()
for i in $(seq 1 "$changes"); do
    before=$(grep -c '"version"' "$RAW/load.jsonl" || true)
    # From before kubectl starts: an upper bound (kubectl's own start-up included).
    t0=$(now_ms)
    "$kubectl" -n "$ns" patch l4p p-0 --type merge \
        -p "{\"spec\":{\"listeners\":[{\"name\":\"web\",\"address\":\"127.0.0.1:8080\",\"backends\":[{\"address\":\"10.0.0.1:$((1000 + i))\"}]}]}}" > /dev/null
    deadline=$((SECONDS + 30))
    until (($(grep -c '"version"' "$RAW/load.jsonl" || true) > before)); do
        ((SECONDS < deadline)) || die "change $i did not reach every proxy in 30 s"
        sleep 0.01
    done
    done_ms=$(grep '"version"' "$RAW/load.jsonl" | tail -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["complete_ms"])')
    latencies+=($((done_ms - t0)))
done
printf '%s\n' "${latencies[@]}" | sort -n > "$RAW/latencies"
pct() { awk -v p="$1" '{a[NR] = $1} END {i = int((NR - 1) * p / 100) + 1; print a[i]}' "$RAW/latencies"; }
echo "propagation (kubectl patch started -> all 100 proxies have the version), $changes changes:"
echo "  p50 $(pct 50) ms, p99 $(pct 99) ms, max $(pct 100) ms"
echo "  operator push_latency_seconds (version seen -> each proxy's Ack): count $(metric l4proxy_operator_push_latency_seconds_count), sum $(metric l4proxy_operator_push_latency_seconds_sum) s"
stop_pid "$LOAD"
stop_pid "$OPERATOR"
"$kubectl" -n "$ns" delete l4p --all > /dev/null

# ---------------------------------------------------------------------------------------------
for busy in false true; do
    log "scale: $scale resources, $scale proxies, busy=$busy"
    resources "$scale" 80 > "$RAW/objects.yaml"
    "$kubectl" apply --server-side -f "$RAW/objects.yaml" > /dev/null
    start_operator
    start_load "$scale" "$scale" "$busy"
    deadline=$((SECONDS + 600))
    until [[ $("$kubectl" -n "$ns" get l4p -o jsonpath='{range .items[*]}{.status.proxies.summary}{"\n"}{end}' | grep -cx '1/1' || true) -ge $scale ]]; do
        ((SECONDS < deadline)) || die "not every resource showed 1/1 within 600 s"
        sleep 1
    done
    log "every resource shows 1/1; measuring 60 s of steady state"
    sleep 20 # one settling status interval after the last resource came in, and a spare one
    writes0=$(metric 'l4proxy_operator_writes_total{kind="status"}')
    cpu0=$(cpu_ticks "$OPERATOR")
    sleep 60
    cpu1=$(cpu_ticks "$OPERATOR")
    writes1=$(metric 'l4proxy_operator_writes_total{kind="status"}')
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$OPERATOR/status")
    hz=$(getconf CLK_TCK)
    printf 'scale busy=%s: %d resources, %d proxies connected (%s), RSS %.1f MiB, CPU %.3f cores, status writes %d per minute\n' \
        "$busy" "$scale" "$(metric l4proxy_operator_proxies_connected)" "stats every 10 s" "$(echo "$rss / 1024" | bc -l)" \
        "$(echo "($cpu1 - $cpu0) / $hz / 60" | bc -l)" "$((${writes1%.*} - ${writes0%.*}))"
    stop_pid "$LOAD"
    stop_pid "$OPERATOR"
    "$kubectl" -n "$ns" delete l4p --all > /dev/null
done
