#!/bin/bash
# Server memory per idle client connection: the fedbus router (HTTP keep-alive and /api/ws
# sessions) vs an nginx reverse proxy vs nginx answering alone vs nats-server, in one run, same
# pinning.
#
#   benches/memory-per-connection.sh             # COUNT=5000 ROUNDS=2
#   COUNT=8000 OUT=/tmp/m.md benches/memory-per-connection.sh
#   BIN=/path/to/fedbus benches/memory-per-connection.sh   # that binary instead of building
#   EXTRA_BIN=/path/to/other/fedbus benches/memory-per-connection.sh   # adds that build's rows
#   ONLY=fedbus-http,nats ROUNDS=6 benches/memory-per-connection.sh      # only those rows
#
# Run from the repo root (as root: it installs nginx and nats-server with apt when they are
# missing). Writes benches/results/<date>-memory-per-connection-<host>.md (or $OUT).
#
# Method: every server is started once (each fedbus row its own router) and pinned to core 1 (the fedbus echo task and the
# upstream nginx on core 0). For each server, ROUNDS times: the resident set (VmRSS, from
# /proc/PID/status, of the server's processes) is read; benches/hold-connections.py (core 0)
# opens COUNT connections and makes one exchange on each (an HTTP POST of 64 B and its answer;
# an /api/ws upgrade, one request and its answer; a NATS CONNECT + PING and its PONG) and
# holds them all; once every one has answered, the resident set is read again ("held"); then
# the client closes them all, the script waits until the server's port has no established
# connection left, and reads it a third time ("after"). Per connection = (held - before) /
# COUNT. The second round shows whether what the first one grew is reused (no growth) or kept
# growing. RSS counts pages touched, so a buffer reserved but never written is not counted; an
# allocator that keeps freed memory (glibc's) shows it in "after".
set -euo pipefail
COUNT=${COUNT:-5000}
ROUNDS=${ROUNDS:-2}
EXTRA_BIN=${EXTRA_BIN:-}
[[ "$COUNT" =~ ^[1-9][0-9]*$ ]] && [ "$COUNT" -le 9000 ] || {
  echo "COUNT must be a whole number from 1 to 9000 (the router's default limits.max_connections_per_shard is 10000)" >&2; exit 1; }
[ -z "$EXTRA_BIN" ] || [ -x "$EXTRA_BIN" ] || { echo "EXTRA_BIN $EXTRA_BIN is not executable" >&2; exit 1; }
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (servers on core 1, clients on core 0)" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
ulimit -n $((COUNT * 2 + 1024)) 2>/dev/null || {
  echo "cannot raise the open-file limit to $((COUNT * 2 + 1024)) (ulimit -n); lower COUNT" >&2; exit 1; }

build_bin
need nginx nginx
need nats-server nats-server
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
NATS=$(command -v nats-server || echo /usr/sbin/nats-server)

DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${OUT:-$ROOT/benches/results/$DATE-memory-per-connection-$HOST.md}
work_dir fedbus-mem
LOAD_START=$(uptime | sed 's/.*load average/load average/')

# rss_kb PID...: the summed resident set of these processes and their children (nginx's
# workers), in KiB.
rss_kb() {
  local p all=() t=0
  for p in "$@"; do all+=("$p"); while read -r c; do all+=("$c"); done < <(pgrep -P "$p" || true); done
  for p in "${all[@]}"; do t=$((t + $(awk '$1=="VmRSS:" {print $2}' "/proc/$p/status"))); done
  echo "$t"
}
# established PORT: connections the server on PORT still has established.
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

# ---- the servers
export FEDBUS_HOME=$WORK/fedbus
mkdir -p "$FEDBUS_HOME"
"$BIN" keys init --keyring "$FEDBUS_HOME/keys" --app demo/echo >/dev/null
TOKEN=$("$BIN" token client --app demo/echo --sub mem-bench --ttl 2h --keyring "$FEDBUS_HOME/keys" | tail -1)
TLS=0
FEDBUS_PATH=/api/local/dev/demo/echo/api/0/sys/echo
# One router per fedbus row, so that one row's freed memory (which the allocator keeps) does
# not serve the next row's connections.
start_fedbus "$BIN" "-http"
FED_HTTP_ROUTER=$ROUTER FED_HTTP_PORT=$API_PORT
start_fedbus "$BIN" "-ws"
FED_WS_ROUTER=$ROUTER FED_WS_PORT=$API_PORT
if [ -n "$EXTRA_BIN" ]; then
  start_fedbus "$EXTRA_BIN" "-extra-http"
  EXTRA_HTTP_ROUTER=$ROUTER EXTRA_HTTP_PORT=$API_PORT
  start_fedbus "$EXTRA_BIN" "-extra-ws"
  EXTRA_WS_ROUTER=$ROUTER EXTRA_WS_PORT=$API_PORT
fi

BODY=$(head -c 64 /dev/zero | tr '\0' x)
ANSWER="client_body_buffer_size 64k; default_type application/octet-stream; return 200 \"$BODY\";"
PROXY_OPTS="proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; client_body_buffer_size 64k;"
UP_PORT=$(free_port); PROXY_PORT=$(free_port); ALONE_PORT=$(free_port)
C_UP=$(nginx_conf upstream 01 "server { listen 127.0.0.1:$UP_PORT backlog=4096; location / { $ANSWER } }")
C_PROXY=$(nginx_conf proxy 10 "upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; } server { listen 127.0.0.1:$PROXY_PORT backlog=4096; location / { proxy_pass http://up; $PROXY_OPTS } }")
C_ALONE=$(nginx_conf alone 10 "server { listen 127.0.0.1:$ALONE_PORT backlog=4096; location / { $ANSWER } }")
# nginx_conf's worker_connections (4096) is below COUNT here.
sed -i "s/worker_connections 4096;/worker_connections $((COUNT * 2 + 512));/" \
  "$C_UP" "$C_PROXY" "$C_ALONE"
taskset -c 0 "$NGINX" -c "$C_UP" -e stderr >"$WORK/nginx-up.log" 2>&1 &
PIDS+=($!)
taskset -c 1 "$NGINX" -c "$C_PROXY" -e stderr >"$WORK/nginx-proxy.log" 2>&1 &
NGX_PROXY=$!; PIDS+=($NGX_PROXY)
taskset -c 1 "$NGINX" -c "$C_ALONE" -e stderr >"$WORK/nginx-alone.log" 2>&1 &
NGX_ALONE=$!; PIDS+=($NGX_ALONE)
NATS_PORT=$(free_port)
GOMAXPROCS=1 taskset -c 1 "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats-server.log" 2>&1 &
NATS_PID=$!; PIDS+=($NATS_PID)
wait_port "$UP_PORT"; wait_port "$PROXY_PORT"; wait_port "$ALONE_PORT"; wait_port "$NATS_PORT"

# ---- measure NAME KIND PORT PATH PID...: ROUNDS rounds of COUNT connections held; appends
# "NAME round before held after" (KiB) to $WORK/rows.
measure() {
  local name=$1 kind=$2 port=$3 path=$4 round before held after line
  shift 4
  for round in $(seq 1 "$ROUNDS"); do
    echo "== $name, round $round: $COUNT connections" >&2
    before=$(rss_kb "$@")
    coproc HOLD { taskset -c 0 python3 "$ROOT/benches/hold-connections.py" "$kind" 127.0.0.1 "$port" "$COUNT" "$path" "$TOKEN"; }
    read -r line <&"${HOLD[0]}" || line=""
    [ "$line" = "held $COUNT" ] || { echo "$name: the client did not hold $COUNT connections (said: $line)" >&2; exit 1; }
    held=$(rss_kb "$@")
    echo >&"${HOLD[1]}"
    read -r line <&"${HOLD[0]}" || line=""
    wait "$HOLD_PID" || true
    for _ in $(seq 1 300); do [ "$(established "$port")" = 0 ] && break; sleep 0.1; done
    [ "$(established "$port")" = 0 ] || { echo "$name: connections still established 30 s after the client closed them" >&2; exit 1; }
    after=$(rss_kb "$@")
    echo "$name $round $before $held $after" >>"$WORK/rows"
  done
}
# ONLY=name,name measures only those rows (fedbus-http, fedbus-ws, extra-http, extra-ws,
# nginx-proxy, nginx-alone, nats).
want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
want fedbus-http && measure fedbus-http http "$FED_HTTP_PORT" "$FEDBUS_PATH" "$FED_HTTP_ROUTER"
want fedbus-ws && measure fedbus-ws ws "$FED_WS_PORT" "$FEDBUS_PATH" "$FED_WS_ROUTER"
if [ -n "$EXTRA_BIN" ]; then
  want extra-http && measure extra-http http "$EXTRA_HTTP_PORT" "$FEDBUS_PATH" "$EXTRA_HTTP_ROUTER"
  want extra-ws && measure extra-ws ws "$EXTRA_WS_PORT" "$FEDBUS_PATH" "$EXTRA_WS_ROUTER"
fi
want nginx-proxy && measure nginx-proxy http "$PROXY_PORT" / "$NGX_PROXY"
want nginx-alone && measure nginx-alone http "$ALONE_PORT" / "$NGX_ALONE"
want nats && measure nats nats "$NATS_PORT" / "$NATS_PID"

# ---- the report
python3 - "$WORK/rows" "$COUNT" "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(uname -r)" \
  "$LOAD_START" "$("$NGINX" -v 2>&1 | head -1)" "$("$NATS" --version 2>&1 | head -1)" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(python3 --version)" \
  "$( [ -n "$EXTRA_BIN" ] && echo "$EXTRA_BIN" || echo "")" >"$OUT" <<'PY'
import sys
rows_file, count, cpu, kernel, load, nginxv, natsv, commit, pyv, extra = sys.argv[1:]
count = int(count)
labels = {
    "fedbus-http": "fedbus router, HTTP/1.1 keep-alive (one POST answered)",
    "fedbus-ws": "fedbus router, `/api/ws` session (one request answered)",
    "extra-http": f"other build ({extra}), HTTP keep-alive",
    "extra-ws": f"other build ({extra}), `/api/ws` session",
    "nginx-proxy": "nginx reverse proxy, HTTP keep-alive (one POST proxied)",
    "nginx-alone": "nginx answering alone, HTTP keep-alive (one POST answered)",
    "nats": "nats-server, client after CONNECT + PING/PONG",
}
rows = [l.split() for l in open(rows_file)]
o = [f"# Server memory per idle client connection ({count} connections held)", "",
     f"- machine: {cpu}, kernel {kernel}, {load} at the start",
     f"- command: `COUNT={count} benches/memory-per-connection.sh` (commit {commit})",
     "- pinning: every server on core 1 (`taskset -c 1`; nats-server with `GOMAXPROCS=1`, nginx one worker); "
     "the fedbus echo task, the upstream nginx and the client (`benches/hold-connections.py`, asyncio) on core 0",
     f"- {nginxv}; {natsv}; {pyv}",
     "- RSS = VmRSS of the server's processes (nginx: master + worker); per connection = (held - before) / connections",
     "", "| server | round | RSS before | RSS with the connections held | per connection | RSS after they closed |",
     "|---|---:|---:|---:|---:|---:|"]
for name, rnd, before, held, after in rows:
    b, h, a = int(before), int(held), int(after)
    o.append(f"| {labels[name]} | {rnd} | {b / 1024:.1f} MiB | {h / 1024:.1f} MiB | "
             f"{(h - b) * 1024 / count / 1024:.2f} KiB | {a / 1024:.1f} MiB |")
o += ["", "Highest RSS over the rounds, less the RSS before the first, per connection held (what the "
      "allocator keeps for that many connections at the high-water mark):", ""]
first, peak = {}, {}
for name, rnd, before, held, after in rows:
    first.setdefault(name, int(before))
    peak[name] = max(peak.get(name, 0), int(held))
for name in first:
    o.append(f"- {labels[name]}: {(peak[name] - first[name]) / count:.1f} KiB")
print("\n".join(o))
PY
cat "$OUT"
echo "wrote $OUT" >&2
