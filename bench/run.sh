#!/usr/bin/env bash
# l4proxy vs HAProxy vs a direct connection, on 127.0.0.1 only.
#
#   bench/run.sh [--quick] [--rev GIT_REV]
#
# Measures, interleaved round by round (path order rotates every round) so that drift on a noisy
# machine hits all paths alike, and reports the median per path:
#   1. iperf3 throughput, 1 stream and 8 streams (iperf3 server on 127.0.0.1);
#   2. new connections/s and p99: wrk with `Connection: close` against an nginx backend;
#   3. keep-alive requests/s and p99: the same without `Connection: close`;
#   4. user-space memory per idle connection that carried 16 bytes each way (bench/conns.py),
#      for l4proxy and HAProxy, each freshly started.
# The Markdown table goes to stdout and bench/results/latest.md; raw output stays in a temp dir
# (printed at the end). Every process started here is stopped on exit.
#
# Other load on the machine (e.g. a compile) is measured during every run as "foreign" CPU: busy
# CPU time in /proc/stat minus the CPU time of this script's own processes. A run with more than
# BENCH_MAX_FOREIGN cores of foreign load (default 0.15) is repeated, at most BENCH_RETRIES times
# (default 3); the last attempt counts either way and the report flags it. Before each run the
# script waits up to BENCH_QUIET_WAIT seconds (default 30) for the foreign load to drop. Waits and
# repeats share a budget of BENCH_QUIET_BUDGET seconds (default 600) per benchmark.
#
# Environment overrides: BENCH_ROUNDS, BENCH_DURATION (s), BENCH_MEM_CONNS, BENCH_MEM_ROUNDS,
# BENCH_BASE_PORT (default 61400; ports BASE..BASE+29 are used), WRK_THREADS, WRK_CONNS,
# BENCH_TESTS (subset of "iperf1 iperf8 close keepalive mem"), L4PROXY_BIN (skip the cargo build
# and use this binary).
# Without --rev the working tree is built (cargo build --release -p l4proxy); with --rev, that
# commit is exported (git archive) to the raw dir and built with CARGO_TARGET_DIR=target/bench,
# so uncommitted edits in proxy/ do not leak into the measurement.
set -euo pipefail

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
bench_args run.sh "$@"

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/bench"
if ((QUICK)); then
  ROUNDS=${BENCH_ROUNDS:-1}; DURATION=${BENCH_DURATION:-2}; MEM_ROUNDS=${BENCH_MEM_ROUNDS:-1}; IPERF_OMIT=0
else
  ROUNDS=${BENCH_ROUNDS:-6}; DURATION=${BENCH_DURATION:-5}; MEM_ROUNDS=${BENCH_MEM_ROUNDS:-2}; IPERF_OMIT=1
fi
WRK_THREADS=${WRK_THREADS:-2}
WRK_CONNS=${WRK_CONNS:-50}
MEM_CONNS_WANTED=${BENCH_MEM_CONNS:-10000}
BASE=${BENCH_BASE_PORT:-61400}
TESTS=${BENCH_TESTS:-iperf1 iperf8 close keepalive mem}
MAX_FOREIGN=${BENCH_MAX_FOREIGN:-0.15}
RETRIES=${BENCH_RETRIES:-3}
QUIET_WAIT=${BENCH_QUIET_WAIT:-30}
QUIET_BUDGET=${BENCH_QUIET_BUDGET:-600}
if [[ " $TESTS " != *" mem "* ]]; then MEM_ROUNDS=0; fi

# Backends, then each proxy's listeners for them.
P_IPERF=$BASE; P_NGINX=$((BASE + 1)); P_ECHO=$((BASE + 2))
L4_IPERF=$((BASE + 10)); L4_NGINX=$((BASE + 11)); L4_ECHO=$((BASE + 12)); L4_ADMIN=$((BASE + 19))
HA_IPERF=$((BASE + 20)); HA_NGINX=$((BASE + 21)); HA_ECHO=$((BASE + 22))
ALL_PORTS=("$P_IPERF" "$P_NGINX" "$P_ECHO" "$L4_IPERF" "$L4_NGINX" "$L4_ECHO" "$L4_ADMIN" "$HA_IPERF" "$HA_NGINX" "$HA_ECHO")
PATHS=(direct haproxy l4proxy)


for tool in haproxy nginx iperf3 wrk python3 curl ss timeout; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y haproxy nginx iperf3 wrk curl iproute2)"
done

RAW=$(mktemp -d "${TMPDIR:-/tmp}/l4bench.XXXXXX")
RESULTS="$RAW/results.tsv"
META="$RAW/meta.tsv"
: >"$RESULTS"
: >"$META"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
bench_traps

port_listening() { [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]; }

wait_port() { # port pid what: until the port listens (10 s max) and the process is alive
  local port=$1 pid=$2 what=$3 i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$what (pid $pid) exited during startup; see $RAW"
    port_listening "$port" && return 0
    sleep 0.1
  done
  die "$what did not listen on 127.0.0.1:$port within 10 s; see $RAW"
}

cpu_ticks() { # pid -> utime+stime of the whole process, in clock ticks
  local stat
  stat=$(<"/proc/$1/stat") || return 1
  stat=${stat##*) }
  awk '{print $12 + $13}' <<<"$stat"
}



# CPU ticks (user+nice+system over all CPUs) minus those of our own processes: this script with
# its reaped children (load generators), and every process in PIDS with its direct children
# (nginx workers). IRQ/softirq time is left out on both sides.
foreign_ticks() {
  local machine ours=0 pid child stat t
  machine=$(awk '/^cpu / {print $2 + $3 + $4}' /proc/stat)
  stat=$(<"/proc/$$/stat")
  stat=${stat##*) }
  ours=$(awk '{print $12 + $13 + $14 + $15}' <<<"$stat")
  for pid in "${PIDS[@]}"; do
    for child in "$pid" $(cat "/proc/$pid/task/"*/children 2>/dev/null); do
      t=$(cpu_ticks "$child" 2>/dev/null) || continue
      ours=$((ours + t))
    done
  done
  echo $((machine - ours))
}
FOREIGN_T0=0
FOREIGN_S0=0
foreign_begin() { FOREIGN_T0=$(foreign_ticks); FOREIGN_S0=$EPOCHREALTIME; }
foreign_end() { # -> average foreign load in cores since foreign_begin
  local t1
  t1=$(foreign_ticks)
  awk -v a="$FOREIGN_T0" -v b="$t1" -v s0="$FOREIGN_S0" -v s1="$EPOCHREALTIME" -v hz="$CLK_TCK" \
    'BEGIN{d = s1 - s0; f = d > 0 ? (b - a) / hz / d : 0; if (f < 0) f = 0; printf "%.3f", f}'
}
too_much_foreign() { awk -v f="$1" -v m="$MAX_FOREIGN" 'BEGIN{exit !(f > m)}'; }
# Waiting and repeated runs draw on one budget for the whole benchmark (QUIET_BUDGET seconds);
# once it is spent, runs go ahead at once and are not repeated, so a machine that never quiets
# down still finishes in bounded time.
BUDGET_END=0
budget_left() { (($(date +%s) < BUDGET_END)); }
wait_quiet() { # before a run: wait (at most QUIET_WAIT s, in 1-s samples) for foreign load to drop
  local i f=0
  budget_left || return 0
  for ((i = 0; i < QUIET_WAIT; i++)); do
    foreign_begin
    sleep 1
    f=$(foreign_end)
    too_much_foreign "$f" || return 0
    budget_left || break
    if ((i == 0)); then log "    waiting up to ${QUIET_WAIT}s for other load (${f} cores) to drop"; fi
  done
  log "    other load still ${f} cores; measuring anyway$(budget_left || echo ' (waiting budget spent)')"
}

# ---------------------------------------------------------------------------------------------
# Limits and preflight.
ulimit -Hn 200000 2>/dev/null || true # only with CAP_SYS_RESOURCE; otherwise use the hard limit
HARD=$(ulimit -Hn)
if [[ "$HARD" == unlimited ]]; then HARD=1048576; fi
ulimit -n "$HARD"
NOFILE=$(ulimit -n)
# A proxy holds two sockets per connection plus a few of its own.
MEM_CONNS=$MEM_CONNS_WANTED
if ((2 * MEM_CONNS + 300 > NOFILE)); then
  MEM_CONNS=$(((NOFILE - 300) / 2))
  log "open-files limit is $NOFILE (cannot raise it): using $MEM_CONNS idle connections instead of $MEM_CONNS_WANTED"
fi
HA_MAXCONN=$(((NOFILE - 100) / 2))
if ((HA_MAXCONN > 100000)); then HA_MAXCONN=100000; fi

for p in "${ALL_PORTS[@]}"; do
  if port_listening "$p"; then die "port 127.0.0.1:$p is already in use (set BENCH_BASE_PORT)"; fi
done

# ---------------------------------------------------------------------------------------------
# l4proxy binary.
build_l4proxy bench

# ---------------------------------------------------------------------------------------------
# Configs.
mkdir -p "$RAW/nginx/logs"
cat >"$RAW/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $RAW/nginx/nginx.pid;
error_log $RAW/nginx/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_timeout 600s;
    keepalive_requests 100000000;
    server {
        listen 127.0.0.1:$P_NGINX backlog=4096;
        location / {
            default_type text/plain;
            return 200 "l4proxy benchmark backend\n";
        }
    }
}
EOF

cat >"$RAW/l4proxy.yaml" <<EOF
admin:
  address: 127.0.0.1:$L4_ADMIN
listeners:
EOF
for pair in "iperf:$L4_IPERF:$P_IPERF" "http:$L4_NGINX:$P_NGINX" "echo:$L4_ECHO:$P_ECHO"; do
  IFS=: read -r name lport bport <<<"$pair"
  cat >>"$RAW/l4proxy.yaml" <<EOF
- name: $name
  protocol: TCP
  address: 127.0.0.1:$lport
  backends:
  - address: 127.0.0.1:$bport
  limits:
    maxConnections: 100000
    idleTimeout: 10m
EOF
done

cat >"$RAW/haproxy.cfg" <<EOF
global
    nbthread 2
    maxconn $HA_MAXCONN
    # no 'log' line: no logging, like l4proxy with RUST_LOG=warn

defaults
    mode tcp
    maxconn $HA_MAXCONN
    timeout connect 5s
    timeout client 10m
    timeout server 10m
EOF
for pair in "iperf:$HA_IPERF:$P_IPERF" "http:$HA_NGINX:$P_NGINX" "echo:$HA_ECHO:$P_ECHO"; do
  IFS=: read -r name lport bport <<<"$pair"
  cat >>"$RAW/haproxy.cfg" <<EOF

frontend fe_$name
    bind 127.0.0.1:$lport
    default_backend be_$name

backend be_$name
    server s1 127.0.0.1:$bport
EOF
done
haproxy -c -f "$RAW/haproxy.cfg" >"$RAW/haproxy-check.log" 2>&1 || die "haproxy config check failed; see $RAW/haproxy-check.log"

# ---------------------------------------------------------------------------------------------
# Starting things.
L4_PID=""
HA_PID=""
START_SEQ=0
start_l4proxy() {
  START_SEQ=$((START_SEQ + 1))
  RUST_LOG=warn "$BIN" run --config "$RAW/l4proxy.yaml" >"$RAW/l4proxy-$START_SEQ.log" 2>&1 &
  L4_PID=$!
  PIDS+=("$L4_PID")
  local p
  for p in "$L4_IPERF" "$L4_NGINX" "$L4_ECHO" "$L4_ADMIN"; do wait_port "$p" "$L4_PID" l4proxy; done
  curl -fsS --max-time 2 "http://127.0.0.1:$L4_ADMIN/readyz" >/dev/null || die "l4proxy /readyz failed"
}
start_haproxy() {
  START_SEQ=$((START_SEQ + 1))
  haproxy -db -f "$RAW/haproxy.cfg" >"$RAW/haproxy-$START_SEQ.log" 2>&1 &
  HA_PID=$!
  PIDS+=("$HA_PID")
  local p
  for p in "$HA_IPERF" "$HA_NGINX" "$HA_ECHO"; do wait_port "$p" "$HA_PID" haproxy; done
}
start_backends() {
  iperf3 -s -B 127.0.0.1 -p "$P_IPERF" >"$RAW/iperf3-server.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$P_IPERF" "$!" "iperf3 server"
  nginx -p "$RAW/nginx" -c "$RAW/nginx/nginx.conf" -e "$RAW/nginx/error.log" >"$RAW/nginx/stdout.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$P_NGINX" "$!" nginx
  python3 "$BENCH/conns.py" echo --port "$P_ECHO" >"$RAW/echo-server.log" 2>&1 &
  PIDS+=("$!")
  wait_port "$P_ECHO" "$!" "echo server"
}

port_of() { # path kind(iperf|http|echo)
  case "$1:$2" in
    direct:iperf) echo "$P_IPERF" ;; direct:http) echo "$P_NGINX" ;; direct:echo) echo "$P_ECHO" ;;
    haproxy:iperf) echo "$HA_IPERF" ;; haproxy:http) echo "$HA_NGINX" ;; haproxy:echo) echo "$HA_ECHO" ;;
    l4proxy:iperf) echo "$L4_IPERF" ;; l4proxy:http) echo "$L4_NGINX" ;; l4proxy:echo) echo "$L4_ECHO" ;;
    *) die "no port for $1:$2" ;;
  esac
}
pid_of() { case "$1" in haproxy) echo "$HA_PID" ;; l4proxy) echo "$L4_PID" ;; *) echo "" ;; esac; }

# ---------------------------------------------------------------------------------------------
# One measurement each.
run_iperf() { # path round streams
  local path=$1 round=$2 streams=$3 port pid out t0 t1 attempt parsed gbps retr bytes cpu
  port=$(port_of "$path" iperf)
  pid=$(pid_of "$path")
  out="$RAW/iperf$streams-$path-r$round.json"
  for attempt in 1 2; do
    if [[ -n "$pid" ]]; then t0=$(cpu_ticks "$pid"); fi
    if timeout $((DURATION + IPERF_OMIT + 30)) iperf3 -c 127.0.0.1 -p "$port" -t "$DURATION" -O "$IPERF_OMIT" \
      -P "$streams" -J --connect-timeout 3000 >"$out" 2>"$out.stderr"; then
      break
    fi
    if ((attempt == 2)); then die "iperf3 -P $streams via $path failed twice; see $out"; fi
    log "iperf3 -P $streams via $path round $round failed (attempt $attempt, kept as $out.failed); retrying once"
    mv "$out" "$out.failed"
    echo "iperf$streams $path r$round attempt $attempt failed" >>"$RAW/retries.log"
    sleep 1 # let the iperf3 server finish the aborted test
  done
  parsed=$(python3 "$BENCH/report.py" iperf "$out")
  read -r gbps retr bytes <<<"$parsed"
  record "iperf$streams" "$path" "$round" gbps "$gbps"
  record "iperf$streams" "$path" "$round" retransmits "$retr"
  if [[ -n "$pid" ]]; then
    t1=$(cpu_ticks "$pid")
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (b - a) / hz}')
    record "iperf$streams" "$path" "$round" cpu_s "$cpu"
    # Bytes received by the client over the measured interval; proxy CPU is over the whole run
    # including the omitted first second, so scale the bytes to the whole run.
    record "iperf$streams" "$path" "$round" cpu_s_per_gb \
      "$(awk -v c="$cpu" -v b="$bytes" -v d="$DURATION" -v o="$IPERF_OMIT" 'BEGIN{printf "%.6f", c / (b * (d + o) / d / 1e9)}')"
  fi
  log "  iperf3 -P $streams  $(printf '%-8s' "$path") r$round: $gbps Gbit/s"
}

run_wrk() { # path round mode(close|keepalive) [warmup]
  local path=$1 round=$2 mode=$3 warm=${4:-} port pid out t0 t1 parsed rps p99 errs reqs cpu dur=$DURATION
  local -a hdr=()
  if [[ "$mode" == close ]]; then hdr=(-H 'Connection: close'); fi
  port=$(port_of "$path" http)
  pid=$(pid_of "$path")
  if [[ -n "$warm" ]]; then dur=1; out="$RAW/warmup-$mode-$path.txt"; else out="$RAW/wrk-$mode-$path-r$round.txt"; fi
  if [[ -n "$pid" ]]; then t0=$(cpu_ticks "$pid"); fi
  timeout $((dur + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${dur}s" --latency "${hdr[@]}" \
    "http://127.0.0.1:$port/" >"$out" 2>&1 || die "wrk via $path failed; see $out"
  if [[ -n "$warm" ]]; then return 0; fi
  if [[ -n "$pid" ]]; then t1=$(cpu_ticks "$pid"); fi
  parsed=$(python3 "$BENCH/report.py" wrk "$out")
  read -r rps p99 errs reqs <<<"$parsed"
  record "$mode" "$path" "$round" rps "$rps"
  record "$mode" "$path" "$round" p99_ms "$p99"
  record "$mode" "$path" "$round" errors "$errs"
  if [[ -n "$pid" ]]; then
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (b - a) / hz}')
    record "$mode" "$path" "$round" cpu_s "$cpu"
    record "$mode" "$path" "$round" cpu_util "$(awk -v c="$cpu" -v d="$dur" 'BEGIN{printf "%.4f", c / d}')"
    if ((reqs > 0)); then
      record "$mode" "$path" "$round" cpu_s_per_req "$(awk -v c="$cpu" -v n="$reqs" 'BEGIN{printf "%.9f", c / n}')"
    fi
  fi
  log "  wrk $(printf '%-9s' "$mode") $(printf '%-8s' "$path") r$round: $rps req/s, p99 $p99 ms, errors $errs"
}

run_mem() { # proxy round: fresh proxy, warm up, then MEM_CONNS idle connections that carried data
  local proxy=$1 round=$2 pid port holder out i before after a0 d0 r0 f0 a1 d1 r1 f1 active=""
  case "$proxy" in
    l4proxy) start_l4proxy; pid=$L4_PID ;;
    haproxy) start_haproxy; pid=$HA_PID ;;
  esac
  port=$(port_of "$proxy" echo)
  # Warm up: thread-local buffers, pools and allocator arenas exist before the baseline.
  timeout 60 python3 "$BENCH/conns.py" hold --port "$port" --count 200 --hold-max 0.5 --timeout 30 \
    >"$RAW/mem-$proxy-r$round-warmup.log" 2>&1 || die "memory warm-up via $proxy failed; see $RAW/mem-$proxy-r$round-warmup.log"
  sleep 1 # closes settle
  before=$(mem_sample "$pid")
  out="$RAW/mem-$proxy-r$round-hold.log"
  python3 "$BENCH/conns.py" hold --port "$port" --count "$MEM_CONNS" --timeout 120 --hold-max 600 >"$out" 2>&1 &
  holder=$!
  PIDS+=("$holder")
  for ((i = 0; i < 1500; i++)); do # 150 s max
    grep -q '^READY' "$out" && break
    kill -0 "$holder" 2>/dev/null || die "idle-connection client via $proxy exited early; see $out"
    sleep 0.1
  done
  grep -q '^READY' "$out" || die "idle-connection client via $proxy not ready within 150 s; see $out"
  sleep 2 # let the proxy finish its bookkeeping for the last connections
  after=$(mem_sample "$pid")
  if [[ "$proxy" == l4proxy ]]; then active=$(curl -fsS --max-time 2 "http://127.0.0.1:$L4_ADMIN/stats" || true); fi
  read -r a0 d0 r0 f0 <<<"$before"
  read -r a1 d1 r1 f1 <<<"$after"
  {
    echo "before: Anonymous=${a0}kB Private_Dirty=${d0}kB VmRSS=${r0}kB fds=$f0"
    echo "after:  Anonymous=${a1}kB Private_Dirty=${d1}kB VmRSS=${r1}kB fds=$f1"
    cat "/proc/$pid/smaps_rollup"
    if [[ -n "$active" ]]; then echo "stats: $active"; fi
  } >"$RAW/mem-$proxy-r$round.txt"
  ((f1 - f0 >= 2 * MEM_CONNS * 98 / 100)) || die "$proxy holds $((f1 - f0)) more fds, expected ~$((2 * MEM_CONNS)); see $RAW/mem-$proxy-r$round.txt"
  stop_pid "$holder"
  stop_pid "$pid"
  for metric in "anon_kib_per_conn:$a0:$a1" "privdirty_kib_per_conn:$d0:$d1" "rss_kib_per_conn:$r0:$r1"; do
    IFS=: read -r name x0 x1 <<<"$metric"
    record mem "$proxy" "$round" "$name" "$(awk -v a="$x0" -v b="$x1" -v n="$MEM_CONNS" 'BEGIN{printf "%.4f", (b - a) / n}')"
  done
  log "  memory $(printf '%-8s' "$proxy") r$round: Anonymous +$((a1 - a0)) kB, Private_Dirty +$((d1 - d0)) kB, VmRSS +$((r1 - r0)) kB for $MEM_CONNS connections"
}

# Machine-wide CPU busy share (percent) over one second, from /proc/stat: other load on a
# 2-core machine distorts every number, so it is reported.
cpu_busy_pct() {
  local a b
  a=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $5 + $6}' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN{split(a, x, " "); split(b, y, " "); t = (y[1] - x[1]) + (y[2] - x[2]); printf "%.0f", t ? 100 * (y[1] - x[1]) / t : 0}'
}

# ---------------------------------------------------------------------------------------------
# Metadata.
BUSY_BEFORE=$(cpu_busy_pct)
if ((BUSY_BEFORE > 15)); then
  log "WARNING: the machine is already ${BUSY_BEFORE}% busy before the benchmark; results will be noisy"
fi
{
  printf 'busy_before\t%s\n' "$BUSY_BEFORE"
  printf 'date\t%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf 'cpu\t%s\n' "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)"
  printf 'nproc\t%s\n' "$(nproc)"
  printf 'kernel\t%s\n' "$(uname -r)"
  printf 'haproxy\t%s\n' "$(haproxy -v 2>&1 | awk 'NR==1 {print "HAProxy " $3}')"
  printf 'nginx\t%s\n' "$(nginx -v 2>&1 | sed 's/^nginx version: //')"
  printf 'wrk\t%s\n' "$(wrk --version 2>&1 | awk 'NR==1 {print "wrk " $2}')"
  printf 'iperf3\t%s\n' "$(iperf3 --version 2>&1 | awk 'NR==1 {print "iperf3 " $2}')"
  printf 'l4proxy_rev\t%s\n' "$L4_REV"
  printf 'mode\t%s\n' "$([[ $QUICK == 1 ]] && echo quick || echo full)"
  printf 'rounds\t%s\n' "$ROUNDS"
  printf 'duration\t%s\n' "$DURATION"
  printf 'wrk_args\t%s\n' "wrk -t$WRK_THREADS -c$WRK_CONNS -d${DURATION}s --latency"
  printf 'mem_conns\t%s\n' "$MEM_CONNS"
  printf 'mem_rounds\t%s\n' "$MEM_ROUNDS"
  printf 'max_foreign\t%s\n' "$MAX_FOREIGN"
  printf 'retries\t%s\n' "$RETRIES"
  printf 'quiet_budget\t%s\n' "$QUIET_BUDGET"
} >>"$META"
git -C "$ROOT" diff --stat -- proxy >"$RAW/l4proxy-uncommitted-changes.txt" 2>/dev/null || true
sysctl net.ipv4.tcp_tw_reuse net.ipv4.ip_local_port_range net.core.somaxconn >"$RAW/sysctl.txt" 2>&1 || true

# ---------------------------------------------------------------------------------------------
# Throughput and request tests, interleaved.
log "raw output: $RAW"
start_backends
start_l4proxy
start_haproxy
log "warming up every path (1 s of wrk each mode)"
for path in "${PATHS[@]}"; do
  run_wrk "$path" 0 keepalive warmup
  run_wrk "$path" 0 close warmup
done

ORDERS=()
order_for_round() { # round -> the three paths, rotated by round
  local r=$1 i
  for ((i = 0; i < 3; i++)); do printf '%s ' "${PATHS[$(((r - 1 + i) % 3))]}"; done
}
for ((r = 1; r <= ROUNDS; r++)); do ORDERS+=("r$r: $(order_for_round "$r")"); done
printf 'orders\t%s\n' "$(IFS=';'; echo "${ORDERS[*]}")" >>"$META"

BUDGET_END=$(($(date +%s) + QUIET_BUDGET))
for test in iperf1 iperf8 close keepalive; do
  [[ " $TESTS " == *" $test "* ]] || continue
  log "test $test: $ROUNDS round(s)"
  for ((r = 1; r <= ROUNDS; r++)); do
    for path in $(order_for_round "$r"); do
      for ((attempt = 1; attempt <= RETRIES + 1; attempt++)); do
        # Each attempt records into a scratch file; only the kept attempt reaches RESULTS.
        RESULTS_FINAL=$RESULTS
        RESULTS="$RAW/attempt.tsv"
        : >"$RESULTS"
        wait_quiet
        foreign_begin
        case "$test" in
          iperf1) run_iperf "$path" "$r" 1 ;;
          iperf8) run_iperf "$path" "$r" 8 ;;
          close | keepalive) run_wrk "$path" "$r" "$test" ;;
        esac
        foreign=$(foreign_end)
        RESULTS=$RESULTS_FINAL
        if too_much_foreign "$foreign" && ((attempt <= RETRIES)) && budget_left; then
          log "    foreign load ${foreign} cores > $MAX_FOREIGN during $test/$path r$r: repeating (attempt $((attempt + 1)))"
          printf '%s\t%s\t%s\t%s\n' "$test" "$path" "$r" "$foreign" >>"$RAW/foreign-retries.tsv"
          mv "$RAW/attempt.tsv" "$RAW/attempt-$test-$path-r$r-$attempt.tsv"
          continue
        fi
        cat "$RAW/attempt.tsv" >>"$RESULTS"
        record "$test" "$path" "$r" foreign_cores "$foreign"
        record "$test" "$path" "$r" attempts "$attempt"
        break
      done
    done
  done
done

# ---------------------------------------------------------------------------------------------
# Memory per idle connection, each proxy freshly started (and the other one stopped).
stop_pid "$L4_PID"
stop_pid "$HA_PID"
log "memory: $MEM_CONNS idle connections, $MEM_ROUNDS round(s)"
for ((r = 1; r <= MEM_ROUNDS; r++)); do
  if ((r % 2)); then order=(l4proxy haproxy); else order=(haproxy l4proxy); fi
  for proxy in "${order[@]}"; do run_mem "$proxy" "$r"; done
done

# ---------------------------------------------------------------------------------------------
printf 'busy_after\t%s\n' "$(cpu_busy_pct)" >>"$META"
mkdir -p "$BENCH/results"
python3 "$BENCH/report.py" table "$RESULTS" "$META" >"$RAW/report.md"
{
  cat "$RAW/report.md"
  echo "Raw output of this run: \`$RAW\` (not kept in the repository)."
} | tee "$BENCH/results/latest.md"
log "done; raw output in $RAW"
