#!/usr/bin/env bash
# Build the pinned node binaries of the single-node test cluster (tests/cluster):
# kubelet, kube-controller-manager, kube-scheduler, kube-proxy (tools/node, the
# same k8s.io/kubernetes version as tools/kube), containerd, its runc v2 shim
# and ctr (tools/containerd), the pod sandbox ("pause") image, compiled
# from kubernetes' build/pause/linux/pause.c, and the cluster DNS image, CoreDNS
# (tools/coredns), both packaged FROM scratch with buildah. Everything goes to a
# cache directory outside the repository, like tools/build.sh; the directory is
# printed as the last line of stdout (logs go to stderr). It holds bin/ and
# images/{pause,coredns}.tar (docker-archives for `ctr images import`, tagged
# $pause_image and $coredns_image below; images/NAME.ref holds the tag).
#
#   tools/build-node.sh              build if needed, print the DIR (DIR/bin, DIR/images)
#   tools/build-node.sh --print-dir  print the DIR this checkout would use, build nothing
#
# Cache: ${L4PROXY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/l4proxy-tools}/node-<key>
# where <key> is a sha256 prefix over the go.mod, go.sum and *.go files of
# tools/{node,containerd,coredns}, the ldflags and tags below, the image recipes,
# `go version`, `gcc --version` and GOOS/GOARCH. Atomic and locked like
# tools/build.sh (tools/lib/cache.sh holds the shared parts).
#
# runc and the CNI plugins come from Debian's packages (runc,
# containernetworking-plugins), not from here: see tools/README.md.
#
# Environment:
#   L4PROXY_TOOLS_CACHE          cache root (default ~/.cache/l4proxy-tools)
#   L4PROXY_TOOLS_BUILD_TIMEOUT  timeout per `go build` (default 40m)
#   GO                           go command (default: go on PATH, else /usr/local/go/bin/go)
#   BUILDAH                      buildah command (default: buildah)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { echo "tools/build-node.sh: $*" >&2; }
# shellcheck source=tools/lib/cache.sh
source "$here/lib/cache.sh"

print_only=0
case "${1-}" in
    "") ;;
    --print-dir) print_only=1 ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 0
        ;;
    *)
        log "unknown argument: $1 (usage: tools/build-node.sh [--print-dir])"
        exit 2
        ;;
esac

find_go
BUILDAH=${BUILDAH:-buildah}

# --- pinned versions and flags ------------------------------------------------------
# Kept equal to tools/build.sh's (the API server's) stamping.
kube_version=v1.37.2
kube_major=1
kube_minor=37
kube_build_date=2026-10-27T12:01:04Z # time of the v1.37.2 tag (proxy.golang.org .info)
containerd_version=v2.4.2
pause_version=3.10.2 # kubernetes' build/pause/Makefile TAG at v1.37.2
pause_image=localhost/pause:$pause_version-l4proxy
coredns_version=1.15.0 # tools/coredns/go.mod's github.com/coredns/coredns v1.15.0
coredns_image=localhost/coredns:$coredns_version-l4proxy

kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$kube_version"
    kube_ldflags+=" -X $pkg.gitMajor=$kube_major"
    kube_ldflags+=" -X $pkg.gitMinor=$kube_minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean"
    kube_ldflags+=" -X $pkg.buildDate=$kube_build_date"
done

# What containerd's Makefile sets; Revision stays empty (the module proxy does
# not tell the commit). With CGO_ENABLED=0 the btrfs snapshotter (cgo only) is
# left out by its own build constraints; the shim gets no_grpc like upstream's.
containerd_pkg=github.com/containerd/containerd/v2
containerd_ldflags="-s -w -X $containerd_pkg/version.Version=$containerd_version"
containerd_ldflags+=" -X $containerd_pkg/version.Revision= -X $containerd_pkg/version.Package=$containerd_pkg"
containerd_tags=urfave_cli_no_docs
shim_tags="urfave_cli_no_docs no_grpc"

# CoreDNS's Makefile sets only coremain.GitCommit (git describe), which the module proxy does not
# tell: left empty. Its version is a constant (coremain.CoreVersion). CGO_ENABLED=0 like upstream.
coredns_ldflags="-s -w"
# The image: upstream's Dockerfile minus the base image's files (distroless: CA certificates,
# passwd) and the file capability (setcap cap_net_bind_service): the node's Corefile forwards
# nothing (no CA certificates needed), and the pod binds :53 as uid 65532 through the
# namespaced sysctl net.ipv4.ip_unprivileged_port_start instead (tests/cluster/up).
coredns_config=(--entrypoint '["/coredns"]' --user 65532:65532 --workingdir / --port 53/udp --port 53/tcp)

# kubernetes' build/pause/Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV)
pause_cflags="-Os -Wall -Werror -static -DVERSION=v$pause_version-l4proxy"

# --- cache key --------------------------------------------------------------------
goos=$("$GO" env GOOS)
goarch=$("$GO" env GOARCH)
key=$(
    {
        "$GO" version
        gcc --version | head -n 1
        echo "$goos/$goarch"
        echo "kube: $kube_ldflags"
        echo "containerd: $containerd_ldflags tags=$containerd_tags shim=$shim_tags"
        echo "pause: $pause_cflags $pause_image FROM scratch ENTRYPOINT /pause USER 65535:65535"
        echo "coredns: $coredns_ldflags $coredns_image FROM scratch ${coredns_config[*]}"
        cd "$here"
        for f in node/go.mod node/go.sum node/*.go containerd/go.mod containerd/go.sum containerd/*.go \
            coredns/go.mod coredns/go.sum coredns/*.go; do
            echo "== $f"
            cat "$f"
        done
    } | sha256sum | cut -c1-16
)

cache_root=${L4PROXY_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/l4proxy-tools}
dest=$cache_root/node-$key
outputs=(bin/kubelet bin/kube-controller-manager bin/kube-scheduler bin/kube-proxy
    bin/containerd bin/containerd-shim-runc-v2 bin/ctr bin/pause images/pause.tar images/pause.ref
    bin/coredns images/coredns.tar images/coredns.ref)

if ((print_only)); then
    echo "$dest"
    exit 0
fi
cache_begin "$dest" # exits 0 printing $dest when it is complete
mkdir -p "$tmp/bin" "$tmp/images"

# scratch_image NAME REF CONFIG...: packages $tmp/bin/NAME alone as /NAME in a scratch working
# container with `buildah config CONFIG...`, and writes it as images/NAME.tar (a docker-archive
# tagged REF) and images/NAME.ref.
scratch_image() {
    local name=$1 ref=$2 ctr
    shift 2
    log "packaging $ref with buildah"
    ctr=$("$BUILDAH" from --quiet scratch)
    "$BUILDAH" copy --quiet "$ctr" "$tmp/bin/$name" "/$name" > /dev/null
    "$BUILDAH" config "$@" --label "org.opencontainers.image.title=$name" "$ctr"
    "$BUILDAH" commit --quiet --rm "$ctr" "$ref" > /dev/null
    "$BUILDAH" push --quiet "$ref" "docker-archive:$tmp/images/$name.tar:$ref"
    echo "$ref" > "$tmp/images/$name.ref"
}

build_pause_image() {
    local src
    src=$(cd "$here/node" && "$GO" list -mod=readonly -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
    log "compiling pause from $src"
    # shellcheck disable=SC2086 # the flags are words
    gcc $pause_cflags -o "$tmp/bin/pause" "$src"
    scratch_image pause "$pause_image" --entrypoint '["/pause"]' --user 65535:65535
}

all_start=$(date +%s)
build_pause_image
export CGO_ENABLED=0
gobuild node kubelet "$kube_ldflags" "" k8s.io/kubernetes/cmd/kubelet
gobuild node kube-proxy "$kube_ldflags" "" k8s.io/kubernetes/cmd/kube-proxy
gobuild node kube-scheduler "$kube_ldflags" "" k8s.io/kubernetes/cmd/kube-scheduler
gobuild node kube-controller-manager "$kube_ldflags" "" k8s.io/kubernetes/cmd/kube-controller-manager
gobuild containerd containerd "$containerd_ldflags" "$containerd_tags" $containerd_pkg/cmd/containerd
gobuild containerd containerd-shim-runc-v2 "$containerd_ldflags" "$shim_tags" $containerd_pkg/cmd/containerd-shim-runc-v2
gobuild containerd ctr "$containerd_ldflags" "$containerd_tags" $containerd_pkg/cmd/ctr
gobuild coredns coredns "$coredns_ldflags" "" github.com/coredns/coredns
scratch_image coredns "$coredns_image" "${coredns_config[@]}"
cache_commit
log "built all in $(($(date +%s) - all_start))s: $dest"
echo "$dest"
