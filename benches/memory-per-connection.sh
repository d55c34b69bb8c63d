#!/bin/bash
# Server memory per idle client connection: the fedbus router (HTTP keep-alive, HTTPS
# keep-alive and /api/ws sessions) vs an nginx reverse proxy vs nginx answering alone (over
# plain HTTP and terminating TLS 1.3) vs nats-server, in one run, same pinning.
#
#   benches/memory-per-connection.sh             # COUNT=4000 ROUNDS=2 SETTLE=5
#   COUNT=4500 OUT=/tmp/m.md benches/memory-per-connection.sh
#   BIN=/path/to/fedbus benches/memory-per-connection.sh   # that binary instead of building
#   PGO=1 benches/memory-per-connection.sh       # this tree built by scripts/build-pgo
#   EXTRA_BIN=/path/to/other/fedbus benches/memory-per-connection.sh   # adds that build's rows
#   ONLY=fedbus-http,nats ROUNDS=6 benches/memory-per-connection.sh      # only those rows
#   TRIM_MS=0 LATER=12 benches/memory-per-connection.sh   # the fedbus routers' memory_trim_ms
#                                 # (0: off); the last column reads RSS LATER s after the close
#
# Run from the repo root (as root: it installs nginx and nats-server with apt when they are
# missing). Writes benches/results/<date>-memory-per-connection-<host>.md (or $OUT).
#
# Method: every server is started once (each fedbus row its own router) and pinned to core 1 (the fedbus echo task and the
# upstream nginx on core 0). For each server, ROUNDS times: the resident set (VmRSS, from
# /proc/PID/status, of the server's processes) is read; benches/hold-connections.py (core 0)
# opens COUNT connections and makes one exchange on each (an HTTP POST of 64 B and its answer;
# an /api/ws upgrade, one request and its answer; a NATS CONNECT + PING and its PONG) and
# holds them all; once every one has answered, the resident set is read again ("held"). SETTLE
# seconds later (the first connections idle and still held) a second client opens COUNT more
# the same way, and the resident set is read once they are all held ("held2"); then both
# clients close theirs, the script waits until the server's port has no established connection
# left, and reads it ("after"), and again LATER seconds after that ("later": what the server
# gave back to the kernel once the connections were gone; fedbus does with
# `tuning.memory_trim_ms`, TRIM_MS here). Per connection = (held - before) / COUNT for the
# first wave, (held2 - held) / COUNT for the second: what one more idle connection costs once
# the server has had time to give back what idle connections need not hold (fedbus does after
# `tuning.idle_buffer_release_ms`, 1 s by default, and the allocator hands that memory to the
# second wave). The second round shows whether what the first one grew is reused (no growth)
# or kept growing. RSS counts pages touched, so a buffer reserved but never written is not counted; an
# allocator that keeps freed memory (glibc's) shows it in "after".
set -euo pipefail
COUNT=${COUNT:-4000}
ROUNDS=${ROUNDS:-2}
SETTLE=${SETTLE:-5}
LATER=${LATER:-12}
# TRIM_MS=N: the fedbus routers' tuning.memory_trim_ms (unset: the router's default, 10000;
# 0: no trim, the resident set stays at its high-water mark as before that setting).
TRIM_MS=${TRIM_MS:-}
[ -z "$TRIM_MS" ] || [[ "$TRIM_MS" =~ ^[0-9]+$ ]] || { echo "TRIM_MS must be a whole number of ms" >&2; exit 1; }
[[ "$LATER" =~ ^[0-9]+$ ]] || { echo "LATER must be a whole number of seconds" >&2; exit 1; }
# Only for this build's routers (an EXTRA_BIN from before the setting would refuse the key).
TRIM_TUNING=${TRIM_MS:+memory_trim_ms = $TRIM_MS}
EXTRA_BIN=${EXTRA_BIN:-}
[[ "$COUNT" =~ ^[1-9][0-9]*$ ]] && [ "$COUNT" -le 4500 ] || {
  echo "COUNT must be a whole number from 1 to 4500 (2 x COUNT are held; the router's default limits.max_connections_per_shard is 10000)" >&2; exit 1; }
[ -z "$EXTRA_BIN" ] || [ -x "$EXTRA_BIN" ] || { echo "EXTRA_BIN $EXTRA_BIN is not executable" >&2; exit 1; }
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (servers on core 1, clients on core 0)" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
ulimit -n $((COUNT * 4 + 1024)) 2>/dev/null || {
  echo "cannot raise the open-file limit to $((COUNT * 4 + 1024)) (ulimit -n); lower COUNT" >&2; exit 1; }

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
dev_keyring mem-bench
# One router per fedbus row, so that one row's freed memory (which the allocator keeps) does
# not serve the next row's connections.
FEDBUS_TUNING=$TRIM_TUNING start_fedbus "$BIN" "-http"
FED_HTTP_ROUTER=$ROUTER FED_HTTP_PORT=$API_PORT
FEDBUS_TUNING=$TRIM_TUNING start_fedbus "$BIN" "-ws"
FED_WS_ROUTER=$ROUTER FED_WS_PORT=$API_PORT
# HTTPS: one ECDSA P-256 certificate from the keyring's dev CA, served by a router of its own
# (`listen.api_tls`) and by nginx terminating TLS (below).
CERT=$WORK/cert
"$BIN" keys cert --keyring "$FEDBUS_HOME/keys" --name 127.0.0.1 --name localhost --out "$CERT" >/dev/null
TLS=1 FEDBUS_TUNING=$TRIM_TUNING start_fedbus "$BIN" "-https"
FED_HTTPS_ROUTER=$ROUTER FED_HTTPS_PORT=$TLS_PORT
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
# nginx terminating TLS 1.3 (one worker, core 1), as a proxy to the upstream and answering
# alone: two nginx, so that one row's freed memory does not serve the other's connections.
TLS_ALONE_PORT=$(free_port); TLS_PROXY_PORT=$(free_port)
TLS_SRV="ssl_protocols TLSv1.3; ssl_certificate $CERT.pem; ssl_certificate_key $CERT.key;"
C_TLS_PROXY=$(nginx_conf tls-proxy 10 "upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; }
  server { listen 127.0.0.1:$TLS_PROXY_PORT ssl backlog=4096; $TLS_SRV location / { proxy_pass http://up; $PROXY_OPTS } }")
C_TLS_ALONE=$(nginx_conf tls-alone 10 "server { listen 127.0.0.1:$TLS_ALONE_PORT ssl backlog=4096; $TLS_SRV location / { $ANSWER } }")
# nginx_conf's worker_connections (4096) is below the 2 x COUNT connections held here.
sed -i "s/worker_connections 4096;/worker_connections $((COUNT * 4 + 512));/" \
  "$C_UP" "$C_PROXY" "$C_ALONE" "$C_TLS_PROXY" "$C_TLS_ALONE"
taskset -c 0 "$NGINX" -c "$C_UP" -e stderr >"$WORK/nginx-up.log" 2>&1 &
PIDS+=($!)
taskset -c 1 "$NGINX" -c "$C_PROXY" -e stderr >"$WORK/nginx-proxy.log" 2>&1 &
NGX_PROXY=$!; PIDS+=($NGX_PROXY)
taskset -c 1 "$NGINX" -c "$C_ALONE" -e stderr >"$WORK/nginx-alone.log" 2>&1 &
NGX_ALONE=$!; PIDS+=($NGX_ALONE)
taskset -c 1 "$NGINX" -c "$C_TLS_PROXY" -e stderr >"$WORK/nginx-tls-proxy.log" 2>&1 &
NGX_TLS_PROXY=$!; PIDS+=($NGX_TLS_PROXY)
taskset -c 1 "$NGINX" -c "$C_TLS_ALONE" -e stderr >"$WORK/nginx-tls-alone.log" 2>&1 &
NGX_TLS_ALONE=$!; PIDS+=($NGX_TLS_ALONE)
NATS_PORT=$(free_port)
GOMAXPROCS=1 taskset -c 1 "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats-server.log" 2>&1 &
NATS_PID=$!; PIDS+=($NATS_PID)
wait_port "$UP_PORT"; wait_port "$PROXY_PORT"; wait_port "$ALONE_PORT"; wait_port "$NATS_PORT"
wait_port "$TLS_ALONE_PORT"; wait_port "$TLS_PROXY_PORT"

# hold_open TAG KIND PORT PATH: starts benches/hold-connections.py (core 0) holding COUNT
# connections, talking to it through two FIFOs; sets HOLD_IN, HOLD_OUT (fds) and HOLD_PID and
# returns once it has held them all.
hold_open() {
  local tag=$1 line
  rm -f "$WORK/$tag.in" "$WORK/$tag.out"; mkfifo "$WORK/$tag.in" "$WORK/$tag.out"
  taskset -c 0 python3 "$ROOT/benches/hold-connections.py" "$2" 127.0.0.1 "$3" "$COUNT" "$4" "$TOKEN" \
    <"$WORK/$tag.in" >"$WORK/$tag.out" &
  HOLD_PID=$!
  exec {HOLD_IN}>"$WORK/$tag.in" {HOLD_OUT}<"$WORK/$tag.out"
  read -r line <&"$HOLD_OUT" || line=""
  [ "$line" = "held $COUNT" ] || { echo "$tag: the client did not hold $COUNT connections (said: $line)" >&2; exit 1; }
}
# hold_close IN OUT PID: has that client close its connections, and waits for it.
hold_close() {
  local line
  echo >&"$1"; read -r line <&"$2" || true; wait "$3" || true
  eval "exec $1>&- $2<&-"
}

# ---- measure NAME KIND PORT PATH PID...: ROUNDS rounds; in each, COUNT connections held, then
# (SETTLE seconds later, the first still held) COUNT more; appends "NAME round before held
# held2 after" (KiB) to $WORK/rows.
measure() {
  local name=$1 kind=$2 port=$3 path=$4 round before held held2 after later a1 a2 a3 b1 b2 b3
  shift 4
  for round in $(seq 1 "$ROUNDS"); do
    echo "== $name, round $round: $COUNT connections, then $COUNT more" >&2
    before=$(rss_kb "$@")
    hold_open "$name-a" "$kind" "$port" "$path"; a1=$HOLD_IN a2=$HOLD_OUT a3=$HOLD_PID
    held=$(rss_kb "$@")
    sleep "$SETTLE"
    hold_open "$name-b" "$kind" "$port" "$path"; b1=$HOLD_IN b2=$HOLD_OUT b3=$HOLD_PID
    held2=$(rss_kb "$@")
    hold_close "$b1" "$b2" "$b3"
    hold_close "$a1" "$a2" "$a3"
    for _ in $(seq 1 300); do [ "$(established "$port")" = 0 ] && break; sleep 0.1; done
    [ "$(established "$port")" = 0 ] || { echo "$name: connections still established 30 s after the client closed them" >&2; exit 1; }
    after=$(rss_kb "$@")
    sleep "$LATER"
    later=$(rss_kb "$@")
    echo "$name $round $before $held $held2 $after $later" >>"$WORK/rows"
  done
}
# ONLY=name,name measures only those rows (fedbus-http, fedbus-ws, fedbus-https, extra-http,
# extra-ws, nginx-proxy, nginx-alone, nginx-tls-proxy, nginx-tls-alone, nats).
want() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
want fedbus-http && measure fedbus-http http "$FED_HTTP_PORT" "$FEDBUS_PATH" "$FED_HTTP_ROUTER"
want fedbus-ws && measure fedbus-ws ws "$FED_WS_PORT" "$FEDBUS_PATH" "$FED_WS_ROUTER"
want fedbus-https && measure fedbus-https https "$FED_HTTPS_PORT" "$FEDBUS_PATH" "$FED_HTTPS_ROUTER"
if [ -n "$EXTRA_BIN" ]; then
  want extra-http && measure extra-http http "$EXTRA_HTTP_PORT" "$FEDBUS_PATH" "$EXTRA_HTTP_ROUTER"
  want extra-ws && measure extra-ws ws "$EXTRA_WS_PORT" "$FEDBUS_PATH" "$EXTRA_WS_ROUTER"
fi
want nginx-proxy && measure nginx-proxy http "$PROXY_PORT" / "$NGX_PROXY"
want nginx-alone && measure nginx-alone http "$ALONE_PORT" / "$NGX_ALONE"
want nginx-tls-proxy && measure nginx-tls-proxy https "$TLS_PROXY_PORT" / "$NGX_TLS_PROXY"
want nginx-tls-alone && measure nginx-tls-alone https "$TLS_ALONE_PORT" / "$NGX_TLS_ALONE"
want nats && measure nats nats "$NATS_PORT" / "$NATS_PID"

# ---- the report
python3 - "$WORK/rows" "$COUNT" "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(uname -r)" \
  "$LOAD_START" "$("$NGINX" -v 2>&1 | head -1)" "$("$NATS" --version 2>&1 | head -1)" \
  "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(python3 --version)" \
  "$( [ -n "$EXTRA_BIN" ] && echo "$EXTRA_BIN" || echo "")" "$SETTLE" "$LATER" "${TRIM_MS:-}" >"$OUT" <<'PY'
import os
import sys
rows_file, count, cpu, kernel, load, nginxv, natsv, commit, pyv, extra, settle, later, trim = sys.argv[1:]
count = int(count)
labels = {
    "fedbus-http": "fedbus router, HTTP/1.1 keep-alive (one POST answered)",
    "fedbus-ws": "fedbus router, `/api/ws` session (one request answered)",
    "fedbus-https": "fedbus router, HTTPS keep-alive (TLS 1.3, one POST answered)",
    "nginx-tls-proxy": "nginx terminating TLS 1.3 as a reverse proxy (one POST proxied)",
    "nginx-tls-alone": "nginx terminating TLS 1.3, answering alone (one POST answered)",
    "extra-http": f"other build ({extra}), HTTP keep-alive",
    "extra-ws": f"other build ({extra}), `/api/ws` session",
    "nginx-proxy": "nginx reverse proxy, HTTP keep-alive (one POST proxied)",
    "nginx-alone": "nginx answering alone, HTTP keep-alive (one POST answered)",
    "nats": "nats-server, client after CONNECT + PING/PONG",
}
rows = [l.split() for l in open(rows_file)]
o = [f"# Server memory per idle client connection ({count} connections held, then {count} more)", "",
     f"- machine: {cpu}, kernel {kernel}, {load} at the start",
     f"- command: `{'PGO=1 ' if os.environ.get('PGO') == '1' and not os.environ.get('BIN') else ''}COUNT={count} SETTLE={settle} LATER={later}{' TRIM_MS=' + trim if trim else ''} benches/memory-per-connection.sh` (commit {commit})",
     f"- fedbus routers: tuning.memory_trim_ms = {trim if trim else 'the default (10000)'}",
     "- pinning: every server on core 1 (`taskset -c 1`; nats-server with `GOMAXPROCS=1`, nginx one worker); "
     "the fedbus echo task, the upstream nginx and the client (`benches/hold-connections.py`, asyncio) on core 0",
     f"- {nginxv}; {natsv}; {pyv}",
     "- RSS = VmRSS of the server's processes (nginx: master + worker); first wave per connection = "
     f"(held - before) / {count}; second wave per connection = (held with both - held) / {count}, the second "
     f"wave opened {settle} s after the first, whose connections idle meanwhile (a fedbus router that trims "
     "may give memory back during that wait, which lowers this figure)",
     "", f"| server | round | RSS before | first wave held | per connection | second wave held too | per connection | RSS after they closed | {later} s later |",
     "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for name, rnd, before, held, held2, after, later_kb in rows:
    b, h, h2, a, l = int(before), int(held), int(held2), int(after), int(later_kb)
    o.append(f"| {labels[name]} | {rnd} | {b / 1024:.1f} MiB | {h / 1024:.1f} MiB | "
             f"{(h - b) / count:.2f} KiB | {h2 / 1024:.1f} MiB | {(h2 - h) / count:.2f} KiB | {a / 1024:.1f} MiB | {l / 1024:.1f} MiB |")
o += ["", f"Highest RSS over the rounds, less the RSS before the first, per connection held ({2 * count}; what the "
      "allocator keeps for that many connections at the high-water mark):", ""]
first, peak = {}, {}
for name, rnd, before, held, held2, after, _ in rows:
    first.setdefault(name, int(before))
    peak[name] = max(peak.get(name, 0), int(held), int(held2))
for name in first:
    o.append(f"- {labels[name]}: {(peak[name] - first[name]) / (2 * count):.1f} KiB")
print("\n".join(o))
PY
cat "$OUT"
echo "wrote $OUT" >&2
