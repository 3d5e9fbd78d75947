#!/usr/bin/env bash
# Operator at scale on the local control plane (tests/controlplane): N L4Proxy resources, each
# with a Service backend (Service + EndpointSlice), reconciled by the release binary.
#
#   bench/operator.sh [N]        (default 500)
#
# Reports: time from operator start to all N Ready=True, reconcile count and mean duration,
# writes, the operator's RSS; then a restart with nothing changed (time to settle, writes: must
# be 0); then one EndpointSlice change per resource (time until every status follows). Each
# phase also reports the API reads it caused, per reconcile (see reads below).
#
# L4PROXY_OPERATOR_BIN: run that binary instead of building the working tree.
set -euo pipefail

n=${1:-500}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$repo/bench/lib.sh" # log, die, PIDS/stop_pid
RAW=$(mktemp -d /tmp/l4p-operator-bench.XXXXXX)
ns=bench
port=18089

bin_dir=$("$repo/tools/build.sh" | tail -n 1)
kubectl="$bin_dir/kubectl"
if [[ -n "${L4PROXY_OPERATOR_BIN:-}" ]]; then
    operator=$L4PROXY_OPERATOR_BIN
else
    (cd "$repo" && cargo build -q --release -p l4proxy-operator)
    operator="${CARGO_TARGET_DIR:-$repo/target}/release/l4proxy-operator"
fi

control_plane_up "$repo" "$kubectl" "$RAW/cp"
"$kubectl" create namespace "$ns" > /dev/null
"$kubectl" wait --for=condition=Established crd/l4proxies.l4proxy.dev > /dev/null

# $1: the last octet of every endpoint address
objects() {
    for i in $(seq 1 "$n"); do
        cat << EOF
---
apiVersion: v1
kind: Service
metadata: {name: svc-$i, namespace: $ns}
spec: {clusterIP: None, ports: [{name: tcp, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: svc-$i-a, namespace: $ns, labels: {kubernetes.io/service-name: svc-$i}}
addressType: IPv4
ports: [{name: tcp, port: 8080, protocol: TCP}]
endpoints: [{addresses: ["10.$((i / 250)).$((i % 250)).$1"], conditions: {ready: true}}]
---
apiVersion: l4proxy.dev/v1alpha1
kind: L4Proxy
metadata: {name: p-$i, namespace: $ns}
spec:
  listeners:
  - {name: web, address: "127.0.0.1:8080", backends: [{service: {name: svc-$i, port: 80}}]}
EOF
    done
}
objects 1 > "$RAW/objects.yaml"
"$kubectl" apply --server-side -f "$RAW/objects.yaml" > /dev/null
log "$n resources, Services and EndpointSlices created"

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
start_operator() {
    "$operator" run --namespace "$ns" --http-address "127.0.0.1:$port" --identity bench \
        --lease-namespace "$ns" > "$RAW/operator-$1.log" 2>&1 &
    PIDS+=($!)
}
operator_pid() { echo "${PIDS[-1]}"; }
metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
writes() { curl -s "127.0.0.1:$port/metrics" | awk '/^l4proxy_operator_writes_total/ {s += $2} END {print s + 0}'; }
# GET and LIST requests the API server has served so far, from its own counters
# (apiserver_request_total; WATCH is not counted), without the two kinds that are not the
# reconciler's: LISTs of L4Proxies (wait_count polls them; the operator's own L4Proxy list at
# start is left out with them) and the Lease (renewed on its own timer). Non-resource requests
# (discovery, /metrics itself) have no resource and are not counted either.
reads() {
    "$kubectl" get --raw /metrics | awk '
        function label(name) {
            if (!match($1, "[{,]" name "=\"[^\"]*\"")) return ""
            return substr($1, RSTART + length(name) + 3, RLENGTH - length(name) - 4)
        }
        $1 ~ /^apiserver_request_total\{/ {
            verb = label("verb"); resource = label("resource")
            if (verb != "GET" && verb != "LIST") next
            if (resource == "" || resource == "leases" || (resource == "l4proxies" && verb == "LIST")) next
            sum += $2
        }
        END { print sum + 0 }'
}
# $1 reads over $2 reconciles
per_reconcile() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }
# One line per resource from the jsonpath template $1; waits until $2 of those lines satisfy
# the grep pattern $3 (-v: do not match it), for at most 300 s.
wait_count() {
    local template=$1 want=$2 got=0 deadline=$((SECONDS + 300))
    shift 2
    while ((SECONDS < deadline)); do
        got=$("$kubectl" get l4p -n "$ns" -o jsonpath="$template" | grep -c "$@" || true)
        ((got >= want)) && return 0
        sleep 0.5
    done
    die "timed out: $got of $want resources"
}

reads0=$(reads)
t0=$(now)
start_operator first
wait_count '{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' "$n" -x True
elapsed=$(since "$t0")
sleep 2 # let in-flight status writes land before reading counters
reconciles=$(metric l4proxy_operator_reconciles_total)
dur_sum=$(metric l4proxy_operator_reconcile_duration_seconds_sum)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$(operator_pid)/status")
read_count=$(($(reads) - reads0))
printf 'all %d Ready after %.2f s; %d reconciles, mean %.1f ms; %d writes; %d reads (%s per reconcile); RSS %d KiB\n' \
    "$n" "$elapsed" "$reconciles" "$(echo "$dur_sum * 1000 / $reconciles" | bc -l)" "$(writes)" \
    "$read_count" "$(per_reconcile "$read_count" "$reconciles")" "$rss"
stop_pid "$(operator_pid)"

reads0=$(reads)
t0=$(now)
start_operator second
until [[ $(metric l4proxy_operator_leader_reconciles_total) -ge $n ]] 2> /dev/null; do sleep 0.2; done
elapsed=$(since "$t0")
reconciles=$(metric l4proxy_operator_reconciles_total)
read_count=$(($(reads) - reads0))
printf 'restart: %d resources re-reconciled in %.2f s with %d writes; %d reconciles, %d reads (%s per reconcile)\n' \
    "$n" "$elapsed" "$(writes)" "$reconciles" "$read_count" "$(per_reconcile "$read_count" "$reconciles")"

# Each resource's configVersion changes when its Service's endpoint does.
objects 2 > "$RAW/objects2.yaml"
versions='{range .items[*]}{.status.configVersion}{"\n"}{end}'
"$kubectl" get l4p -n "$ns" -o jsonpath="$versions" > "$RAW/versions-before"
reconciles0=$(metric l4proxy_operator_reconciles_total)
reads0=$(reads)
t0=$(now)
"$kubectl" apply --server-side -f "$RAW/objects2.yaml" > /dev/null
applied=$(since "$t0")
wait_count "$versions" "$n" -vxF -f "$RAW/versions-before"
elapsed=$(since "$t0")
sleep 2 # let in-flight reconciles finish before reading counters
reconciles=$(($(metric l4proxy_operator_reconciles_total) - reconciles0))
read_count=$(($(reads) - reads0))
printf 'endpoint change on all %d Services: applied in %.2f s, every status followed after %.2f s; %d reconciles, %d reads (%s per reconcile)\n' \
    "$n" "$applied" "$elapsed" "$reconciles" "$read_count" "$(per_reconcile "$read_count" "$reconciles")"
