#!/usr/bin/env bash
# Operator at scale on the local control plane (tests/controlplane): N L4Proxy resources, each
# with a Service backend (Service + EndpointSlice), reconciled by the release binary.
#
#   bench/operator.sh [N]        (default 500)
#
# Reports: time from operator start to all N Ready=True, reconcile count and mean duration,
# writes, the operator's RSS; then a restart with nothing changed (time to settle, writes: must
# be 0); then one EndpointSlice change per resource (time until every status follows).
set -euo pipefail

n=${1:-500}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/l4p-operator-bench.XXXXXX)
ns=bench
port=18089
log() { echo "bench/operator.sh: $*" >&2; }

bin_dir=$("$repo/tools/build.sh" | tail -n 1)
kubectl="$bin_dir/kubectl"
(cd "$repo" && cargo build -q --release -p l4proxy-operator)
operator="$repo/target/release/l4proxy-operator"

eval "$("$repo/tests/controlplane/up" "$work/cp")"
op_pid=
cleanup() {
    [[ -n $op_pid ]] && kill "$op_pid" 2> /dev/null && wait "$op_pid" 2> /dev/null
    "$repo/tests/controlplane/down" "$work/cp" --clean > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$kubectl" apply -f "$repo/crds/" > /dev/null
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
objects 1 > "$work/objects.yaml"
"$kubectl" apply --server-side -f "$work/objects.yaml" > /dev/null
log "$n resources, Services and EndpointSlices created"

now() { date +%s.%N; }
start_operator() {
    "$operator" run --namespace "$ns" --http-address "127.0.0.1:$port" --identity bench \
        --lease-namespace "$ns" > "$work/operator-$1.log" 2>&1 &
    op_pid=$!
}
stop_operator() {
    kill "$op_pid"
    wait "$op_pid" || true
    op_pid=
}
metric() { curl -s "127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
# Prints when `kubectl get` shows $1 resources satisfying the jsonpath filter $2 (or times out).
wait_count() {
    local deadline=$((SECONDS + 300))
    while ((SECONDS < deadline)); do
        local got
        got=$("$kubectl" get l4p -n "$ns" -o jsonpath="$2" | wc -w)
        ((got >= $1)) && return 0
        sleep 0.5
    done
    log "timed out: $got of $1 for $2"
    return 1
}
ready='{range .items[?(@.status.conditions[1].status=="True")]}{.metadata.name} {end}'

t0=$(now)
start_operator first
wait_count "$n" "$ready"
t1=$(now)
sleep 2 # let in-flight status writes land before reading counters
reconciles=$(metric l4proxy_operator_reconciles_total)
dur_sum=$(metric l4proxy_operator_reconcile_duration_seconds_sum)
writes=$(curl -s "127.0.0.1:$port/metrics" | awk '/^l4proxy_operator_writes_total/ {s += $2} END {print s + 0}')
rss=$(awk '/VmRSS/ {print $2}' "/proc/$op_pid/status")
printf 'all %d Ready after %.2f s; %d reconciles, mean %.1f ms; %d writes; RSS %d KiB\n' \
    "$n" "$(echo "$t1 - $t0" | bc)" "$reconciles" "$(echo "$dur_sum * 1000 / $reconciles" | bc -l)" "$writes" "$rss"
stop_operator

t0=$(now)
start_operator second
until [[ $(metric l4proxy_operator_leader_reconciles_total) -ge $n ]] 2> /dev/null; do sleep 0.2; done
t1=$(now)
writes=$(curl -s "127.0.0.1:$port/metrics" | awk '/^l4proxy_operator_writes_total/ {s += $2} END {print s + 0}')
printf 'restart: %d resources re-reconciled in %.2f s with %d writes\n' "$n" "$(echo "$t1 - $t0" | bc)" "$writes"

objects 2 > "$work/objects2.yaml"
version_before=$("$kubectl" get l4p -n "$ns" -o jsonpath='{.items[*].status.configVersion}')
t0=$(now)
"$kubectl" apply --server-side -f "$work/objects2.yaml" > /dev/null
t1=$(now)
deadline=$((SECONDS + 300))
while ((SECONDS < deadline)); do
    # Each resource's configVersion changes when its Service's endpoint does.
    done_count=$("$kubectl" get l4p -n "$ns" -o jsonpath='{.items[*].status.configVersion}' \
        | tr ' ' '\n' | grep -cvxF -f <(echo "$version_before" | tr ' ' '\n') || true)
    ((done_count >= n)) && break
    sleep 0.5
done
t2=$(now)
printf 'endpoint change on all %d Services: applied in %.2f s, every status followed after %.2f s\n' \
    "$n" "$(echo "$t1 - $t0" | bc)" "$(echo "$t2 - $t0" | bc)"
stop_operator
