#!/usr/bin/env bash
# Build the pinned control-plane binaries used by tests (etcd, kube-apiserver,
# kubectl, helm) into a cache directory outside the repository and print that
# directory (the last line of stdout; all logs go to stderr).
#
#   tools/build.sh              build if needed, print BIN dir
#   tools/build.sh --print-dir  print the BIN dir this checkout would use, build nothing
#
# Cache: ${L4PROXY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/l4proxy-tools}/<key>/bin
# where <key> is a sha256 prefix over the go.mod, go.sum and *.go files of
# tools/{etcd,kube,helm}, the ldflags below, `go version` and GOOS/GOARCH.
# A complete cache directory is never rebuilt (a warm run only hashes files).
# Builds go to a temporary directory that is renamed into place, so an
# interrupted build never leaves a half-filled cache directory.
#
# If KUBEBUILDER_ASSETS (the envtest convention) is set and holds etcd,
# kube-apiserver and kubectl, that directory is printed instead and nothing is
# built (helm is then looked up on PATH by whoever needs it).
#
# Environment:
#   L4PROXY_TOOLS_CACHE          cache root (default ~/.cache/l4proxy-tools)
#   L4PROXY_TOOLS_BUILD_TIMEOUT  timeout per `go build` (default 40m)
#   GO                           go command (default: go on PATH, else /usr/local/go/bin/go)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "tools/build.sh: $*" >&2; }

print_only=0
case "${1-}" in
    "") ;;
    --print-dir) print_only=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 0
        ;;
    *)
        log "unknown argument: $1 (usage: tools/build.sh [--print-dir])"
        exit 2
        ;;
esac

# --- KUBEBUILDER_ASSETS short cut ------------------------------------------------
if [[ -n "${KUBEBUILDER_ASSETS-}" ]]; then
    if [[ -x "$KUBEBUILDER_ASSETS/etcd" && -x "$KUBEBUILDER_ASSETS/kube-apiserver" && -x "$KUBEBUILDER_ASSETS/kubectl" ]]; then
        log "using KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
        echo "$KUBEBUILDER_ASSETS"
        exit 0
    fi
    log "KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS lacks etcd, kube-apiserver or kubectl; building our own"
fi

# --- go ---------------------------------------------------------------------------
if [[ -z "${GO-}" ]]; then
    if command -v go > /dev/null 2>&1; then
        GO=go
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    else
        log "no go toolchain found (set GO=/path/to/go)"
        exit 1
    fi
fi

# --- pinned versions and ldflags --------------------------------------------------
kube_version=v1.37.2
kube_major=1
kube_minor=37
kube_build_date=2026-10-27T12:01:04Z # time of the v1.37.2 tag (proxy.golang.org .info)
helm_version=v3.22.0

kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$kube_version"
    kube_ldflags+=" -X $pkg.gitMajor=$kube_major"
    kube_ldflags+=" -X $pkg.gitMinor=$kube_minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean"
    kube_ldflags+=" -X $pkg.buildDate=$kube_build_date"
done

# Helm's Makefile derives the Kubernetes version it reports (.Capabilities and
# lint deprecation checks) from the client-go version: v0.M.N -> 1.M.
# Read from go.mod (not `go list -m`) so that a warm run needs no module cache.
helm_client_go=$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$here/helm/go.mod")
helm_k8s_minor=$(echo "$helm_client_go" | cut -d. -f2)
if [[ ! "$helm_k8s_minor" =~ ^[0-9]+$ ]]; then
    log "cannot find the k8s.io/client-go version in tools/helm/go.mod"
    exit 1
fi
helm_ldflags="-s -w"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.version=$helm_version"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.metadata="
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    helm_ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$helm_k8s_minor"
done

# etcd's version is a constant in go.etcd.io/etcd/api/v3/version; no ldflags needed.
etcd_ldflags="-s -w"

# --- cache key --------------------------------------------------------------------
goos=$("$GO" env GOOS)
goarch=$("$GO" env GOARCH)
key=$(
    {
        "$GO" version
        echo "$goos/$goarch"
        echo "kube: $kube_ldflags"
        echo "helm: $helm_ldflags"
        echo "etcd: $etcd_ldflags"
        cd "$here"
        for f in etcd/go.mod etcd/go.sum etcd/*.go kube/go.mod kube/go.sum kube/*.go helm/go.mod helm/go.sum helm/*.go; do
            echo "== $f"
            cat "$f"
        done
    } | sha256sum | cut -c1-16
)

cache_root=${L4PROXY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/l4proxy-tools}
dest=$cache_root/$key
bin=$dest/bin
binaries=(etcd kube-apiserver kubectl helm)

complete() {
    local b
    for b in "${binaries[@]}"; do
        [[ -x "$1/bin/$b" ]] || return 1
    done
}

if ((print_only)); then
    echo "$bin"
    exit 0
fi

if complete "$dest"; then
    log "up to date: $bin"
    echo "$bin"
    exit 0
fi

# --- build ------------------------------------------------------------------------
mkdir -p "$cache_root"

# One builder at a time per cache root; the others wait and then find the result.
if command -v flock > /dev/null 2>&1; then
    exec 9> "$cache_root/.lock"
    log "waiting for lock $cache_root/.lock"
    flock 9
    if complete "$dest"; then
        log "built by another process: $bin"
        echo "$bin"
        exit 0
    fi
    # Holding the lock, any .tmp-* directory is left over from a killed build.
    rm -rf "$cache_root"/.tmp-*
fi

if [[ -e "$dest" ]]; then
    log "removing incomplete $dest"
    rm -rf "$dest"
fi

tmp=$(mktemp -d "$cache_root/.tmp-$key.XXXXXX")
child=
cleanup() {
    # `timeout` runs go build in its own process group, so a signal to this
    # script's group does not reach it: stop it before removing $tmp.
    if [[ -n "$child" ]]; then
        kill -TERM "$child" 2> /dev/null || true
        wait "$child" 2> /dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
mkdir "$tmp/bin"

timeout_=${L4PROXY_TOOLS_BUILD_TIMEOUT:-40m}
export CGO_ENABLED=0

gobuild() { # gobuild MODULE_DIR OUTPUT LDFLAGS PACKAGE
    local dir=$1 out=$2 ldflags=$3 pkg=$4 start
    start=$(date +%s)
    log "building $out ($pkg)"
    (cd "$here/$dir" && exec timeout "$timeout_" "$GO" build -mod=readonly -trimpath -ldflags "$ldflags" -o "$tmp/bin/$out" "$pkg") &
    child=$!
    wait "$child"
    child=
    log "built $out in $(($(date +%s) - start))s"
}

all_start=$(date +%s)
gobuild etcd etcd "$etcd_ldflags" .
gobuild helm helm "$helm_ldflags" helm.sh/helm/v3/cmd/helm
gobuild kube kubectl "$kube_ldflags" k8s.io/kubernetes/cmd/kubectl
gobuild kube kube-apiserver "$kube_ldflags" k8s.io/kubernetes/cmd/kube-apiserver

if ! complete "$tmp"; then
    log "build finished but binaries are missing in $tmp/bin"
    exit 1
fi
echo "$key" > "$tmp/key"
chmod 755 "$tmp" # mktemp -d made it 0700
mv -T "$tmp" "$dest"
trap - EXIT INT TERM HUP
log "built all in $(($(date +%s) - all_start))s: $bin"
echo "$bin"
