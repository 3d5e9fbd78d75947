# shellcheck shell=bash
# Shared by bench/run.sh and bench/udp.sh: argument parsing, logging, process bookkeeping,
# measurement helpers, and building the l4proxy binary under test. Sourced, not run.
# The sourcing script defines usage(), and RAW and RESULTS before the helpers that use them run.

# bench_args NAME "$@": sets QUICK (0|1) and REV (a git revision or empty), read by the sourcing script.
# shellcheck disable=SC2034
bench_args() {
  local name=$1
  shift
  QUICK=0
  REV=""
  while (($#)); do
    case "$1" in
      --quick) QUICK=1 ;;
      --rev) REV=${2:?--rev needs a git revision}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) echo "$name: unknown argument: $1" >&2; usage >&2; exit 64 ;;
    esac
    shift
  done
}

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

port_listening() { [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]; }
udp_bound() { [[ -n "$(ss -Huln "sport = :$1" 2>/dev/null)" ]]; }
wait_bound() { # check port pid what: until `check port` holds (10 s max) while the process lives
  local check=$1 port=$2 pid=$3 what=$4 i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$what (pid $pid) exited during startup; see $RAW"
    "$check" "$port" && return 0
    sleep 0.1
  done
  die "$what: 127.0.0.1:$port not bound ($check) within 10 s; see $RAW"
}
wait_port() { wait_bound port_listening "$@"; } # port pid what: TCP, listening
wait_udp() { wait_bound udp_bound "$@"; }       # port pid what: UDP, bound

# Process bookkeeping: everything started goes into PIDS and is stopped on exit, with its
# process group when it leads one (started with setsid: socat's children, nginx workers).
PIDS=()
stop_pid() { # pid: SIGTERM (to its group if any), wait up to 5 s, then SIGKILL; forget it afterwards
  local pid=$1 i p
  local -a keep=()
  for p in "${PIDS[@]}"; do
    if [[ "$p" != "$pid" ]]; then keep+=("$p"); fi
  done
  PIDS=("${keep[@]}")
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for 5 s; sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  kill -KILL -- "-$pid" 2>/dev/null || true # leftovers of a group
}
cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if ((rc != 0)); then log "failed (exit $rc); raw output kept in $RAW"; fi
  exit "$rc"
}
bench_traps() {
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

# smaps_rollup/status fields in kB summed over pids: "<Anonymous> <Private_Dirty> <VmRSS> <fds>"
mem_sample() {
  local anon=0 pdirty=0 rss=0 fds=0 pid a p r
  for pid in "$@"; do
    a=$(awk '$1 == "Anonymous:" {print $2}' "/proc/$pid/smaps_rollup")
    p=$(awk '$1 == "Private_Dirty:" {print $2}' "/proc/$pid/smaps_rollup")
    r=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$pid/status")
    anon=$((anon + a)); pdirty=$((pdirty + p)); rss=$((rss + r))
    fds=$((fds + $(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)))
  done
  echo "$anon $pdirty $rss $fds"
}

record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; } # test path round metric value

# build_l4proxy TARGET_SUBDIR: sets BIN and L4_REV. L4PROXY_BIN: use that binary; REV: build
# that commit from `git archive` into target/TARGET_SUBDIR (uncommitted edits do not leak in);
# otherwise build the working tree.
build_l4proxy() {
  local target="$ROOT/target/$1"
  L4_REV="$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown) (working tree)"
  if [[ -n "${L4PROXY_BIN:-}" ]]; then
    BIN=$L4PROXY_BIN
    L4_REV="binary $BIN"
  elif [[ -n "$REV" ]]; then
    L4_REV=$(git -C "$ROOT" rev-parse --short "$REV^{commit}") || die "unknown revision $REV"
    log "building l4proxy at $L4_REV (git archive into $RAW/src, CARGO_TARGET_DIR=$target)"
    mkdir -p "$RAW/src"
    git -C "$ROOT" archive "$L4_REV" | tar -x -m -C "$RAW/src" # -m: fresh mtimes, so cargo rebuilds
    (cd "$RAW/src" && CARGO_TARGET_DIR="$target" cargo build --release -p l4proxy) >"$RAW/cargo-build.log" 2>&1 ||
      die "cargo build failed; see $RAW/cargo-build.log"
    BIN="$target/release/l4proxy"
  else
    log "building l4proxy (cargo build --release -p l4proxy)"
    (cd "$ROOT" && cargo build --release -p l4proxy) >"$RAW/cargo-build.log" 2>&1 ||
      die "cargo build failed; see $RAW/cargo-build.log"
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/l4proxy"
  fi
  [[ -x "$BIN" ]] || die "no l4proxy binary at $BIN"
}

# control_plane_up REPO KUBECTL DIR: the local control plane (tests/controlplane/up) with its
# state in DIR and the L4Proxy CRD Established; at exit the PIDS started since are stopped, the
# control plane goes down and DIR's parent ($RAW) is removed. Exports KUBECONFIG.
control_plane_up() {
    CP_REPO=$1 CP_DIR=$3
    eval "$("$CP_REPO/tests/controlplane/up" "$CP_DIR")"
    trap control_plane_finish EXIT
    "$2" apply -f "$CP_REPO/crds/" > /dev/null
    "$2" wait --for=condition=Established crd/l4proxies.l4proxy.dev > /dev/null
}

control_plane_finish() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    "$CP_REPO/tests/controlplane/down" "$CP_DIR" --clean > /dev/null 2>&1 || true
    rm -rf "$RAW"
}
