#!/bin/bash
# Server CPU per request at one request in flight per connection: fedbus (HTTP, /api/ws) vs
# an nginx reverse proxy vs nginx answering alone (the one-hop floor) vs nats-server
# request/reply, in one run, same pinning.
#
#   benches/cpu-per-request.sh                      # DURATION=10 WARMUP=2 CONNS=64 SIZE=64
#   DURATION=20 OUT=/tmp/x.md benches/cpu-per-request.sh
#   EXTRA_BIN=/path/to/other/fedbus EXTRA_LABEL="patched glommio" benches/cpu-per-request.sh
#                                   # adds fedbus http and ws rows for another build, same run
#   TASK_LINK=unix benches/cpu-per-request.sh      # the echo task links over the router's unix
#                                   # socket (`listen.internal_unix`) instead of TCP; EXTRA_TASK_LINK
#                                   # the same for the EXTRA_BIN rows: EXTRA_BIN=<this build>
#                                   # EXTRA_TASK_LINK=unix compares the two links side by side
#   BIN=/path/to/fedbus benches/cpu-per-request.sh  # that binary instead of building this tree
#   PGO=1 benches/cpu-per-request.sh               # this tree built by scripts/build-pgo (the
#                                   # build to ship) instead of `cargo build --release`
#   PIPE=8x8 (default; PIPE= turns it off): also fedbus HTTP and /api/ws with 8 connections x 8
#                                   # requests in flight (pipelined), through `fedbus bench`, and
#                                   # nats-server request/reply in the same shape
#   PROFILE=/tmp/p.txt benches/cpu-per-request.sh   # fedbus http only: perf stat + perf record
#   RATE=40000 benches/cpu-per-request.sh          # adds open-loop rows: fedbus HTTP, the nginx
#                                   # proxy and nginx alone at the SAME offered load (req/s over
#                                   # CONNS connections, 1 in flight each; `fedbus bench --rate`,
#                                   # latency from the intended send times), for p99 side by side;
#                                   # with EXTRA_BIN also fedbus HTTP open loop for the other build
#   TLS=1 benches/cpu-per-request.sh                # adds the HTTPS rows (below); with EXTRA_BIN
#                                   # also fedbus https for the other build
#   PROFILE_TLS=1 PROFILE=/tmp/p.txt benches/cpu-per-request.sh   # the same for fedbus https
#   PROFILE_PIPE=1 PROFILE=/tmp/p.txt benches/cpu-per-request.sh  # fedbus http in the PIPE shape
#                                   # (8x8 pipelined, `fedbus bench`) instead of 1 in flight
#   PROFILE_WS=1 PROFILE=/tmp/p.txt benches/cpu-per-request.sh    # fedbus /api/ws in the PIPE shape
#   PROFILE_NGINX=1 PROFILE=/tmp/p.txt benches/cpu-per-request.sh # nginx answering alone (the floor),
#                                   # the same load and perf runs: what the floor's kernel work costs
#   REPEAT=5 benches/cpu-per-request.sh            # every case 5 times (rounds in turn, not a case
#                                   # 5 times in a row): the table shows each row's median and its
#                                   # range, and the ratios are paired by round (fedbus / nginx proxy,
#                                   # nats / fedbus 8x8 of the same round), median and range; not
#                                   # with TLS=1, URING_PROTO=1, PROFILE or PROFILE_TLS
#   URING_PROTO=1 benches/cpu-per-request.sh       # adds benches/uring-proto (a one-hop answerer
#                                   # on raw io_uring, core 1) in its three receive modes beside
#                                   # nginx alone: what multishot receive into provided buffers
#                                   # would save per request over glommio's poll + recv(2)
#
# Run from the repo root (as root: it installs wrk, nginx and nats-server with apt when they
# are missing). Writes benches/results/<date>-cpu-per-request-<host>.md (or $OUT).
#
# Method: every server is started once and pinned to core 1; its backend (fedbus echo task,
# upstream nginx) and the load generator run on core 0. Each case is a warm-up run (discarded),
# then a measured run of DURATION seconds with no warm-up of its own: user+sys clock ticks of
# the server process(es) are read from /proc/PID/stat (and /proc/PID/task/*/stat) just before
# the load generator starts and just after it exits, and divided by the requests it counted.
# The bracket includes opening CONNS connections (and the websocket upgrades): a few ms
# against DURATION seconds. The idle CPU of each server over IDLE seconds is printed beside it.
#
# Load generators: wrk (1 thread, CONNS connections, one request in flight each: wrk never
# pipelines) for HTTP; `fedbus bench` for /api/ws and nats (it speaks both), `--inflight 1`.
#
# TLS=1 rows (wrk over https: OpenSSL, TLS 1.3; each connection's one full handshake falls
# inside the bracket, like the connects above): the fedbus router's HTTPS listener
# (`listen.api_tls`, the same shard on core 1, an ECDSA P-256 certificate from `fedbus keys
# cert`); one nginx terminating TLS 1.3 with that certificate (master + 1 worker, core 1) in
# front of (a) the fedbus router's plaintext api listener and the same echo task: server CPU =
# that nginx + the router, both on core 1, as compare.sh counts it; (b) the upstream nginx
# (`return 200`, core 0): the TLS proxy alone; (c) nothing (`return 200` over TLS): the
# one-hop TLS floor.
set -euo pipefail
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
SIZE=${SIZE:-64}
IDLE=${IDLE:-2}
export PIPE=${PIPE-8x8}
export RATE=${RATE:-}
EXTRA_BIN=${EXTRA_BIN:-}
PROFILE_TLS=${PROFILE_TLS:-0}
PROFILE_PIPE=${PROFILE_PIPE:-0}
PROFILE_WS=${PROFILE_WS:-0}
PROFILE_NGINX=${PROFILE_NGINX:-0}
[ "$PROFILE_WS" = 1 ] && PROFILE_PIPE=1
[ "$PROFILE_PIPE" = 1 ] && [ -z "$PIPE" ] && { echo "PROFILE_PIPE=1 and PROFILE_WS=1 need a PIPE shape (PIPE=8x8)" >&2; exit 1; }
[ "$PROFILE_NGINX" = 1 ] && [ "$PROFILE_PIPE$PROFILE_TLS" != 00 ] && { echo "PROFILE_NGINX=1 profiles wrk's 1-in-flight HTTP load only" >&2; exit 1; }
TLS=${TLS:-0}
URING_PROTO=${URING_PROTO:-0}
export URING_PROTO
[ "$PROFILE_TLS" = 1 ] && TLS=1
export REPEAT=${REPEAT:-1}
[[ "$REPEAT" =~ ^[1-9][0-9]*$ ]] || { echo "REPEAT must be a whole number >= 1" >&2; exit 1; }
if [ "$REPEAT" -gt 1 ] && { [ "${TLS:-0}" = 1 ] || [ "$URING_PROTO" = 1 ] || [ -n "${PROFILE:-}" ] || [ "$PROFILE_TLS" = 1 ]; }; then
  echo "REPEAT > 1 is for the plaintext rows: not with TLS=1, URING_PROTO=1 or PROFILE (or PROFILE_TLS)" >&2; exit 1
fi
export TLS EXTRA_BIN
export EXTRA_LABEL=${EXTRA_LABEL:-other build}
export TASK_LINK=${TASK_LINK:-tcp} EXTRA_TASK_LINK=${EXTRA_TASK_LINK:-${TASK_LINK:-tcp}}
case "$TASK_LINK/$EXTRA_TASK_LINK" in tcp/tcp|tcp/unix|unix/tcp|unix/unix) ;; *) echo "TASK_LINK and EXTRA_TASK_LINK are tcp or unix" >&2; exit 1;; esac
[ -z "$EXTRA_BIN" ] || [ -x "$EXTRA_BIN" ] || { echo "EXTRA_BIN $EXTRA_BIN is not executable" >&2; exit 1; }
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (server on core 1, load on core 0)" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

build_bin

need wrk wrk
need nginx nginx
need nats-server nats-server
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)
WRK=$(command -v wrk)

DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${OUT:-$ROOT/benches/results/$DATE-cpu-per-request-$HOST.md}
work_dir fedbus-cpu
LOAD_START=$(uptime | sed 's/.*load average/load average/')


# ticks PID...: user+sys clock ticks of these processes (all their threads).
ticks() {
  local t=0 p
  for p in "$@"; do
    # Fields after the ")" of comm: utime is the 12th, stime the 13th.
    t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
  done
  echo "$t"
}
# thread_ticks PID...: "name@tid:ticks" of each thread of these processes, for the split.
thread_ticks() {
  local d
  for d in $(for p in "$@"; do echo /proc/"$p"/task/*; done); do
    echo "$(cat "$d/comm" 2>/dev/null | tr ' ' _)@$(basename "$d"):$(sed 's/.*) //' "$d/stat" | awk '{print $12 + $13}')"
  done
}
HZ=$(getconf CLK_TCK)
# ipis1: reschedule + function-call IPIs received by core 1 so far (/proc/interrupts RES, CAL).
ipis1() { awk '$1=="RES:" || $1=="CAL:" {s += $3} END {print s + 0}' /proc/interrupts; }
# steal01: "core0,core1" clock ticks stolen by the hypervisor so far (/proc/stat, 8th value).
steal01() { awk '$1=="cpu0" {a=$9} $1=="cpu1" {b=$9} END {print (a + 0) "," (b + 0)}' /proc/stat; }

# ---- wrk script: POST SIZE bytes, wsids 0..15 in turn, JSON summary to $WRK_JSON.
post_lua "$WORK/post.lua"
cat >>"$WORK/post.lua" <<'LUA'
function done(summary, latency, requests)
  local e = summary.errors
  local f = io.open(os.getenv("WRK_JSON"), "w")
  f:write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %d, "errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    e.connect + e.read + e.write + e.status + e.timeout))
  f:close()
end
LUA

# ---- fedbus: router (shard core 1, control core 0) + echo task (core 0)
export FEDBUS_HOME=$WORK/fedbus
mkdir -p "$FEDBUS_HOME"
"$BIN" keys init --keyring "$FEDBUS_HOME/keys" --app demo/echo >/dev/null
TOKEN=$("$BIN" token client --app demo/echo --sub cpu-bench --ttl 2h --keyring "$FEDBUS_HOME/keys" | tail -1)
# TLS: one ECDSA P-256 certificate from the keyring's dev CA, served by the router and nginx.
CERT=$WORK/cert
[ "$TLS" = 1 ] && "$BIN" keys cert --keyring "$FEDBUS_HOME/keys" --name 127.0.0.1 --name localhost --out "$CERT" >/dev/null
FEDBUS_PATH="/api/local/dev/demo/echo/api/%d/sys/echo"
start_fedbus "$BIN" "" "$TASK_LINK"

# ---- nginx: proxy (core 1) -> upstream (core 0); alone (core 1) (idle during a PROFILE run
# of fedbus)
start_nginx_proxy "$SIZE"
ALONE_PORT=$(free_port)
C_ALONE=$(nginx_conf alone 10 "server { listen 127.0.0.1:$ALONE_PORT backlog=4096; location / { $ANSWER } }")
taskset -c 1 "$NGINX" -c "$C_ALONE" -e stderr >"$WORK/nginx-alone.log" 2>&1 &
NGX_ALONE=$!; PIDS+=($NGX_ALONE)
wait_port "$ALONE_PORT"

# ---- PROFILE=<file>: only fedbus HTTP (or nginx alone, PROFILE_NGINX=1), under perf (counts, then a sampled profile); then exit.
if [ -n "${PROFILE:-}" ]; then
  need perf linux-perf
  url=http://127.0.0.1:$API_PORT
  [ "$PROFILE_TLS" = 1 ] && url=https://127.0.0.1:$TLS_PORT
  export PROFILE_TLS PROFILE_PIPE PROFILE_WS PROFILE_NGINX
  # The process profiled: the router, or nginx's worker (PROFILE_NGINX=1).
  TARGET=$ROUTER
  if [ "$PROFILE_NGINX" = 1 ]; then
    TARGET=""
    for _ in $(seq 50); do
      TARGET=$(pgrep -P "$NGX_ALONE" | head -1 || true)
      [ -n "$TARGET" ] && break
      sleep 0.1
    done
    [ -n "$TARGET" ] || { echo "nginx alone (master $NGX_ALONE) has no worker" >&2; exit 1; }
    url=http://127.0.0.1:$ALONE_PORT
  fi
  proto=()
  [ "$PROFILE_WS" = 1 ] && proto=(--protocol ws)
  # profile_load JSON SECONDS: the load of the profile. wrk, 1 in flight per connection; with
  # PROFILE_PIPE=1, `fedbus bench` in the PIPE shape, its JSON cut to wrk's fields.
  profile_load() {
    if [ "$PROFILE_PIPE" = 1 ]; then
      taskset -c 0 "$BIN" bench --target "$url" "${proto[@]}" --keyring "$FEDBUS_HOME/keys" --connections "${PIPE%x*}" \
        --inflight "${PIPE#*x}" --size "${SIZE}B" --cores 0 --duration "$2s" --warmup 0s --json "$WORK/pipe.json" >/dev/null 2>&1
      python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); l=d["latency_us"]
json.dump({"requests": d["requests"], "duration_us": int(d["seconds"] * 1e6), "p50_us": int(l["p50"]), "p99_us": int(l["p99"]), "errors": d["errors"]}, open(sys.argv[2], "w"))' "$WORK/pipe.json" "$1"
    else
      WRK_JSON=$1 taskset -c 0 "$WRK" -t1 -c"$CONNS" -d"$2s" -s "$WORK/post.lua" "$url" -- "$TOKEN" "$SIZE" "$FEDBUS_PATH" >/dev/null 2>&1
    fi
  }
  echo "== profile: warm-up ($url)" >&2
  profile_load /dev/null "$WARMUP" || true
  echo "== profile: perf stat over a ${DURATION}s run" >&2
  EV=task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter,syscalls:sys_enter_io_uring_enter
  EV=$EV,io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm,io_uring:io_uring_task_work_run,io_uring:io_uring_queue_async_work
  perf stat -e "$EV" -p "$TARGET" -o "$WORK/stat.txt" &
  PS=$!; sleep 0.5; q0=$(ipis1)
  profile_load "$WORK/stat-wrk.json" "$DURATION"
  q1=$(ipis1); kill -INT $PS; wait $PS || true
  echo "== profile: perf record -g over a ${DURATION}s run" >&2
  profile_load "$WORK/rec-wrk.json" "$DURATION" &
  WP=$!; sleep 1
  perf record -F 999 -g -p "$TARGET" -o "$WORK/perf.data" -- sleep $((DURATION - 2)) 2>"$WORK/record.log"
  wait $WP || true
  perf report -i "$WORK/perf.data" --stdio --no-children --sort dso 2>/dev/null | { grep -E '^ +[0-9.]+%' || true; } | sed -n 1,8p >"$WORK/dso.txt"
  perf report -i "$WORK/perf.data" --stdio --no-children --sort sym -g none 2>/dev/null | { grep -E '^ +[0-9.]+%' || true; } | sed -n 1,45p >"$WORK/sym.txt"
  perf script -i "$WORK/perf.data" 2>/dev/null >"$WORK/script.txt"
  # The by-path table follows fedbus's own frames: nginx gets none (an empty path skips it).
  DWARF=""
  if [ "$PROFILE_NGINX" != 1 ]; then
    echo "== profile: perf record --call-graph dwarf over a ${DURATION}s run (by path)" >&2
    profile_load "$WORK/dwarf-wrk.json" "$DURATION" &
    WP=$!; sleep 1
    perf record -F 499 --call-graph dwarf,16384 -p "$TARGET" -o "$WORK/dwarf.data" -- sleep $((DURATION - 2)) 2>>"$WORK/record.log"
    wait $WP || true
    DWARF=$WORK/dwarf.txt
    perf script -F comm,tid,period,event,ip,sym,dso -i "$WORK/dwarf.data" 2>/dev/null >"$DWARF"
    rm -f "$WORK/dwarf.data"
  fi
  python3 "$ROOT/benches/perf-groups.py" "$WORK/script.txt" "$WORK/stat.txt" "$WORK/stat-wrk.json" "$WORK/rec-wrk.json" \
    "$WORK/dso.txt" "$WORK/sym.txt" "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(uname -r)" \
    "$(perf --version)" "$(uptime | sed 's/.*load average/load average/')" "$CONNS" "$SIZE" "$DURATION" "$((q1 - q0))" "$DWARF" >"$PROFILE"
  cat "$PROFILE"
  exit 0
fi

# TLS=1: one nginx (master + 1 worker, core 1) terminating TLS 1.3 on three ports: in front of
# the fedbus router's plaintext api listener, in front of the upstream nginx, answering alone.
if [ "$TLS" = 1 ]; then
  TLS_ROUTER_PORT=$(free_port); TLS_PROXY_PORT=$(free_port); TLS_ALONE_PORT=$(free_port)
  TLS_SRV="ssl_protocols TLSv1.3; ssl_certificate $CERT.pem; ssl_certificate_key $CERT.key; ssl_session_cache shared:SSL:10m; ssl_session_tickets on;"
  C_TLS=$(nginx_conf tls 10 "upstream fedbus { server 127.0.0.1:$API_PORT; keepalive 256; keepalive_requests 100000000; } $UPSTREAM_UP
  server { listen 127.0.0.1:$TLS_ROUTER_PORT ssl backlog=4096; $TLS_SRV location / { proxy_pass http://fedbus; $PROXY_OPTS } }
  server { listen 127.0.0.1:$TLS_PROXY_PORT ssl backlog=4096; $TLS_SRV location / { proxy_pass http://up; $PROXY_OPTS } }
  server { listen 127.0.0.1:$TLS_ALONE_PORT ssl backlog=4096; $TLS_SRV location / { $ANSWER } }")
  taskset -c 1 "$NGINX" -c "$C_TLS" -e stderr >"$WORK/nginx-tls.log" 2>&1 &
  NGX_TLS=$!; PIDS+=($NGX_TLS)
  wait_port "$TLS_ROUTER_PORT"; wait_port "$TLS_PROXY_PORT"; wait_port "$TLS_ALONE_PORT"
fi
sleep 0.3
# nginx_pids MASTER: the master and its workers.
nginx_pids() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }

# ---- nats-server (core 1)
NATS_PORT=$(free_port)
GOMAXPROCS=1 taskset -c 1 "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats-server.log" 2>&1 &
NATS_PID=$!; PIDS+=($NATS_PID)
wait_port "$NATS_PORT"


CMDS=$WORK/commands.txt; : >"$CMDS"
ROWS=$WORK/rows.jsonl; : >"$ROWS"

# measure NAME SERVER_PIDS BACKEND_PIDS KIND CMD...: a warm-up run, then a measured run bracketed
# by the servers' CPU ticks. KIND is wrk or bench (where the request count comes from).
measure() {
  local name=$1 spids=$2 bpids=$3 kind=$4; shift 4
  local j=$WORK/$name.json
  echo "$*" | sed "s|${EXTRA_BIN:-@none@}|fedbus-extra|g; s|$BIN|fedbus|g; s|$WRK|wrk|g; s|$WORK/||g; s|$TOKEN|\$TOKEN|g; s|$FEDBUS_HOME/keys|keys|g;
    s|:$API_PORT|:\$API|g; s|:$PROXY_PORT|:\$PROXY|g; s|:$ALONE_PORT|:\$ALONE|g; s|:$NATS_PORT|:\$NATS|g;
    s|:${TLS_PORT:-@none@}/|:\$API_TLS/|g; s|:${TLS_ROUTER_PORT:-@none@}/|:\$TLS_ROUTER/|g;
    s|:${TLS_PROXY_PORT:-@none@}/|:\$TLS_PROXY/|g; s|:${TLS_ALONE_PORT:-@none@}/|:\$TLS_ALONE/|g;
    s|:${URING_PORT:-@none@}/|:\$URING/|g" >>"$CMDS"
  echo "== $name" >&2
  # A fedbus router's own latency histogram around the run (scraped outside the CPU brackets:
  # the control thread answers it): did the router see the tail the load generator reports?
  local m0="" rl="{}"
  if [ "$spids" = "$ROUTER" ]; then m0=$WORK/$name.m0; router_metrics >"$m0" 2>/dev/null || m0=""; fi
  # Idle CPU of the server over IDLE seconds (timers, control thread): the floor under the load.
  local i0 i1; i0=$(ticks $spids); sleep "$IDLE"; i1=$(ticks $spids)
  local s0 b0 w0 t0 s1 b1 w1 c0 c1
  s0=$(ticks $spids); b0=$(ticks $bpids); t0=$(thread_ticks $spids | tr '\n' ' '); w0=$(date +%s.%N); q0=$(ipis1); v0=$(steal01); c0=$(tcp_counters)
  if ! WRK_JSON=$j timeout $((DURATION + 60)) "$@" >"$WORK/$name.log" 2>&1; then
    echo "   failed: $(tail -2 "$WORK/$name.log")" >&2
    # What the servers said about it (the work folder goes when the script ends).
    for l in "$WORK"/router*.log "$WORK"/echo*.log; do
      [ -f "$l" ] && { echo "   ${l#"$WORK"/}:"; tail -5 "$l" | sed 's/^/     /'; } >&2
    done
  fi
  c1=$(tcp_counters); v1=$(steal01); q1=$(ipis1); w1=$(date +%s.%N); s1=$(ticks $spids); b1=$(ticks $bpids)
  local t1; t1=$(thread_ticks $spids | tr '\n' ' ')
  if [ -n "$m0" ] && router_metrics >"$WORK/$name.m1" 2>/dev/null; then
    rl=$(router_latency "$m0" "$WORK/$name.m1" 2>/dev/null || echo "{}")
  fi
  python3 - "$name" "$kind" "$j" "$WORK/$name.log" "$s0" "$s1" "$b0" "$b1" "$w0" "$w1" "$HZ" "$i0" "$i1" "$IDLE" "$t0" "$t1" "$q0" "$q1" "$ROUND" "$v0" "$v1" "$rl" "$c0" "$c1" >>"$ROWS" <<'PY'
import json, re, sys
name, kind, j, log, s0, s1, b0, b1, w0, w1, hz, i0, i1, idle, t0, t1, q0, q1, rnd, v0, v1, rl, c0, c1 = sys.argv[1:]
hz = float(hz)
try:
    d = json.load(open(j))
except Exception:
    print(json.dumps({"name": name, "round": int(rnd), "failed": open(log).read()[-300:]}))
    sys.exit(0)
if kind == "wrk":
    reqs, secs, p99, errs = d["requests"], d["duration_us"] / 1e6, d["p99_us"], d["errors"]
    p50, pmax, mean = d.get("p50_us"), d.get("max_us"), d.get("mean_us")
else:
    st = d.get("stats", d)
    reqs = d.get("ok") or st.get("ok")
    secs = d.get("seconds") or d.get("duration_s")
    p99 = d["latency_us"]["p99"]
    p50, pmax, mean = d["latency_us"].get("p50"), d["latency_us"].get("max"), d["latency_us"].get("mean")
    errs = d.get("errors", 0)
    if isinstance(errs, dict):
        errs = sum(errs.values())
def split(s):
    out = {}
    for kv in s.split():
        k, v = kv.rsplit(":", 1)
        out[k] = int(v)
    return out
a, b = split(t0), split(t1)
threads = sorted(((k.split("@")[0], (b[k] - a.get(k, 0)) / hz * 1e6 / reqs) for k in b if reqs), key=lambda x: -x[1])
wall = float(w1) - float(w0)
cpu = (int(s1) - int(s0)) / hz
print(json.dumps({
    "name": name, "round": int(rnd), "requests": reqs, "seconds": secs, "rps": reqs / secs if secs else 0,
    "p99_us": p99, "p50_us": p50, "max_us": pmax, "mean_us": mean, "errors": errs, "server_cpu_s": cpu, "wall_s": wall,
    "server_busy": cpu / wall, "server_us": cpu * 1e6 / reqs if reqs else None,
    "backend_us": (int(b1) - int(b0)) / hz * 1e6 / reqs if reqs else None,
    "idle_cpu_per_s": (int(i1) - int(i0)) / hz / float(idle),
    "ipis_per_req": (int(q1) - int(q0)) / reqs if reqs else None,
    "threads": [t for t in threads if t[1] >= 0.05],
    # Share of the wall time the hypervisor ran something else on each core.
    "steal": [(int(b) - int(a)) / hz / wall for a, b in zip(v0.split(","), v1.split(","))],
    # The router's own account of the run (fedbus rows): requests, mean, how many over 12.8 ms.
    "router": json.loads(rl),
    # The host's TCP retransmissions during the run: segments, loss probes, timeouts.
    "tcp": [int(b) - int(a) for a, b in zip(c0.split(","), c1.split(","))],
}))
PY
}

WRKARGS=(-t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/post.lua")
WARM=(-t1 -c"$CONNS" -d"${WARMUP}s" -s "$WORK/post.lua")
# wrk_case NAME SERVER_PIDS BACKEND_PIDS PORT PATH_TEMPLATE [SCHEME]: SCHEME http (default) or https.
wrk_case() {
  local name=$1 spids=$2 bpids=$3 port=$4 path=$5 scheme=${6:-http}
  echo "== $name (warm-up)" >&2
  WRK_JSON=/dev/null taskset -c 0 "$WRK" "${WARM[@]}" "$scheme://127.0.0.1:$port/" -- "$TOKEN" "$SIZE" "$path" >/dev/null 2>&1 || true
  measure "$name" "$spids" "$bpids" wrk taskset -c 0 "$WRK" "${WRKARGS[@]}" "$scheme://127.0.0.1:$port/" -- "$TOKEN" "$SIZE" "$path"
}
# bench_case NAME SERVER_PIDS BACKEND_PIDS ARGS...: fedbus bench, --inflight 1 (BC_CONNS and
# BC_INFLIGHT override the shape), load on core 0.
bench_case() {
  local name=$1 spids=$2 bpids=$3; shift 3
  local common=(--connections "${BC_CONNS:-$CONNS}" --inflight "${BC_INFLIGHT:-1}" --size "${SIZE}B" --cores 0)
  echo "== $name (warm-up)" >&2
  taskset -c 0 "$BIN" bench "$@" "${common[@]}" --duration "${WARMUP}s" --warmup 0s >/dev/null 2>&1 || true
  measure "$name" "$spids" "$bpids" bench taskset -c 0 "$BIN" bench "$@" "${common[@]}" --duration "${DURATION}s" --warmup 0s --json "$WORK/$name.json"
}

# The cases, REPEAT rounds of them (each round measures every row once, so that a row's
# rounds are spread over the run like its neighbours').
for ROUND in $(seq 1 "$REPEAT"); do
[ "$REPEAT" = 1 ] || echo "== round $ROUND of $REPEAT" >&2
# The other build's section of the last round stopped this build's router.
if [ "$ROUND" -gt 1 ] && [ -n "$EXTRA_BIN" ]; then start_fedbus "$BIN" "" "$TASK_LINK"; fi
wrk_case fedbus-http "$ROUTER" "$ECHO" "$API_PORT" "$FEDBUS_PATH"
bench_case fedbus-ws "$ROUTER" "$ECHO" --target "http://127.0.0.1:$API_PORT" --protocol ws --keyring "$FEDBUS_HOME/keys"
# pipe_cases TAG: the PIPE shape (connections x in flight) over HTTP and /api/ws.
pipe_cases() {
  [ -n "$PIPE" ] || return 0
  BC_CONNS=${PIPE%x*} BC_INFLIGHT=${PIPE#*x} bench_case "$1-http-pipe" "$ROUTER" "$ECHO" --target "http://127.0.0.1:$API_PORT" --keyring "$FEDBUS_HOME/keys"
  BC_CONNS=${PIPE%x*} BC_INFLIGHT=${PIPE#*x} bench_case "$1-ws-pipe" "$ROUTER" "$ECHO" --target "http://127.0.0.1:$API_PORT" --protocol ws --keyring "$FEDBUS_HOME/keys"
}
pipe_cases fedbus
# rate_case NAME SERVER_PIDS BACKEND_PIDS URL: open loop at RATE req/s (only when RATE is set).
rate_case() {
  [ -n "$RATE" ] || return 0
  bench_case "$1" "$2" "$3" --target "$4" --rate "$RATE" --keyring "$FEDBUS_HOME/keys"
}
rate_case fedbus-http-rate "$ROUTER" "$ECHO" "http://127.0.0.1:$API_PORT"
if [ "$TLS" = 1 ]; then
  wrk_case fedbus-https "$ROUTER" "$ECHO" "$TLS_PORT" "$FEDBUS_PATH" https
  # nginx terminates TLS and the router (same shard, core 1) answers over plaintext.
  wrk_case nginx-tls-router "$(nginx_pids $NGX_TLS) $ROUTER" "$ECHO" "$TLS_ROUTER_PORT" "$FEDBUS_PATH" https
fi
if [ -n "$EXTRA_BIN" ]; then
  # The same cases against a router and echo task built otherwise (EXTRA_BIN), same pinning.
  stop_fedbus
  start_fedbus "$EXTRA_BIN" -extra "$EXTRA_TASK_LINK"
  wrk_case extra-http "$ROUTER" "$ECHO" "$API_PORT" "$FEDBUS_PATH"
  bench_case extra-ws "$ROUTER" "$ECHO" --target "http://127.0.0.1:$API_PORT" --protocol ws --keyring "$FEDBUS_HOME/keys"
  pipe_cases extra
  rate_case extra-http-rate "$ROUTER" "$ECHO" "http://127.0.0.1:$API_PORT"
  [ "$TLS" = 1 ] && wrk_case extra-https "$ROUTER" "$ECHO" "$TLS_PORT" "$FEDBUS_PATH" https
  stop_fedbus
fi
if [ "$TLS" = 1 ]; then
  wrk_case nginx-tls-proxy "$(nginx_pids $NGX_TLS)" "$(nginx_pids $NGX_UP)" "$TLS_PROXY_PORT" "$FEDBUS_PATH" https
  wrk_case nginx-tls-alone "$(nginx_pids $NGX_TLS)" "" "$TLS_ALONE_PORT" "$FEDBUS_PATH" https
fi
wrk_case nginx-proxy "$(nginx_pids $NGX_PROXY)" "$(nginx_pids $NGX_UP)" "$PROXY_PORT" "$FEDBUS_PATH"
wrk_case nginx-alone "$(nginx_pids $NGX_ALONE)" "" "$ALONE_PORT" "$FEDBUS_PATH"
if [ "$URING_PROTO" = 1 ]; then
  # The io_uring receive prototype (benches/uring-proto), alone on core 1 like nginx alone.
  UP_BIN=$ROOT/target/uring-proto/release/uring-proto
  echo "== cargo build --release (benches/uring-proto)" >&2
  CARGO_TARGET_DIR=$ROOT/target/uring-proto cargo build --release -q --manifest-path "$ROOT/benches/uring-proto/Cargo.toml"
  for mode in poll multishot multishot-send; do
    URING_PORT=$(free_port)
    taskset -c 1 "$UP_BIN" "$mode" "127.0.0.1:$URING_PORT" >"$WORK/uring-$mode.log" 2>&1 &
    UP_PID=$!; PIDS+=($UP_PID)
    wait_port "$URING_PORT"
    wrk_case "uring-$mode" "$UP_PID" "" "$URING_PORT" "$FEDBUS_PATH"
    kill "$UP_PID" 2>/dev/null || true
  done
fi
rate_case nginx-proxy-rate "$(nginx_pids $NGX_PROXY)" "$(nginx_pids $NGX_UP)" "http://127.0.0.1:$PROXY_PORT"
rate_case nginx-alone-rate "$(nginx_pids $NGX_ALONE)" "" "http://127.0.0.1:$ALONE_PORT"
bench_case nats "$NATS_PID" "" --target "nats://127.0.0.1:$NATS_PORT"
# nats-server in the PIPE shape too: the issue's pipelined target is per core against it.
[ -z "$PIPE" ] || BC_CONNS=${PIPE%x*} BC_INFLIGHT=${PIPE#*x} bench_case nats-pipe "$NATS_PID" "" --target "nats://127.0.0.1:$NATS_PORT"
done

LOAD_END=$(uptime | sed 's/.*load average/load average/')
MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
HYP=$(lscpu | sed -n 's/^Hypervisor vendor:[[:space:]]*//p' | head -1)
python3 - "$ROWS" "$OUT" "$CMDS" "$DATE" "$HOST" "$MODEL${HYP:+ (under $HYP)}" "$(uname -r)" "$(nproc)" \
  "$LOAD_START" "$LOAD_END" "$DURATION" "$WARMUP" "$CONNS" "$SIZE" "$IDLE" \
  "$("$NGINX" -v 2>&1 | head -1)" "$("$NATS" --version 2>&1 | head -1)" "$("$WRK" -v 2>&1 | head -1)" "$(rustc -V)" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, os, sys
(rows, out, cmds, date, host, model, kernel, nproc, l0, l1, dur, warm, conns, size, idle,
 nginxv, natsv, wrkv, rustc, commit) = sys.argv[1:]
runs = {}
for line in open(rows):
    d = json.loads(line)
    runs.setdefault(d["name"], []).append(d)
rounds = int(os.environ.get("REPEAT", "1"))
def med(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2
# One row per case: with REPEAT rounds, the server CPU is the median over the rounds that ran,
# and the other columns are the median round's (the lower middle one for an even count).
r, spread = {}, {}
for name, ds in runs.items():
    # A run that served no request has no server CPU per request: a failed round.
    ok = sorted((d for d in ds if d.get("server_us") is not None), key=lambda d: d["server_us"])
    if not ok:
        r[name] = ds[-1]
        continue
    row = dict(ok[(len(ok) - 1) // 2])
    row["server_us"] = med([d["server_us"] for d in ok])
    r[name] = row
    spread[name] = (ok[0]["server_us"], ok[-1]["server_us"], len(ok), len(ds))
def paired(a, b, key="server_us"):
    """key(a) / key(b) of each round in which both ran (server CPU per request, or p99_us)."""
    by = lambda n: {d["round"]: d[key] for d in runs.get(n, []) if d.get("server_us") is not None}
    x, y = by(a), by(b)
    return [x[k] / y[k] for k in sorted(x) if y.get(k)]
def us(k):
    d = r.get(k)
    return d.get("server_us") if d and "failed" not in d else None
proxy, floor = us("nginx-proxy"), us("nginx-alone")
extra = os.environ.get("EXTRA_LABEL", "other build")
labels = [
    ("fedbus-http", "fedbus router, HTTP/1.1 keep-alive", "router (`fedbus run`): shard core 1, control thread core 0", "`fedbus task echo` core 0", "wrk core 0"),
    ("fedbus-ws", "fedbus router, /api/ws", "router: shard core 1, control thread core 0", "`fedbus task echo` core 0", "`fedbus bench` core 0"),
    ("nginx-proxy", "nginx reverse proxy", "proxy nginx (master + 1 worker) core 1", "upstream nginx (`return 200`) core 0", "wrk core 0"),
    ("nginx-alone", "nginx answering alone (floor)", "nginx (master + 1 worker, `return 200`) core 1", "none", "wrk core 0"),
    ("nats", "nats-server request/reply", "`GOMAXPROCS=1` nats-server core 1", "responders in `fedbus bench` core 0", "`fedbus bench` core 0"),
]
pipe = os.environ.get("PIPE", "")
def pipe_rows(tag, suffix):
    return [(f"{tag}-{p}-pipe", f"fedbus router, {n} {pipe} pipelined{suffix}", "router: shard core 1, control thread core 0",
             "`fedbus task echo` core 0", "`fedbus bench` core 0")
            for p, n in (("http", "HTTP/1.1"), ("ws", "/api/ws")) if f"{tag}-{p}-pipe" in r]
labels[2:2] = pipe_rows("fedbus", "")
if "nats-pipe" in r:
    labels.append(("nats-pipe", f"nats-server request/reply, {pipe} pipelined", "`GOMAXPROCS=1` nats-server core 1",
                   "responders in `fedbus bench` core 0", "`fedbus bench` core 0"))
if "extra-http" in r:
    at = 2 + len(pipe_rows("fedbus", ""))
    labels[at:at] = [
        ("extra-http", f"fedbus router, HTTP/1.1 keep-alive ({extra})", "router: shard core 1, control thread core 0", "`fedbus task echo` core 0", "wrk core 0"),
        ("extra-ws", f"fedbus router, /api/ws ({extra})", "router: shard core 1, control thread core 0", "`fedbus task echo` core 0", "`fedbus bench` core 0"),
    ] + pipe_rows("extra", f" ({extra})")
tls_rows = [
    ("fedbus-https", "fedbus router, HTTPS keep-alive (TLS 1.3)", "router: shard core 1 (`listen.api_tls`), control thread core 0", "`fedbus task echo` core 0", "wrk (https) core 0"),
    ("extra-https", f"fedbus router, HTTPS keep-alive (TLS 1.3) ({extra})", "router: shard core 1 (`listen.api_tls`), control thread core 0", "`fedbus task echo` core 0", "wrk (https) core 0"),
    ("nginx-tls-router", "nginx TLS proxy + fedbus router (HTTP)", "TLS nginx (master + 1 worker) + router shard, both core 1; control thread core 0", "`fedbus task echo` core 0", "wrk (https) core 0"),
    ("nginx-tls-proxy", "nginx TLS proxy (in front of nginx)", "TLS nginx (master + 1 worker) core 1", "upstream nginx (`return 200`) core 0", "wrk (https) core 0"),
    ("nginx-tls-alone", "nginx answering alone over TLS (TLS floor)", "TLS nginx (master + 1 worker, `return 200`) core 1", "none", "wrk (https) core 0"),
]
labels += [t for t in tls_rows if t[0] in r]
rate = os.environ.get("RATE", "")
rate_rows = [
    ("fedbus-http-rate", f"fedbus router, HTTP, open loop at {rate} req/s", "router: shard core 1, control thread core 0", "`fedbus task echo` core 0", "`fedbus bench --rate` core 0"),
    ("extra-http-rate", f"fedbus router, HTTP, open loop at {rate} req/s ({extra})", "router: shard core 1, control thread core 0", "`fedbus task echo` core 0", "`fedbus bench --rate` core 0"),
    ("nginx-proxy-rate", f"nginx reverse proxy, open loop at {rate} req/s", "proxy nginx (master + 1 worker) core 1", "upstream nginx (`return 200`) core 0", "`fedbus bench --rate` core 0"),
    ("nginx-alone-rate", f"nginx answering alone, open loop at {rate} req/s", "nginx (master + 1 worker, `return 200`) core 1", "none", "`fedbus bench --rate` core 0"),
]
labels += [t for t in rate_rows if t[0] in r]
uring_rows = [
    ("uring-poll", "io_uring prototype answering alone: poll + recv(2) + send(2) (glommio's shape)", "`uring-proto poll` core 1", "none", "wrk core 0"),
    ("uring-multishot", "io_uring prototype answering alone: multishot recv into provided buffers + send(2)", "`uring-proto multishot` core 1", "none", "wrk core 0"),
    ("uring-multishot-send", "io_uring prototype answering alone: multishot recv + io_uring send", "`uring-proto multishot-send` core 1", "none", "wrk core 0"),
]
labels += [t for t in uring_rows if t[0] in r]
o = [f"# Server CPU per request, 1 in flight per connection: {date} on {host}", ""]
env = f"DURATION={dur} WARMUP={warm} CONNS={conns} SIZE={size}"
if os.environ.get("PGO") == "1" and not os.environ.get("BIN"):
    env = "PGO=1 " + env
if os.environ.get("TLS") == "1":
    env = "TLS=1 " + env
if os.environ.get("RATE"):
    env = f"RATE={os.environ['RATE']} " + env
if os.environ.get("URING_PROTO") == "1":
    env = "URING_PROTO=1 " + env
if os.environ.get("TASK_LINK", "tcp") != "tcp":
    env = f"TASK_LINK={os.environ['TASK_LINK']} " + env
if os.environ.get("EXTRA_BIN"):
    env += f" EXTRA_BIN=<{extra}> EXTRA_LABEL=..."
    if os.environ.get("EXTRA_TASK_LINK", "tcp") != os.environ.get("TASK_LINK", "tcp"):
        env += f" EXTRA_TASK_LINK={os.environ['EXTRA_TASK_LINK']}"
if rounds > 1:
    env = f"REPEAT={rounds} " + env
o += [f"Made by `{env} benches/cpu-per-request.sh` at commit {commit}.", ""]
o += ["## Machine", "", f"- CPU (`lscpu`): {model}, {nproc} cores", f"- kernel: {kernel}",
      f"- load (`uptime`) at start: {l0}", f"- load (`uptime`) at end: {l1}",
      f"- {rustc}; {nginxv}; {natsv}; {wrkv}", ""]
o += ["## Results", "",
      f"{conns} connections, 1 request in flight on each, {size} B POST bodies, {size} B answers "
      + (f"(the pipelined rows: {pipe}, connections x requests in flight, through `fedbus bench`; "
         "their ratios are to the 1-in-flight nginx rows). " if pipe else ". ") +
      "Server CPU = user+sys ticks of the server process(es) from `/proc/PID/stat` over the measured run / requests served. "
      "Busy = server CPU seconds / wall seconds (1.00 = core 1 saturated)."
      + (f" Each case ran in {rounds} rounds (every case once per round, rounds one after the other): "
         "server CPU is the median of the rounds, with their range beside it; the other columns are "
         "the median round's." if rounds > 1 else ""), "",
      "| system | server CPU us/req | " + ("range over the rounds | " if rounds > 1 else "")
      + "vs nginx proxy | vs floor | req/s | p99 us | busy | backend CPU us/req | IPIs to core 1 /req | stolen core 1 / core 0 | errors |",
      "|---|---:|" + ("---:|" if rounds > 1 else "") + "---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
def stolen(k):
    """Percent of the run's wall time stolen by the hypervisor from core 1 / core 0 (the
    largest of the rounds with REPEAT)."""
    st = [d["steal"] for d in runs.get(k, []) if "steal" in d]
    if not st:
        return "n/a"
    return f"{max(x[1] for x in st) * 100:.0f}% / {max(x[0] for x in st) * 100:.0f}%"
for k, label, *_ in labels:
    d = r.get(k)
    if not d or "failed" in d or d.get("server_us") is None:
        o.append(f"| {label} | failed | " + ("| " if rounds > 1 else "") + "| | | | | | | | |")
        continue
    s = d["server_us"]
    rp = f"{s / proxy:.2f}" if proxy else "n/a"
    rf = f"{s / floor:.2f}" if floor else "n/a"
    b = f"{d['backend_us']:.1f}" if d["backend_us"] and k not in ("nginx-alone", "nats", "nats-pipe") else "n/a"
    rng = ""
    if rounds > 1:
        lo, hi, n_ok, n = spread[k]
        rng = f"{lo:.1f}-{hi:.1f}" + (f" ({n - n_ok} of {n} failed)" if n_ok < n else "") + " | "
    o.append(f"| {label} | **{s:.1f}** | {rng}{rp} | {rf} | {d['rps']:.0f} | {d['p99_us']:.0f} | {d['server_busy']:.2f} | {b} | {d['ipis_per_req']:.2f} | {stolen(k)} | {d['errors']} |")
if us("nats-pipe"):
    o += ["", f"### Pipelined ({pipe}) vs nats-server in the same shape (server CPU per request; higher = fedbus does more per core)", ""]
    for tag, name in (("fedbus", "fedbus"), ("extra", extra)):
        for p, proto in (("http", "HTTP/1.1"), ("ws", "/api/ws")):
            f = us(f"{tag}-{p}-pipe")
            if f:
                v = us("nats-pipe") / f
                o.append(f"- {name} {proto}: nats-server us / fedbus us = {us('nats-pipe'):.1f} / {f:.1f} = "
                         f"**{v:.2f}** (target >= 3: {'met' if v >= 3 else 'not met'})")
if rounds > 1:
    o += ["", f"### Ratios paired by round (each round's two rows measured minutes apart at most; median and range over {rounds} rounds)", ""]
    # p99 latency at the same offered load (open loop) first, then server CPU per request.
    pairs = [("fedbus-http-rate", "nginx-proxy-rate", "p99_us", f"p99 of fedbus HTTP / p99 of the nginx reverse proxy, open loop at {rate} req/s (target < 1)"),
             ("extra-http-rate", "nginx-proxy-rate", "p99_us", f"p99 of {extra} HTTP / p99 of the nginx reverse proxy, open loop at {rate} req/s")]
    pairs += [(a, b, "server_us", what) for a, b, what in [("fedbus-http", "nginx-proxy", "fedbus HTTP / nginx reverse proxy, 1 in flight (target <= 0.5)"),
             ("fedbus-ws", "nginx-proxy", "fedbus /api/ws / nginx reverse proxy, 1 in flight"),
             ("fedbus-http", "nginx-alone", "fedbus HTTP / nginx answering alone, 1 in flight"),
             ("nats-pipe", "fedbus-http-pipe", f"nats-server / fedbus HTTP, {pipe} pipelined (target >= 3)"),
             ("nats-pipe", "fedbus-ws-pipe", f"nats-server / fedbus /api/ws, {pipe} pipelined (target >= 3)"),
             ("extra-http", "nginx-proxy", f"{extra} HTTP / nginx reverse proxy, 1 in flight"),
             ("nats-pipe", "extra-http-pipe", f"nats-server / {extra} HTTP, {pipe} pipelined"),
             ("nats-pipe", "extra-ws-pipe", f"nats-server / {extra} /api/ws, {pipe} pipelined"),
             ("fedbus-http", "extra-http", f"fedbus HTTP / {extra} HTTP, 1 in flight"),
             ("fedbus-http-pipe", "extra-http-pipe", f"fedbus HTTP / {extra} HTTP, {pipe} pipelined"),
             ("fedbus-ws-pipe", "extra-ws-pipe", f"fedbus /api/ws / {extra} /api/ws, {pipe} pipelined"),
             ("fedbus-http-rate", "nginx-proxy-rate", f"fedbus HTTP / nginx reverse proxy, open loop at {rate} req/s")]]
    for a, b, key, what in pairs:
        v = paired(a, b, key)
        if v:
            o.append(f"- {what}: **{med(v):.2f}** (range {min(v):.2f}-{max(v):.2f}, {len(v)} rounds: "
                     + ", ".join(f"{x:.2f}" for x in v) + ")")
if us("fedbus-https"):
    o += ["", "### HTTPS ratios (server CPU per request; higher = fedbus does more per core)", ""]
    def ratio_lines(key, name):
        h = us(key)
        if not h:
            return []
        out = []
        if us("fedbus-http"):
            v = us("fedbus-http") / h
            out.append(f"- {name}: fedbus https throughput per core / fedbus http = http us / https us = "
                       f"{us('fedbus-http'):.1f} / {h:.1f} = **{v:.2f}** (target >= 0.7: {'met' if v >= 0.7 else 'not met'})")
        if us("nginx-tls-router"):
            v = us("nginx-tls-router") / h
            out.append(f"- {name}: vs nginx TLS proxy + fedbus router = {us('nginx-tls-router'):.1f} / {h:.1f} = "
                       f"**{v:.2f}** (target >= 1.5: {'met' if v >= 1.5 else 'not met'})")
        if us("nginx-tls-proxy"):
            v = us("nginx-tls-proxy") / h
            out.append(f"- {name}: vs nginx TLS proxy alone (in front of nginx) = {us('nginx-tls-proxy'):.1f} / {h:.1f} = **{v:.2f}**")
        return out
    o += ratio_lines("fedbus-https", "fedbus")
    o += ratio_lines("extra-https", extra)
    if us("nginx-tls-proxy") and floor and us("nginx-tls-alone"):
        o.append(f"- nginx's own TLS cost: TLS proxy - plaintext proxy = {us('nginx-tls-proxy') - proxy:.1f} us, "
                 f"TLS alone - plaintext alone = {us('nginx-tls-alone') - floor:.1f} us per request")
if us("uring-poll"):
    o += ["", "### io_uring receive modes (benches/uring-proto, one hop, answering alone; server CPU per request)", ""]
    base = us("uring-poll")
    o.append(f"- poll + recv(2) + send(2), glommio's shape: {base:.2f} us" + (f" ({base / floor:.2f}x nginx alone)" if floor else ""))
    for k, name in (("uring-multishot", "multishot recv + send(2)"), ("uring-multishot-send", "multishot recv + io_uring send")):
        v = us(k)
        if v:
            o.append(f"- {name}: {v:.2f} us, **{base - v:+.2f} us** per request saved against poll + recv(2) ({(base - v) / base * 100:+.0f}%)")
    if us("fedbus-http"):
        o.append(f"- for scale: fedbus HTTP (router + task hop) {us('fedbus-http'):.2f} us per request in this run")
# Rounds whose p99 is far above their p50: with everything else of the run beside it, for the
# next person who looks into why (p99 is what the table shows, max and the count tell whether
# it could be one stall or must be many).
odd = [d for ds in runs.values() for d in ds
       if d.get("p50_us") and d.get("p99_us") and d["p99_us"] > 20 * d["p50_us"]]
if odd:
    o += ["", "### Rounds with a p99 over 20x their p50", ""]
    for d in sorted(odd, key=lambda d: (d["round"], d["name"])):
        o.append(f"- {d['name']}, round {d['round']}: {d['requests']} requests, p50 {d['p50_us']:.0f} us, "
                 f"p99 {d['p99_us']:.0f} us, max {d.get('max_us') or 0:.0f} us, server CPU {d['server_us']:.1f} us/req, "
                 f"busy {d['server_busy']:.2f}, errors {d['errors']}"
                 # The Little's-law bound: with one request in flight per connection, the mean
                 # latency of the requests counted cannot exceed connections x seconds / requests.
                 # wrk's histogram can break it: before its report wrk adds coordinated-omission
                 # samples (`stats_correct`: for each latency L above twice the expected interval
                 # I = duration / (requests / connections), samples at L - I, L - 2I, ...), so
                 # one stall of all connections becomes a share of its percentiles.
                 + (f"; mean {d['mean_us']:.0f} us" if d.get("mean_us") is not None else "")
                 + (f"; Little's-law bound on the mean {int(conns) * d['seconds'] / d['requests'] * 1e6:.0f} us"
                    if "pipe" not in d["name"] and "rate" not in d["name"] else "")
                 + (f"; the router's own histogram: {r['requests']} requests, mean {r['mean_us']:.0f} us, "
                    f"{r['over_12ms']} over 12.8 ms, slowest bucket <= {r['worst_bucket_us']} us"
                    if (r := d.get("router") or {}).get("requests") else "")
                 + (f"; TCP during the run (whole host): {d['tcp'][0]} segments retransmitted, "
                    f"{d['tcp'][1]} loss probes, {d['tcp'][2]} timeouts" if d.get("tcp") else ""))
o += ["", "Backend CPU: the echo task (fedbus) and the upstream nginx (proxy), counted apart from the server; "
      "nats-server's responders live in the load generator and are not counted. "
      "IPIs to core 1: reschedule + function-call interrupts received by core 1 (`/proc/interrupts` RES + CAL) "
      "over the measured run / requests; in a KVM guest each one costs a VM exit. "
      "Stolen: share of the run's wall time the hypervisor gave core 1 / core 0 to another guest "
      "(`/proc/stat` steal; with REPEAT, the largest of the rounds): a run with much of it is slower "
      "for reasons outside the machine.", ""]
o += ["## Where the server's CPU went, by thread (us/req)", ""]
for k, label, *_ in labels:
    d = r.get(k)
    if d and "threads" in d:
        o.append(f"- {label}: " + ", ".join(f"`{n}` {v:.2f}" for n, v in d["threads"]) +
                 f"; idle CPU before the run: {d['idle_cpu_per_s'] * 1000:.1f} ms/s")
o += ["", "## Core assignment", "", "| system | core 1 | core 0 (backend) | core 0 (load) |", "|---|---|---|---|"]
for k, label, srv, back, load in labels:
    o.append(f"| {label} | {srv} | {back} | {load} |")
o += ["", "## Commands", "", "Each measured command below ran after a warm-up run of the same command "
      f"for {warm} s; `$TOKEN` is a client JWT from `fedbus token client`, post.lua POSTs {size} B to "
      "`/api/local/dev/demo/echo/api/<0..15>/sys/echo` (the same path for nginx, which ignores it).", "", "```",
      "fedbus run --config router.toml       # shard_cores = [1], control_core = 0"]
links = {os.environ.get("TASK_LINK", "tcp")}
if os.environ.get("EXTRA_BIN"):
    links.add(os.environ.get("EXTRA_TASK_LINK", "tcp"))
if "tcp" in links:
    o += ["taskset -c 0 fedbus task echo --router 127.0.0.1:$INTERNAL --app demo/echo"]
if "unix" in links:
    o += ["taskset -c 0 fedbus task echo --router unix:link.sock --app demo/echo   # router.toml: internal_unix = \"link.sock\""]
o += [
      "taskset -c 0 nginx -c nginx-upstream/nginx.conf   # worker_processes 1; return 200 \"<64 x>\"",
      "taskset -c 1 nginx -c nginx-proxy/nginx.conf      # worker_processes 1; proxy_pass to upstream, keepalive 256",
      "taskset -c 1 nginx -c nginx-alone/nginx.conf      # worker_processes 1; return 200 \"<64 x>\"",
      "GOMAXPROCS=1 taskset -c 1 nats-server -a 127.0.0.1 -p $NATS"]
if us("uring-poll"):
    o += ["taskset -c 1 target/uring-proto/release/uring-proto MODE 127.0.0.1:$URING   # MODE: poll, multishot, multishot-send (one at a time)"]
if us("fedbus-https"):
    o += ["fedbus keys cert --keyring keys --name 127.0.0.1 --name localhost --out cert   # ECDSA P-256, dev CA",
          "# router.toml adds: [listen] api_tls = \"127.0.0.1:$API_TLS\" and [[tls.certs]] cert.pem / cert.key",
          "taskset -c 1 nginx -c nginx-tls/nginx.conf        # worker_processes 1; ssl_protocols TLSv1.3; cert.pem; ssl_session_cache;",
          "    # :$TLS_ROUTER proxy_pass to the router's api (keepalive 256), :$TLS_PROXY to the upstream nginx, :$TLS_ALONE return 200"]
o += list(dict.fromkeys(l.rstrip() for l in open(cmds))) + ["```", ""]
open(out, "w").write("\n".join(o))
print(out)
PY
cat "$OUT"
