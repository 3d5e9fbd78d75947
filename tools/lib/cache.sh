# shellcheck shell=bash disable=SC2154 # $here and $outputs come from the caller
# Shared by tools/build*.sh (sourced, not run): find the go toolchain, and build
# into a cache directory atomically under a lock.
#
# The caller defines log(), sets $here (the tools/ directory) and the array
# $outputs (paths relative to the cache directory that a complete build holds),
# then calls, in order:
#
#   find_go                 sets GO
#   cache_begin DEST        prints DEST and exits 0 if it is complete; otherwise takes
#                           DEST's lock and sets $tmp, a fresh directory next to DEST
#   gobuild ...             (any number) go build into $tmp/bin
#   cache_commit            checks $outputs in $tmp and renames $tmp to DEST
#
# On INT/TERM/HUP the running `go build` (which `timeout` keeps in its own
# process group) is stopped and $tmp removed; a .tmp-* left by a SIGKILLed run
# is removed by the next build that holds the lock.

find_go() {
    [[ -n "${GO-}" ]] && return
    if command -v go > /dev/null 2>&1; then
        GO=go
    elif [[ -x /usr/local/go/bin/go ]]; then
        GO=/usr/local/go/bin/go
    else
        log "no go toolchain found (set GO=/path/to/go)"
        exit 1
    fi
}

cache_complete() { # cache_complete DIR
    local out
    for out in "${outputs[@]}"; do
        [[ -e "$1/$out" ]] || return 1
    done
}

cache_begin() { # cache_begin DEST
    cache_dest=$1
    local root name
    root=$(dirname "$cache_dest")
    name=$(basename "$cache_dest")
    if cache_complete "$cache_dest"; then
        log "up to date: $cache_dest"
        echo "$cache_dest"
        exit 0
    fi
    mkdir -p "$root"
    # One builder at a time per cache directory; the others wait and then find the result.
    if command -v flock > /dev/null 2>&1; then
        exec 9> "$root/.lock-$name"
        log "waiting for lock $root/.lock-$name"
        flock 9
        if cache_complete "$cache_dest"; then
            log "built by another process: $cache_dest"
            echo "$cache_dest"
            exit 0
        fi
        # Holding the lock, any .tmp-NAME.* directory is left over from a killed build.
        rm -rf "$root/.tmp-$name".*
    fi
    if [[ -e "$cache_dest" ]]; then
        log "removing incomplete $cache_dest"
        rm -rf "$cache_dest"
    fi
    tmp=$(mktemp -d "$root/.tmp-$name.XXXXXX")
    child=
    trap cache_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
}

cache_cleanup() {
    if [[ -n "$child" ]]; then
        kill -TERM "$child" 2> /dev/null || true
        wait "$child" 2> /dev/null || true
    fi
    rm -rf "$tmp"
}

gobuild() { # gobuild MODULE_DIR OUTPUT LDFLAGS TAGS PACKAGE
    local dir=$1 out=$2 ldflags=$3 tags=$4 pkg=$5 start
    start=$(date +%s)
    log "building $out ($pkg)"
    (cd "$here/$dir" && exec timeout "${L4PROXY_TOOLS_BUILD_TIMEOUT:-40m}" \
        "$GO" build -mod=readonly -trimpath -tags "$tags" -ldflags "$ldflags" -o "$tmp/bin/$out" "$pkg") &
    child=$!
    wait "$child"
    child=
    log "built $out in $(($(date +%s) - start))s"
}

cache_commit() {
    if ! cache_complete "$tmp"; then
        log "build finished but outputs are missing in $tmp"
        exit 1
    fi
    chmod 755 "$tmp" # mktemp -d made it 0700
    mv -T "$tmp" "$cache_dest"
    trap - EXIT INT TERM HUP
}
