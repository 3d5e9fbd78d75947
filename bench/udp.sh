#!/usr/bin/env bash
# UDP: l4proxy vs nginx (stream module) vs socat vs a direct path, on 127.0.0.0/8 only.
#
#   bench/udp.sh [--quick] [--rev GIT_REV]
#
# Load generator, echo backend and session client: bench/udp (a tiny Rust program of its own,
# not in the workspace; recvmmsg/sendmmsg, one sender and one receiver thread).
#   1. Throughput: CLIENTS (16) client sockets, one session each, send DATAGRAM-byte datagrams
#      (64 and 1200 B) to the path; the echo backend returns each one through the same path;
#      delivered = replies received by the client, loss = 1 - received/sent.
#      (a) at fixed offered rates (UDP_RATES, pps), (b) flooded (as fast as one sender thread
#      can). Interleaved round by round, path order rotating each round; medians are reported.
#   2. Sessions: UDP_SESSIONS (100,000) client sockets, each from its own source address
#      (127.10.0.x, fixed ports 2000-29999, outside the ephemeral range), each sending one
#      datagram that must be answered; user-space memory per session = delta of
#      Private_Dirty and Anonymous (smaps_rollup) and VmRSS of the freshly started proxy
#      (nginx: sum over its workers) / sessions. Not for socat (one process per client).
# The Markdown table goes to stdout and bench/results/udp-latest.md; raw output stays in a temp
# dir (printed at the end). Every process started here is stopped on exit.
#
# Environment overrides: UDP_ROUNDS, UDP_DURATION (s), UDP_RATES ("20000 50000"), UDP_SIZES
# ("64 1200"), UDP_CLIENTS (16), UDP_PATHS ("direct l4proxy nginx socat"), UDP_SESSIONS
# (100000), UDP_SESSION_PATHS ("l4proxy nginx nginx-bind4"), UDP_TESTS ("rate flood sessions"),
# UDP_BASE_PORT (62500; BASE..BASE+39 are used), UDP_WORKERS (2: l4proxy --workers and nginx
# worker_processes), L4PROXY_BIN (skip the cargo build and use this binary).
set -euo pipefail

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_args udp.sh "$@"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
if ((QUICK)); then
  ROUNDS=${UDP_ROUNDS:-1}; DURATION=${UDP_DURATION:-1}; RATES=${UDP_RATES:-20000}; SESSIONS=${UDP_SESSIONS:-5000}
else
  ROUNDS=${UDP_ROUNDS:-3}; DURATION=${UDP_DURATION:-5}; RATES=${UDP_RATES:-20000 50000}; SESSIONS=${UDP_SESSIONS:-100000}
fi
SIZES=${UDP_SIZES:-64 1200}
CLIENTS=${UDP_CLIENTS:-16}
read -r -a PATHS <<<"${UDP_PATHS:-direct l4proxy nginx socat}"
read -r -a SESSION_PATHS <<<"${UDP_SESSION_PATHS:-l4proxy nginx nginx-bind4}"
TESTS=${UDP_TESTS:-rate flood sessions}
WORKERS=${UDP_WORKERS:-2}
# At most this many session datagrams unanswered at a time: a burst larger than the listener's
# receive buffer (rmem_default) would be dropped by the kernel before any proxy sees it.
SESSION_WINDOW=${UDP_SESSION_WINDOW:-200}
BASE=${UDP_BASE_PORT:-62500}

P_ECHO=$((BASE + 1))
P_L4=$((BASE + 10)); P_L4_ADMIN=$((BASE + 19))
P_L4S=$((BASE + 11)); P_L4S_ADMIN=$((BASE + 18))
P_NGX=$((BASE + 20)); P_NGXS=$((BASE + 21))
P_SOCAT=$((BASE + 30))
UDP_PORTS=("$P_ECHO" "$P_L4" "$P_L4S" "$P_NGX" "$P_NGXS" "$P_SOCAT")
TCP_PORTS=("$P_L4_ADMIN" "$P_L4S_ADMIN")


for tool in nginx socat python3 curl ss cargo setsid; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y nginx libnginx-mod-stream socat curl iproute2)"
done
NGX_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
if ! nginx -V 2>&1 | grep -q -- '--with-stream\( \|$\)' && [[ ! -f $NGX_MOD ]]; then
  die "nginx has no stream module (apt-get install -y libnginx-mod-stream)"
fi
NGX_LOAD=""
if [[ -f $NGX_MOD ]]; then NGX_LOAD="load_module $NGX_MOD;"; fi

RAW=$(mktemp -d "${TMPDIR:-/tmp}/l4udp.XXXXXX")
RESULTS="$RAW/results.tsv"
META="$RAW/meta.tsv"
: >"$RESULTS"
: >"$META"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
bench_traps

# udp_bound, port_listening, wait_udp: bench/lib.sh

# Processes that make up a path: the proxy's pids (nginx: master and workers; socat: the
# whole process group, children included).
group_pids() { pgrep -g "$1" 2>/dev/null || true; }
nginx_workers() { pgrep -P "$1" 2>/dev/null || true; }

# utime+stime+cutime+cstime over the given pids, in clock ticks (reaped children included).
ticks_of() {
  local total=0 pid stat
  for pid in "$@"; do
    stat=$(<"/proc/$pid/stat") 2>/dev/null || continue
    stat=${stat##*) }
    total=$((total + $(awk '{print $12 + $13 + $14 + $15}' <<<"$stat")))
  done
  echo "$total"
}
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; } # user nice system irq softirq
udp_snmp() { awk '/^Udp:/ {n++; if (n == 1) for (i = 2; i <= NF; i++) h[i] = $i; else for (i = 2; i <= NF; i++) if (h[i] == "RcvbufErrors" || h[i] == "SndbufErrors") printf "%s ", $i}' /proc/net/snmp; }


meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }
json() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2], {}, {"d": d}))' "$1" "$2"; }

# ---------------------------------------------------------------------------------------------
# Limits and preflight.
ulimit -Hn 400000 2>/dev/null || true # only with CAP_SYS_RESOURCE; otherwise use the hard limit
HARD=$(ulimit -Hn)
if [[ "$HARD" == unlimited ]]; then HARD=1048576; fi
ulimit -n "$HARD"
NOFILE=$(ulimit -n)
# The session client holds one socket per session and the proxy one upstream socket per session
# (separate processes): each needs SESSIONS open files. Without CAP_SYS_RESOURCE the hard limit
# cannot be raised and the test is scaled down (and says so in the report).
SESSIONS_WANTED=$SESSIONS
if ((SESSIONS + 1000 > NOFILE)); then
  log "open-files hard limit is $NOFILE (cannot raise it): sessions test limited to $((NOFILE - 1000))"
  SESSIONS=$((NOFILE - 1000))
fi
for p in "${UDP_PORTS[@]}"; do udp_bound "$p" && die "port $p/udp is in use (set UDP_BASE_PORT)"; done
for p in "${TCP_PORTS[@]}"; do port_listening "$p" && die "port $p/tcp is in use (set UDP_BASE_PORT)"; done

# ---------------------------------------------------------------------------------------------
# Binaries.
log "building bench/udp (cargo build --release --manifest-path bench/udp/Cargo.toml)"
cargo build --release --manifest-path "$BENCH/udp/Cargo.toml" >"$RAW/udpbench-build.log" 2>&1 ||
  die "bench/udp build failed; see $RAW/udpbench-build.log"
UB="$BENCH/udp/target/release/udpbench"

build_l4proxy bench-udp

# ---------------------------------------------------------------------------------------------
# Starting the paths. Each start_* sets the pid variable named in its first argument.
setsid "$UB" echo --listen "127.0.0.1:$P_ECHO" --max-seconds 7200 >"$RAW/echo.log" 2>&1 &
ECHO_PID=$!
PIDS+=("$ECHO_PID")
wait_udp "$P_ECHO" "$ECHO_PID" "echo backend"

start_l4proxy() { # name port admin_port -> L4_STARTED pid
  local name=$1 port=$2 admin=$3
  cat >"$RAW/$name.yaml" <<EOF
admin:
  address: 127.0.0.1:$admin
listeners:
- name: udp
  protocol: UDP
  address: 127.0.0.1:$port
  backends:
  - address: 127.0.0.1:$P_ECHO
  limits:
    maxConnections: 200000
    idleTimeout: 5m
EOF
  RUST_LOG=warn setsid "$BIN" run --config "$RAW/$name.yaml" --workers "$WORKERS" >"$RAW/$name.log" 2>&1 &
  L4_STARTED=$!
  PIDS+=("$L4_STARTED")
  wait_udp "$port" "$L4_STARTED" "l4proxy ($name)"
  local i
  for ((i = 0; i < 100; i++)); do port_listening "$admin" && break; sleep 0.1; done
}

start_nginx() { # name port [bind4] -> NGX_STARTED master pid
  local name=$1 port=$2 bind=${3:-} dir="$RAW/$1" bindconf=""
  mkdir -p "$dir/logs"
  if [[ -n "$bind" ]]; then
    # Spread the upstream sockets over 4 source addresses (28k ephemeral ports each).
    # shellcheck disable=SC2016 # nginx variables, not shell ones
    bindconf='split_clients "$remote_addr:$remote_port" $l4b_src { 25% 127.0.3.1; 25% 127.0.3.2; 25% 127.0.3.3; * 127.0.3.4; }'
  fi
  cat >"$dir/nginx.conf" <<EOF
$NGX_LOAD
user root;
daemon off;
master_process on;
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 150000; }
stream {
  $bindconf
  server {
    listen 127.0.0.1:$port udp reuseport;
    proxy_pass 127.0.0.1:$P_ECHO;
    proxy_timeout 5m;
    ${bind:+proxy_bind \$l4b_src;}
  }
}
EOF
  setsid nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" >"$dir/stdout.log" 2>&1 &
  NGX_STARTED=$!
  PIDS+=("$NGX_STARTED")
  wait_udp "$port" "$NGX_STARTED" "nginx ($name)"
  local i
  for ((i = 0; i < 50; i++)); do (($(nginx_workers "$NGX_STARTED" | wc -l) >= WORKERS)) && break; sleep 0.1; done
}

start_socat() { # port
  # UDP4-LISTEN + fork: one child per client (peer), which keeps a socket connected to it and
  # one towards the backend; -T 10 ends a child after 10 s without traffic.
  setsid socat -T 10 "UDP4-LISTEN:$1,bind=127.0.0.1,reuseaddr,fork" "UDP4:127.0.0.1:$P_ECHO" >"$RAW/socat.log" 2>&1 &
  SOCAT_PID=$!
  PIDS+=("$SOCAT_PID")
  wait_udp "$1" "$SOCAT_PID" "socat"
}

declare -A PORT_OF
PORT_OF[direct]=$P_ECHO
has_path() { [[ " ${PATHS[*]} " == *" $1 "* ]]; }
if [[ " $TESTS " == *" rate "* || " $TESTS " == *" flood "* ]]; then
  if has_path l4proxy; then start_l4proxy l4 "$P_L4" "$P_L4_ADMIN"; L4_PID=$L4_STARTED; PORT_OF[l4proxy]=$P_L4; fi
  if has_path nginx; then start_nginx nginx "$P_NGX"; NGX_PID=$NGX_STARTED; PORT_OF[nginx]=$P_NGX; fi
  if has_path socat; then start_socat "$P_SOCAT"; PORT_OF[socat]=$P_SOCAT; fi
fi
path_pids() {
  case $1 in
    direct) ;;
    l4proxy) echo "$L4_PID" ;;
    nginx) echo "$NGX_PID"; nginx_workers "$NGX_PID" ;;
    socat) group_pids "$SOCAT_PID" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Throughput runs.
run_load() { # test path round rate size
  local test=$1 path=$2 round=$3 rate=$4 size=$5 out p0 p1 e0 e1 m0 m1 s0 s1 t0 t1 secs
  local -a ps
  mapfile -t ps < <(path_pids "$path")
  p0=$(ticks_of "${ps[@]}"); e0=$(ticks_of "$ECHO_PID"); m0=$(machine_ticks); s0=$(udp_snmp); t0=$EPOCHREALTIME
  out=$(timeout $((DURATION + 60)) "$UB" load --target "127.0.0.1:${PORT_OF[$path]}" --clients "$CLIENTS" \
    --size "$size" --rate "$rate" --duration "$DURATION") || { log "    load failed for $path ($test)"; return 0; }
  t1=$EPOCHREALTIME
  mapfile -t ps < <(path_pids "$path")
  p1=$(ticks_of "${ps[@]}"); e1=$(ticks_of "$ECHO_PID"); m1=$(machine_ticks); s1=$(udp_snmp)
  echo "$test	$path	$round	$out" >>"$RAW/load.jsonl"
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b - a}')
  local sent recv loss sent_pps recv_pps cpu
  # shellcheck disable=SC2034 # sent and recv: only their rates are recorded
  read -r sent recv loss sent_pps recv_pps cpu < <(json "$out" '"%d %d %f %f %f %f" % (d["sent"], d["received"], d["loss"], d["sent_pps"], d["recv_pps"], d["cpu_s"])')
  record "$test" "$path" "$round" sent_pps "$sent_pps"
  record "$test" "$path" "$round" recv_pps "$recv_pps"
  record "$test" "$path" "$round" loss "$loss"
  # CPU over the whole load run (warm-up and drain included), in cores.
  awk -v p="$((p1 - p0))" -v e="$((e1 - e0))" -v m="$((m1 - m0))" -v c="$cpu" -v hz="$CLK_TCK" -v s="$secs" \
    'BEGIN{pc = p / hz / s; ec = e / hz / s; lc = c / s; f = m / hz / s - pc - ec - lc; if (f < 0) f = 0;
           printf "proxy_cores %.3f\necho_cores %.3f\nloadgen_cores %.3f\nforeign_cores %.3f\n", pc, ec, lc, f}' |
    while read -r k v; do record "$test" "$path" "$round" "$k" "$v"; done
  read -r -a a0 <<<"$s0"; read -r -a a1 <<<"$s1"
  record "$test" "$path" "$round" rcvbuf_errors "$((a1[0] - a0[0]))"
  log "    $(printf '%-8s' "$path") sent $(printf '%9.0f' "$sent_pps") pps, received $(printf '%9.0f' "$recv_pps") pps, loss $(awk -v l="$loss" 'BEGIN{printf "%.2f%%", 100 * l}'), kernel rcvbuf drops $((a1[0] - a0[0]))"
}

rotate() { # round -> the paths, rotated by round-1
  local r=$1 n=${#PATHS[@]} i
  for ((i = 0; i < n; i++)); do echo "${PATHS[$(((i + r - 1) % n))]}"; done
}

declare -a LOAD_TESTS=()
for size in $SIZES; do
  if [[ " $TESTS " == *" rate "* ]]; then for rate in $RATES; do LOAD_TESTS+=("rate$rate:$rate:$size"); done; fi
  if [[ " $TESTS " == *" flood "* ]]; then LOAD_TESTS+=("flood:0:$size"); fi
done
if ((${#LOAD_TESTS[@]})); then
  for ((round = 1; round <= ROUNDS; round++)); do
    mapfile -t order < <(rotate "$round")
    log "round $round/$ROUNDS: ${order[*]}"
    for spec in "${LOAD_TESTS[@]}"; do
      IFS=: read -r name rate size <<<"$spec"
      test="${name}_${size}B"
      log "  $test"
      for path in "${order[@]}"; do run_load "$test" "$path" "$round" "$rate" "$size"; done
    done
  done
  if [[ -n "${L4_PID:-}" ]]; then curl -s "127.0.0.1:$P_L4_ADMIN/stats" >"$RAW/l4-stats-after-load.json" || true; fi
fi

# Stop the throughput instances so that their sockets do not take part in the sessions test.
for pid in "${L4_PID:-}" "${NGX_PID:-}" "${SOCAT_PID:-}"; do [[ -n "$pid" ]] && stop_pid "$pid"; done

# ---------------------------------------------------------------------------------------------
# Sessions test: a fresh proxy per run.
run_sessions() { # path round
  local path=$1 round=$2 port pid out before after sessions answered
  local -a ps
  case $path in
    l4proxy) start_l4proxy "l4s-$round" "$P_L4S" "$P_L4S_ADMIN"; pid=$L4_STARTED; port=$P_L4S ;;
    nginx) start_nginx "ngxs-$round" "$P_NGXS"; pid=$NGX_STARTED; port=$P_NGXS ;;
    nginx-bind4) start_nginx "ngxb-$round" "$P_NGXS" bind4; pid=$NGX_STARTED; port=$P_NGXS ;;
  esac
  sleep 1
  if [[ $path == l4proxy ]]; then ps=("$pid"); else mapfile -t ps < <(nginx_workers "$pid"); fi
  before=$(mem_sample "${ps[@]}")
  out=$(timeout 400 "$UB" sessions --target "127.0.0.1:$port" --count "$SESSIONS" --base-ip 127.10.0.1 \
    --port-lo 2000 --port-hi 29999 --window "$SESSION_WINDOW" --timeout-ms 150) || { log "    sessions client failed for $path"; stop_pid "$pid"; return 0; }
  sleep 1
  after=$(mem_sample "${ps[@]}")
  echo "sessions	$path	$round	$out" >>"$RAW/sessions.jsonl"
  answered=$(json "$out" 'd["answered"]')
  sessions=$answered
  if [[ $path == l4proxy ]]; then
    curl -s "127.0.0.1:$P_L4S_ADMIN/stats" >"$RAW/l4s-$round-stats.json" || true
    local size
    size=$(python3 -c 'import json,sys
d=json.load(open(sys.argv[1]))
def find(o):
    if isinstance(o, dict):
        if "poolStats" in o: return o["poolStats"].get("size")
        for v in o.values():
            r = find(v)
            if r is not None: return r
    if isinstance(o, list):
        for v in o:
            r = find(v)
            if r is not None: return r
print(find(d) or "")' "$RAW/l4s-$round-stats.json" 2>/dev/null || true)
    if [[ -n "$size" && "$size" -gt 0 ]]; then sessions=$size; fi
    record sessions "$path" "$round" pool_size "${size:-0}"
  fi
  # shellcheck disable=SC2034 # f0: only the fds after are recorded
  read -r a0 d0 r0 f0 <<<"$before"
  read -r a1 d1 r1 f1 <<<"$after"
  record sessions "$path" "$round" offered "$SESSIONS"
  record sessions "$path" "$round" answered "$answered"
  record sessions "$path" "$round" sessions "$sessions"
  record sessions "$path" "$round" fds_after "$f1"
  record sessions "$path" "$round" base_rss_kib "$r0"
  record sessions "$path" "$round" base_pdirty_kib "$d0"
  for m in anon:$a0:$a1 pdirty:$d0:$d1 rss:$r0:$r1; do
    IFS=: read -r k x y <<<"$m"
    record sessions "$path" "$round" "${k}_delta_kib" "$((y - x))"
    if ((sessions > 0)); then
      record sessions "$path" "$round" "${k}_per_session_b" "$(awk -v a="$x" -v b="$y" -v n="$sessions" 'BEGIN{printf "%.0f", (b - a) * 1024 / n}')"
    fi
  done
  log "    $(printf '%-11s' "$path") answered $answered/$SESSIONS, sessions $sessions, Private_Dirty +$((d1 - d0)) KiB, Anonymous +$((a1 - a0)) KiB, VmRSS +$((r1 - r0)) KiB, fds $f1"
  stop_pid "$pid"
  sleep 1
}

if [[ " $TESTS " == *" sessions "* ]]; then
  MEM_ROUNDS=${UDP_MEM_ROUNDS:-1}
  for ((round = 1; round <= MEM_ROUNDS; round++)); do
    log "sessions round $round/$MEM_ROUNDS: $SESSIONS sessions each"
    for path in "${SESSION_PATHS[@]}"; do run_sessions "$path" "$round"; done
  done
fi

# ---------------------------------------------------------------------------------------------
# Report.
meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta cpu "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
meta nproc "$(nproc)"
meta kernel "$(uname -r)"
meta l4proxy_rev "$L4_REV"
meta nginx "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
meta socat "$(socat -V 2>/dev/null | awk '/socat version/ {print $3; exit}')"
meta quick "$QUICK"
meta rounds "$ROUNDS"
meta duration "$DURATION"
meta clients "$CLIENTS"
meta workers "$WORKERS"
meta sessions_offered "$SESSIONS"
meta sessions_wanted "$SESSIONS_WANTED"
meta nofile "$NOFILE"
meta port_range "$(tr '\t' '-' </proc/sys/net/ipv4/ip_local_port_range)"
meta rmem_default "$(cat /proc/sys/net/core/rmem_default)"
meta paths "${PATHS[*]}"
meta session_paths "${SESSION_PATHS[*]}"
mkdir -p "$BENCH/results"
python3 "$BENCH/udp/report.py" "$RESULTS" "$META" >"$RAW/report.md"
cp "$RAW/report.md" "$BENCH/results/udp-latest.md"
cat "$RAW/report.md"
log "raw output in $RAW; table written to bench/results/udp-latest.md"
