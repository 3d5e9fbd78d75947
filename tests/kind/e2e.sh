#!/usr/bin/env bash
# The end-to-end suite (tests/e2e) on a kind cluster, for a laptop with Docker and kind: the same
# suite `make e2e` runs on the real node this repository starts on a machine without Docker.
#
#   tests/kind/e2e.sh                 create a cluster, build and load the images, run, delete
#   KEEP_CLUSTER=1 tests/kind/e2e.sh  leave the cluster running afterwards (kind delete cluster
#                                     --name "$CLUSTER" removes it)
#
# Needs: docker, kind, kubectl and helm on PATH (or L4PROXY_TOOLS_BIN naming a directory holding
# kubectl and helm), cargo. Environment:
#   CLUSTER     kind cluster name (default l4proxy-e2e)
#   IMAGE_TAG   tag of the localhost/* images built and loaded (default e2e)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cluster=${CLUSTER:-l4proxy-e2e}
tag=${IMAGE_TAG:-e2e}
images=(l4proxy l4proxy-operator l4proxy-echo)

log() { echo "tests/kind/e2e.sh: $*" >&2; }
die() {
    log "$*"
    exit 1
}

for tool in docker kind cargo; do
    command -v "$tool" > /dev/null || die "$tool not found on PATH"
done
if [ -n "${L4PROXY_TOOLS_BIN:-}" ]; then
    for tool in kubectl helm; do
        [ -x "$L4PROXY_TOOLS_BIN/$tool" ] || die "$L4PROXY_TOOLS_BIN/$tool is missing"
    done
else
    for tool in kubectl helm; do
        command -v "$tool" > /dev/null || die "$tool not found on PATH (or set L4PROXY_TOOLS_BIN)"
    done
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/l4proxy-kind.XXXXXX")
kubeconfig="$work/kubeconfig"
created=0
finish() {
    local status=$?
    if [ "$created" = 1 ] && [ -z "${KEEP_CLUSTER:-}" ]; then
        log "deleting cluster $cluster"
        kind delete cluster --name "$cluster" > /dev/null 2>&1 || log "could not delete cluster $cluster"
    fi
    rm -rf "$work"
    exit "$status"
}
trap finish EXIT

if kind get clusters 2> /dev/null | grep -qx "$cluster"; then
    die "a kind cluster named $cluster exists already: delete it (kind delete cluster --name $cluster) or set CLUSTER"
fi
log "creating cluster $cluster"
kind create cluster --name "$cluster" --kubeconfig "$kubeconfig" --wait 120s
created=1

log "building the images from source (images/Containerfile), tag $tag"
for image in "${images[@]}"; do
    docker build -f "$repo/images/Containerfile" --target "$image" -t "localhost/$image:$tag" "$repo"
    kind load docker-image --name "$cluster" "localhost/$image:$tag"
done

log "running tests/e2e"
cd "$repo"
L4PROXY_E2E_KUBECONFIG="$kubeconfig" L4PROXY_E2E_IMAGE_TAG="$tag" \
    cargo test -p l4proxy-e2e --test e2e -- --ignored --nocapture --test-threads=1
log "passed"
