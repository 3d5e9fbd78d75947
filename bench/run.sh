#!/usr/bin/env bash
# l4proxy vs HAProxy vs nginx stream vs a direct connection, on 127.0.0.1 only.
#
#   bench/run.sh [--quick] [--rev GIT_REV]
#
# Measures, interleaved round by round (path order rotates every round) so that drift on a noisy
# machine hits all paths alike, and reports the median per path:
#   1. iperf3 throughput, 1 stream and 8 streams (iperf3 server on 127.0.0.1);
#   2. new connections/s and p99: wrk with `Connection: close` against an nginx backend;
#   3. keep-alive requests/s and p99: the same without `Connection: close`;
#   4. latency at low load: sockperf ping-pong, one connection, 1 KiB messages, one in flight,
#      round-trip p50/p99 over TCP (all paths) and UDP (direct, l4proxy, nginx: HAProxy has no
#      UDP) against a sockperf server; the report adds "through the proxy - direct" per round.
#      Twice: as the scheduler places things (lat_tcp, lat_udp), and with client, server and the
#      proxy under test all pinned to CPU 0 (lat_tcp_cpu0, lat_udp_cpu0; taskset, restored
#      after each run): on this VM a wake-up of an idle vCPU costs ~50 us, which otherwise
#      decides the numbers; pinned, what remains is the software path;
#   5. user-space memory per idle connection that carried 16 bytes each way (bench/conns.py),
#      for l4proxy, HAProxy and nginx stream, each freshly started.
# Proxies: l4proxy (default runtime: one worker thread per core), HAProxy (`nbthread` = cores) and
# nginx's stream module (`worker_processes` = cores, `access_log off`, default
# `proxy_buffer_size` 16k, `backlog=1024` like l4proxy's listen backlog). TCP listeners of all
# three are one shared socket per listener: neither HAProxy 2.6 (no `shards`) nor l4proxy use
# SO_REUSEPORT for TCP, so nginx's TCP `listen` has no `reuseport` either (BENCH_NGINX_REUSEPORT=1
# adds it, e.g. once l4proxy has a socket per worker). nginx's UDP listener has `reuseport`, as
# in bench/udp.sh (one flow hashes to one socket, so it does not matter for ping-pong).
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
# BENCH_BASE_PORT (default 61400; ports BASE..BASE+39 are used), WRK_THREADS, WRK_CONNS,
# BENCH_TESTS (subset of "iperf1 iperf8 close keepalive latency mem"; "latency" = "lat_tcp lat_udp
# lat_tcp_cpu0 lat_udp_cpu0"),
# BENCH_LAT_DURATION (s per sockperf run; default = BENCH_DURATION), BENCH_LAT_MPS (sockperf
# --mps, default max: the next message leaves when the reply is in), BENCH_NGINX_REUSEPORT,
# L4PROXY_BIN (skip the cargo build and use this binary).
# Without --rev the working tree is built (cargo build --release -p l4proxy); with --rev, that
# commit is exported (git archive) to the raw dir and built with CARGO_TARGET_DIR=target/bench,
# so uncommitted edits in proxy/ do not leak into the measurement.
set -euo pipefail

usage() { sed -n '2,46p' "$0" | sed 's/^# \{0,1\}//'; }

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
TESTS=" ${BENCH_TESTS:-iperf1 iperf8 close keepalive latency mem} "
TESTS=${TESTS/ latency / lat_tcp lat_udp lat_tcp_cpu0 lat_udp_cpu0 }
LAT_DURATION=${BENCH_LAT_DURATION:-$DURATION}
LAT_MPS=${BENCH_LAT_MPS:-max}
NGINX_REUSEPORT=${BENCH_NGINX_REUSEPORT:-0}
NCPU=$(nproc)
MAX_FOREIGN=${BENCH_MAX_FOREIGN:-0.15}
RETRIES=${BENCH_RETRIES:-3}
QUIET_WAIT=${BENCH_QUIET_WAIT:-30}
QUIET_BUDGET=${BENCH_QUIET_BUDGET:-600}
if [[ " $TESTS " != *" mem "* ]]; then MEM_ROUNDS=0; fi

# Backends, then each proxy's listeners for them. The sockperf backend (SOCK) listens on TCP and
# UDP with the same port number; l4proxy's UDP listener has a port of its own (SOCKU).
P_IPERF=$BASE; P_NGINX=$((BASE + 1)); P_ECHO=$((BASE + 2)); P_SOCK=$((BASE + 3))
L4_IPERF=$((BASE + 10)); L4_NGINX=$((BASE + 11)); L4_ECHO=$((BASE + 12)); L4_SOCK=$((BASE + 13)); L4_SOCKU=$((BASE + 14)); L4_ADMIN=$((BASE + 19))
HA_IPERF=$((BASE + 20)); HA_NGINX=$((BASE + 21)); HA_ECHO=$((BASE + 22)); HA_SOCK=$((BASE + 23))
NG_IPERF=$((BASE + 30)); NG_NGINX=$((BASE + 31)); NG_ECHO=$((BASE + 32)); NG_SOCK=$((BASE + 33)); NG_SOCKU=$((BASE + 34))
ALL_PORTS=("$P_IPERF" "$P_NGINX" "$P_ECHO" "$P_SOCK" "$L4_IPERF" "$L4_NGINX" "$L4_ECHO" "$L4_SOCK" "$L4_ADMIN"
  "$HA_IPERF" "$HA_NGINX" "$HA_ECHO" "$HA_SOCK" "$NG_IPERF" "$NG_NGINX" "$NG_ECHO" "$NG_SOCK")
UDP_PORTS=("$P_SOCK" "$L4_SOCKU" "$NG_SOCKU")
PATHS=(direct haproxy l4proxy nginx)
UDP_PATHS=(direct l4proxy nginx) # HAProxy has no UDP
PROXIES=(l4proxy haproxy nginx)

has_test() { [[ "$TESTS" == *" $1 "* ]]; }
LAT=0
for t in lat_tcp lat_udp lat_tcp_cpu0 lat_udp_cpu0; do if has_test "$t"; then LAT=1; fi; done

for tool in haproxy nginx iperf3 wrk python3 curl ss timeout setsid pgrep taskset; do
  command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y haproxy nginx libnginx-mod-stream iperf3 wrk sockperf curl iproute2 procps)"
done
if ((LAT)); then command -v sockperf >/dev/null || die "sockperf not found (apt-get install -y sockperf)"; fi
NGX_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
if ! nginx -V 2>&1 | grep -q -- '--with-stream\( \|$\)' && [[ ! -f $NGX_MOD ]]; then
  die "nginx has no stream module (apt-get install -y libnginx-mod-stream)"
fi
NGX_LOAD=""
if [[ -f $NGX_MOD ]]; then NGX_LOAD="load_module $NGX_MOD;"; fi

RAW=$(mktemp -d "${TMPDIR:-/tmp}/l4bench.XXXXXX")
RESULTS="$RAW/results.tsv"
META="$RAW/meta.tsv"
: >"$RESULTS"
: >"$META"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------------------------------------
bench_traps

# port_listening, udp_bound, wait_port, wait_udp: bench/lib.sh

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
for p in "${UDP_PORTS[@]}"; do
  if udp_bound "$p"; then die "port 127.0.0.1:$p/udp is already in use (set BENCH_BASE_PORT)"; fi
done
# nginx stream: each proxied connection takes two of a worker's connections (and descriptors);
# all idle connections of the memory test may land on one worker.
NG_CONNS=$((NOFILE - 100))

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
for pair in "iperf:TCP:$L4_IPERF:$P_IPERF" "http:TCP:$L4_NGINX:$P_NGINX" "echo:TCP:$L4_ECHO:$P_ECHO" \
  "sockperf:TCP:$L4_SOCK:$P_SOCK" "sockperf-udp:UDP:$L4_SOCKU:$P_SOCK"; do
  IFS=: read -r name proto lport bport <<<"$pair"
  cat >>"$RAW/l4proxy.yaml" <<EOF
- name: $name
  protocol: $proto
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
    nbthread $NCPU
    maxconn $HA_MAXCONN
    # no 'log' line: no logging, like l4proxy with RUST_LOG=warn

defaults
    mode tcp
    maxconn $HA_MAXCONN
    timeout connect 5s
    timeout client 10m
    timeout server 10m
EOF
for pair in "iperf:$HA_IPERF:$P_IPERF" "http:$HA_NGINX:$P_NGINX" "echo:$HA_ECHO:$P_ECHO" "sockperf:$HA_SOCK:$P_SOCK"; do
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

# nginx stream, the third proxy: its own instance (not the HTTP backend's), so that its CPU time
# and memory are its own. Settings comparable to HAProxy's above: a worker per core, no access
# log, timeouts connect 5s / idle 10m, default buffers (proxy_buffer_size 16k), accept defaults
# (multi_accept off, EPOLLEXCLUSIVE on the shared listening socket).
NG_REUSE=""
if ((NGINX_REUSEPORT)); then NG_REUSE=" reuseport"; fi
NG_USER=""
if ((EUID == 0)); then NG_USER="user root;"; fi # workers as root too, so that their /proc is readable like HAProxy's
mkdir -p "$RAW/nginx-stream/logs"
cat >"$RAW/nginx-stream/nginx.conf" <<EOF
$NGX_LOAD
$NG_USER
daemon off;
master_process on;
worker_processes $NCPU;
worker_rlimit_nofile $NOFILE;
pid $RAW/nginx-stream/nginx.pid;
error_log $RAW/nginx-stream/logs/error.log warn;
events { worker_connections $NG_CONNS; }
stream {
    access_log off;
    proxy_connect_timeout 5s;
    proxy_timeout 10m;
EOF
for pair in "iperf:$NG_IPERF:$P_IPERF" "http:$NG_NGINX:$P_NGINX" "echo:$NG_ECHO:$P_ECHO" "sockperf:$NG_SOCK:$P_SOCK"; do
  IFS=: read -r name lport bport <<<"$pair"
  cat >>"$RAW/nginx-stream/nginx.conf" <<EOF
    server { # $name
        listen 127.0.0.1:$lport backlog=1024$NG_REUSE;
        proxy_pass 127.0.0.1:$bport;
    }
EOF
done
cat >>"$RAW/nginx-stream/nginx.conf" <<EOF
    server { # sockperf-udp: no proxy_responses, so a session lives like an l4proxy session
        listen 127.0.0.1:$NG_SOCKU udp reuseport;
        proxy_pass 127.0.0.1:$P_SOCK;
    }
}
EOF
nginx -t -p "$RAW/nginx-stream" -c "$RAW/nginx-stream/nginx.conf" -e "$RAW/nginx-stream/logs/error.log" \
  >"$RAW/nginx-stream-check.log" 2>&1 || die "nginx stream config check failed; see $RAW/nginx-stream-check.log"

# ---------------------------------------------------------------------------------------------
# Starting things.
L4_PID=""
HA_PID=""
NG_PID=""
SP_TCP=""
SP_UDP=""
START_SEQ=0
start_l4proxy() {
  START_SEQ=$((START_SEQ + 1))
  RUST_LOG=warn "$BIN" run --config "$RAW/l4proxy.yaml" >"$RAW/l4proxy-$START_SEQ.log" 2>&1 &
  L4_PID=$!
  PIDS+=("$L4_PID")
  local p
  for p in "$L4_IPERF" "$L4_NGINX" "$L4_ECHO" "$L4_SOCK" "$L4_ADMIN"; do wait_port "$p" "$L4_PID" l4proxy; done
  wait_udp "$L4_SOCKU" "$L4_PID" l4proxy
  curl -fsS --max-time 2 "http://127.0.0.1:$L4_ADMIN/readyz" >/dev/null || die "l4proxy /readyz failed"
}
start_haproxy() {
  START_SEQ=$((START_SEQ + 1))
  haproxy -db -f "$RAW/haproxy.cfg" >"$RAW/haproxy-$START_SEQ.log" 2>&1 &
  HA_PID=$!
  PIDS+=("$HA_PID")
  local p
  for p in "$HA_IPERF" "$HA_NGINX" "$HA_ECHO" "$HA_SOCK"; do wait_port "$p" "$HA_PID" haproxy; done
}
nginx_workers() { pgrep -P "$1" 2>/dev/null || true; }
start_nginx_stream() { # setsid: master and workers in a group of their own, stopped together
  START_SEQ=$((START_SEQ + 1))
  setsid nginx -p "$RAW/nginx-stream" -c "$RAW/nginx-stream/nginx.conf" -e "$RAW/nginx-stream/logs/error.log" \
    >"$RAW/nginx-stream-$START_SEQ.log" 2>&1 &
  NG_PID=$!
  PIDS+=("$NG_PID")
  local p i
  for p in "$NG_IPERF" "$NG_NGINX" "$NG_ECHO" "$NG_SOCK"; do wait_port "$p" "$NG_PID" "nginx stream"; done
  wait_udp "$NG_SOCKU" "$NG_PID" "nginx stream"
  for ((i = 0; i < 100; i++)); do
    (($(nginx_workers "$NG_PID" | wc -l) >= NCPU)) && return 0
    sleep 0.1
  done
  die "nginx stream did not start $NCPU workers within 10 s; see $RAW/nginx-stream"
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
  if ((LAT)); then
    sockperf server -i 127.0.0.1 -p "$P_SOCK" --tcp >"$RAW/sockperf-server-tcp.log" 2>&1 &
    SP_TCP=$!
    PIDS+=("$SP_TCP")
    wait_port "$P_SOCK" "$SP_TCP" "sockperf server (TCP)"
    sockperf server -i 127.0.0.1 -p "$P_SOCK" >"$RAW/sockperf-server-udp.log" 2>&1 &
    SP_UDP=$!
    PIDS+=("$SP_UDP")
    wait_udp "$P_SOCK" "$SP_UDP" "sockperf server (UDP)"
  fi
}

port_of() { # path kind(iperf|http|echo|sock|socku)
  case "$1:$2" in
    direct:iperf) echo "$P_IPERF" ;; direct:http) echo "$P_NGINX" ;; direct:echo) echo "$P_ECHO" ;;
    direct:sock | direct:socku) echo "$P_SOCK" ;;
    haproxy:iperf) echo "$HA_IPERF" ;; haproxy:http) echo "$HA_NGINX" ;; haproxy:echo) echo "$HA_ECHO" ;;
    haproxy:sock) echo "$HA_SOCK" ;;
    l4proxy:iperf) echo "$L4_IPERF" ;; l4proxy:http) echo "$L4_NGINX" ;; l4proxy:echo) echo "$L4_ECHO" ;;
    l4proxy:sock) echo "$L4_SOCK" ;; l4proxy:socku) echo "$L4_SOCKU" ;;
    nginx:iperf) echo "$NG_IPERF" ;; nginx:http) echo "$NG_NGINX" ;; nginx:echo) echo "$NG_ECHO" ;;
    nginx:sock) echo "$NG_SOCK" ;; nginx:socku) echo "$NG_SOCKU" ;;
    *) die "no port for $1:$2" ;;
  esac
}
is_proxy() { [[ "$1" != direct ]]; }
proxy_pids() { # path -> the proxy's processes (nginx: master and workers); none for direct
  case "$1" in
    haproxy) echo "$HA_PID" ;;
    l4proxy) echo "$L4_PID" ;;
    nginx) echo "$NG_PID"; nginx_workers "$NG_PID" ;;
  esac
}
proxy_ticks() { # path -> utime+stime summed over the proxy's processes, in clock ticks
  local total=0 p t
  for p in $(proxy_pids "$1"); do
    t=$(cpu_ticks "$p" 2>/dev/null) || continue
    total=$((total + t))
  done
  echo "$total"
}

# ---------------------------------------------------------------------------------------------
# One measurement each.
run_iperf() { # path round streams
  local path=$1 round=$2 streams=$3 port out t0 t1 attempt parsed gbps retr bytes cpu
  port=$(port_of "$path" iperf)
  out="$RAW/iperf$streams-$path-r$round.json"
  for attempt in 1 2; do
    if is_proxy "$path"; then t0=$(proxy_ticks "$path"); fi
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
  if is_proxy "$path"; then
    t1=$(proxy_ticks "$path")
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
  local path=$1 round=$2 mode=$3 warm=${4:-} port out t0 t1 parsed rps p99 errs reqs cpu dur=$DURATION
  local -a hdr=()
  if [[ "$mode" == close ]]; then hdr=(-H 'Connection: close'); fi
  port=$(port_of "$path" http)
  if [[ -n "$warm" ]]; then dur=1; out="$RAW/warmup-$mode-$path.txt"; else out="$RAW/wrk-$mode-$path-r$round.txt"; fi
  if is_proxy "$path"; then t0=$(proxy_ticks "$path"); fi
  timeout $((dur + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${dur}s" --latency "${hdr[@]}" \
    "http://127.0.0.1:$port/" >"$out" 2>&1 || die "wrk via $path failed; see $out"
  if [[ -n "$warm" ]]; then return 0; fi
  if is_proxy "$path"; then t1=$(proxy_ticks "$path"); fi
  parsed=$(python3 "$BENCH/report.py" wrk "$out")
  read -r rps p99 errs reqs <<<"$parsed"
  record "$mode" "$path" "$round" rps "$rps"
  record "$mode" "$path" "$round" p99_ms "$p99"
  record "$mode" "$path" "$round" errors "$errs"
  if is_proxy "$path"; then
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (b - a) / hz}')
    record "$mode" "$path" "$round" cpu_s "$cpu"
    record "$mode" "$path" "$round" cpu_util "$(awk -v c="$cpu" -v d="$dur" 'BEGIN{printf "%.4f", c / d}')"
    if ((reqs > 0)); then
      record "$mode" "$path" "$round" cpu_s_per_req "$(awk -v c="$cpu" -v n="$reqs" 'BEGIN{printf "%.9f", c / n}')"
    fi
  fi
  log "  wrk $(printf '%-9s' "$mode") $(printf '%-8s' "$path") r$round: $rps req/s, p99 $p99 ms, errors $errs"
}

pin_all() { # cpulist pid...: every thread of the given processes
  local cpus=$1 p
  shift
  for p in "$@"; do taskset -a -p -c "$cpus" "$p" >/dev/null 2>&1 || log "    taskset -a -p -c $cpus $p failed"; done
}
run_latency() { # path round proto(tcp|udp) [pin]: sockperf ping-pong, 1 KiB, one message in flight
  local path=$1 round=$2 proto=$3 pin=${4:-} port out t0 t1 parsed p50 p99 p999 avg n cpu test="lat_$3" all
  local -a tcp=() client=() pinned=()
  if [[ "$proto" == tcp ]]; then tcp=(--tcp); port=$(port_of "$path" sock); else port=$(port_of "$path" socku); fi
  out="$RAW/sockperf-$proto-$path-r$round$pin.txt"
  if [[ -n "$pin" ]]; then
    test="lat_${proto}_cpu0"
    client=(taskset -c 0)
    # shellcheck disable=SC2207 # pids are words
    pinned=("$SP_TCP" "$SP_UDP" $(proxy_pids "$path"))
    pin_all 0 "${pinned[@]}"
  fi
  if is_proxy "$path"; then t0=$(proxy_ticks "$path"); fi
  timeout $((LAT_DURATION + 30)) "${client[@]}" sockperf ping-pong -i 127.0.0.1 -p "$port" "${tcp[@]}" --msg-size 1024 \
    --time "$LAT_DURATION" --mps "$LAT_MPS" --full-rtt >"$out" 2>&1 || die "sockperf ping-pong ($proto) via $path failed; see $out"
  if is_proxy "$path"; then t1=$(proxy_ticks "$path"); fi
  if [[ -n "$pin" ]]; then
    all="0-$((NCPU - 1))"
    pin_all "$all" "${pinned[@]}"
  fi
  parsed=$(python3 "$BENCH/report.py" sockperf "$out")
  read -r p50 p99 p999 avg n <<<"$parsed"
  record "$test" "$path" "$round" p50_us "$p50"
  record "$test" "$path" "$round" p99_us "$p99"
  record "$test" "$path" "$round" p999_us "$p999"
  record "$test" "$path" "$round" avg_us "$avg"
  record "$test" "$path" "$round" round_trips "$n"
  if is_proxy "$path" && ((n > 0)); then
    cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (b - a) / hz}')
    record "$test" "$path" "$round" cpu_s_per_req "$(awk -v c="$cpu" -v n="$n" 'BEGIN{printf "%.9f", c / n}')"
  fi
  log "  sockperf $proto${pin:+ (all on CPU 0)} $(printf '%-8s' "$path") r$round: round trip p50 $p50 us, p99 $p99 us ($n round trips)"
}

run_mem() { # proxy round: fresh proxy, warm up, then MEM_CONNS idle connections that carried data
  local proxy=$1 round=$2 pid port holder out i before after a0 d0 r0 f0 a1 d1 r1 f1 active=""
  local -a ps
  case "$proxy" in
    l4proxy) start_l4proxy; pid=$L4_PID; ps=("$pid") ;;
    haproxy) start_haproxy; pid=$HA_PID; ps=("$pid") ;;
    nginx) start_nginx_stream; pid=$NG_PID; mapfile -t ps < <(nginx_workers "$pid") ;; # the master holds no connection
  esac
  port=$(port_of "$proxy" echo)
  # Warm up: thread-local buffers, pools and allocator arenas exist before the baseline.
  timeout 60 python3 "$BENCH/conns.py" hold --port "$port" --count 200 --hold-max 0.5 --timeout 30 \
    >"$RAW/mem-$proxy-r$round-warmup.log" 2>&1 || die "memory warm-up via $proxy failed; see $RAW/mem-$proxy-r$round-warmup.log"
  sleep 1 # closes settle
  before=$(mem_sample "${ps[@]}")
  out="$RAW/mem-$proxy-r$round-hold.log"
  : >"$out" # exists before the first grep below
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
  after=$(mem_sample "${ps[@]}")
  if [[ "$proxy" == l4proxy ]]; then active=$(curl -fsS --max-time 2 "http://127.0.0.1:$L4_ADMIN/stats" || true); fi
  read -r a0 d0 r0 f0 <<<"$before"
  read -r a1 d1 r1 f1 <<<"$after"
  {
    echo "before: Anonymous=${a0}kB Private_Dirty=${d0}kB VmRSS=${r0}kB fds=$f0"
    echo "after:  Anonymous=${a1}kB Private_Dirty=${d1}kB VmRSS=${r1}kB fds=$f1"
    for p in "${ps[@]}"; do echo "smaps_rollup of $p:"; cat "/proc/$p/smaps_rollup"; done
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
  if ((LAT)); then printf 'sockperf\t%s\n' "$(sockperf --version 2>&1 | awk '/version/ {print "sockperf " $NF; exit}')"; fi
  printf 'lat_args\t%s\n' "sockperf ping-pong --msg-size 1024 --time $LAT_DURATION --mps $LAT_MPS --full-rtt [--tcp]"
  printf 'ncpu\t%s\n' "$NCPU"
  printf 'nginx_stream\t%s\n' "worker_processes $NCPU, TCP listen backlog=1024$NG_REUSE, UDP listen reuseport, proxy_buffer_size default (16k), access_log off"
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
start_nginx_stream
log "warming up every path (1 s of wrk each mode)"
for path in "${PATHS[@]}"; do
  run_wrk "$path" 0 keepalive warmup
  run_wrk "$path" 0 close warmup
done

rotate() { # round path... -> the paths, rotated by round - 1
  local r=$1 n i
  shift
  n=$#
  local -a ps=("$@")
  for ((i = 0; i < n; i++)); do printf '%s ' "${ps[$(((r - 1 + i) % n))]}"; done
}
order_for_round() { rotate "$1" "${PATHS[@]}"; }
ORDERS=()
UDP_ORDERS=()
for ((r = 1; r <= ROUNDS; r++)); do
  ORDERS+=("r$r: $(order_for_round "$r")")
  UDP_ORDERS+=("r$r: $(rotate "$r" "${UDP_PATHS[@]}")")
done
printf 'orders\t%s\n' "$(IFS=';'; echo "${ORDERS[*]}")" >>"$META"
printf 'orders_udp\t%s\n' "$(IFS=';'; echo "${UDP_ORDERS[*]}")" >>"$META"

BUDGET_END=$(($(date +%s) + QUIET_BUDGET))
for test in iperf1 iperf8 close keepalive lat_tcp lat_udp lat_tcp_cpu0 lat_udp_cpu0; do
  has_test "$test" || continue
  log "test $test: $ROUNDS round(s)"
  for ((r = 1; r <= ROUNDS; r++)); do
    if [[ "$test" == lat_udp* ]]; then order=$(rotate "$r" "${UDP_PATHS[@]}"); else order=$(order_for_round "$r"); fi
    for path in $order; do
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
          lat_tcp) run_latency "$path" "$r" tcp ;;
          lat_udp) run_latency "$path" "$r" udp ;;
          lat_tcp_cpu0) run_latency "$path" "$r" tcp pin ;;
          lat_udp_cpu0) run_latency "$path" "$r" udp pin ;;
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
# Memory per idle connection, each proxy freshly started (and the others stopped).
stop_pid "$L4_PID"
stop_pid "$HA_PID"
stop_pid "$NG_PID"
log "memory: $MEM_CONNS idle connections, $MEM_ROUNDS round(s)"
for ((r = 1; r <= MEM_ROUNDS; r++)); do
  for proxy in $(rotate "$r" "${PROXIES[@]}"); do run_mem "$proxy" "$r"; done
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
