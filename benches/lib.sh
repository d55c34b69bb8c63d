# Shared by the benchmark scripts (sourced, not run): installing tools, ports, and starting
# the servers every benchmark compares in the same way. The caller sets WORK (a scratch
# folder), PIDS (an array the caller's cleanup kills) and, for start_fedbus, FEDBUS_HOME,
# TOKEN, TLS and CERT.

# need CMD PACKAGE: installs PACKAGE (Debian) when CMD is missing.
need() {
  command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] && return 0
  echo "== installing $2 (Debian package)" >&2
  apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2; return 1
}

# start_fedbus BIN TAG [LINK]: a router (shard core 1, control thread core 0) and its echo task
# (core 0) from BIN; sets ROUTER, ECHO, API_PORT, INT_PORT, ADMIN_PORT (its /metrics, served by
# the control thread) (and TLS_PORT, the HTTPS listener, with TLS=1); waits until a request answers 200 (on each listener). LINK `unix` links the echo
# task over the router's unix socket (`listen.internal_unix`) instead of TCP (`tcp`, default).
# FEDBUS_TUNING, when set, is one more line of the router's [tuning] table (e.g. `memory_trim_ms = 0`);
# it comes last in that table, so it may also open a table of its own (`[limits]` and its keys).
start_fedbus() {
  local bin=$1 tag=$2 link=${3:-tcp} ok=0 code tls_listen="" tls_certs="" unix_listen="" dial
  API_PORT=$(free_port); INT_PORT=$(free_port); ADMIN_PORT=$(free_port); TLS_PORT=""
  dial=127.0.0.1:$INT_PORT
  if [ "$link" = unix ]; then
    unix_listen="internal_unix = \"$WORK/link$tag.sock\""
    dial=unix:$WORK/link$tag.sock
  fi
  if [ "$TLS" = 1 ]; then
    TLS_PORT=$(free_port)
    tls_listen="api_tls = \"127.0.0.1:$TLS_PORT\""
    tls_certs=$(printf '[[tls.certs]]\ncert = "%s"\nkey = "%s"' "$CERT.pem" "$CERT.key")
  fi
  cat >"$WORK/router$tag.toml" <<EOF
region = "local"
cluster = "dev"
keyring = "$FEDBUS_HOME/keys"

[listen]
api = "127.0.0.1:$API_PORT"
$tls_listen
internal = "127.0.0.1:$INT_PORT"
$unix_listen
admin = "127.0.0.1:$ADMIN_PORT"

[tuning]
shard_cores = [1]
control_core = 0
${FEDBUS_TUNING:-}

[[apps]]
name = "demo/echo"
partitions = 16

$tls_certs
EOF
  "$bin" run --config "$WORK/router$tag.toml" >"$WORK/router$tag.log" 2>&1 &
  ROUTER=$!; PIDS+=($ROUTER)
  for _ in $(seq 1 100); do grep -q '"shard_cores"' "$WORK/router$tag.log" 2>/dev/null && break; sleep 0.1; done
  taskset -c 0 "$bin" task echo --router "$dial" --app demo/echo >"$WORK/echo$tag.log" 2>&1 &
  ECHO=$!; PIDS+=($ECHO)
  for _ in $(seq 1 100); do
    code=$(python3 - "$API_PORT" "$TOKEN" "$TLS_PORT" <<'PY' 2>/dev/null || true
import http.client, ssl, sys
def status(c):
    c.request("POST", "/api/local/dev/demo/echo/api/0/sys/echo", body=b"ping", headers={"Authorization": "Bearer " + sys.argv[2]})
    return c.getresponse().status
s = status(http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=2))
if sys.argv[3] and s == 200:
    ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    s = status(http.client.HTTPSConnection("127.0.0.1", int(sys.argv[3]), timeout=2, context=ctx))
print(s)
PY
)
    [ "$code" = 200 ] && { ok=1; break; }
    sleep 0.1
  done
  [ $ok = 1 ] || { echo "fedbus router ($bin) never answered 200; log:" >&2; tail -20 "$WORK/router$tag.log" >&2; exit 1; }
}

# dev_keyring SUB: a keyring for demo/echo in FEDBUS_HOME ($WORK/fedbus, exported) made by BIN,
# and TOKEN, a client token for subject SUB (2 h); TLS=0 and FEDBUS_PATH, the echo's path, for
# start_fedbus and the clients.
dev_keyring() {
  export FEDBUS_HOME=$WORK/fedbus
  mkdir -p "$FEDBUS_HOME"
  "$BIN" keys init --keyring "$FEDBUS_HOME/keys" --app demo/echo >/dev/null
  TOKEN=$("$BIN" token client --app demo/echo --sub "$1" --ttl 2h --keyring "$FEDBUS_HOME/keys" | tail -1)
  TLS=0
  FEDBUS_PATH=/api/local/dev/demo/echo/api/0/sys/echo
}

# cpu_ns PID: nanoseconds on CPU of all of PID's threads so far (`/proc/PID/task/*/schedstat`;
# a thread that ended is no longer counted: for a router, whose threads live as long as it).
cpu_ns() {
  [ -d "/proc/$1" ] || { echo "process $1 is gone" >&2; exit 1; }
  cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%d\n", s}'
}

# fifo_client TAG CMD...: starts CMD on core 0 reading the FIFO $WORK/TAG.in and writing
# $WORK/TAG.out; sets CLIENT_IN and CLIENT_OUT (fds: a line to it, a line from it), CLIENT_PID,
# and CLIENT_LINE, the first line it wrote (empty when it wrote none).
fifo_client() {
  local tag=$1
  shift
  rm -f "$WORK/$tag.in" "$WORK/$tag.out"; mkfifo "$WORK/$tag.in" "$WORK/$tag.out"
  taskset -c 0 "$@" <"$WORK/$tag.in" >"$WORK/$tag.out" &
  CLIENT_PID=$!
  exec {CLIENT_IN}>"$WORK/$tag.in" {CLIENT_OUT}<"$WORK/$tag.out"
  read -r CLIENT_LINE <&"$CLIENT_OUT" || CLIENT_LINE=""
}

# each_build CMD...: runs `CMD... BIN fedbus`, then with EXTRA_BIN set `CMD... EXTRA_BIN extra`.
each_build() {
  "$@" "$BIN" fedbus
  [ -z "${EXTRA_BIN:-}" ] || "$@" "$EXTRA_BIN" extra
}

# report_head TITLE COMMAND: the top of a results file: its title, the machine, the load at the
# start (LOAD_START) and the command, with the commit it ran at (and FEDBUS_TUNING when set).
report_head() {
  printf '# %s\n\n- machine: %s, kernel %s, %s at the start\n- command: `%s` (commit %s)\n' "$1" \
    "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(uname -r)" "$LOAD_START" "$2" \
    "$(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
  if [ -n "${FEDBUS_TUNING:-}" ]; then
    printf -- '- with FEDBUS_TUNING (added to the router config): `%s`\n' "$(echo "$FEDBUS_TUNING" | sed '/^$/d' | paste -sd ' ')"
  fi
}

# post_lua FILE: the start of a wrk script that POSTs args[2]-byte bodies with the bearer token
# args[1] to the path format args[3], wsids 0..15 in turn; the caller appends its done().
post_lua() {
  cat >"$1" <<'LUA'
local reqs = {}
local i = 0
function init(args)
  local body = string.rep("x", tonumber(args[2]))
  for w = 0, 15 do
    reqs[w + 1] = wrk.format("POST", string.format(args[3], w),
      { ["Authorization"] = "Bearer " .. args[1], ["Content-Type"] = "application/octet-stream" }, body)
  end
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
LUA
}

# router_metrics: the /metrics text of start_fedbus's router (ADMIN_PORT).
router_metrics() {
  python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:$ADMIN_PORT/metrics"
}

# router_latency BEFORE AFTER: what the router's own latency histogram
# (fedbus_request_duration_seconds: request parsed to answer ready, task hop included) says of
# the requests between two router_metrics scrapes, as JSON: requests, mean_us, over_12ms
# (requests slower than its 12.8 ms bucket), worst_bucket_us (upper bound of the slowest
# bucket that gained a request).
router_latency() {
  python3 - "$1" "$2" <<'PY'
import json, re, sys
def read(p):
    d = {}
    for line in open(p):
        m = re.match(r'fedbus_request_duration_seconds_(bucket\{le="([^"]+)"\}|sum|count) (\S+)', line)
        if m:
            d[m.group(2) or m.group(1)] = float(m.group(3))
    return d
a, b = read(sys.argv[1]), read(sys.argv[2])
n = b.get("count", 0) - a.get("count", 0)
les = sorted((k for k in b if k not in ("sum", "count")), key=lambda k: float("inf") if k == "+Inf" else float(k))
worst, prev = None, 0
for k in les:  # cumulative: a bucket gained requests where its count grew past the one below
    c = b[k] - a.get(k, 0)
    if c > prev:
        worst = k
    prev = c
print(json.dumps({
    "requests": int(n),
    "mean_us": (b.get("sum", 0) - a.get("sum", 0)) / n * 1e6 if n else None,
    "over_12ms": int(n - (b.get("0.0128", 0) - a.get("0.0128", 0))),
    "worst_bucket_us": None if worst is None else (worst if worst == "+Inf" else round(float(worst) * 1e6)),
}))
PY
}

# tcp_counters: the host's TCP retransmission counters since boot, as "retrans,probes,timeouts"
# (/proc/net/snmp Tcp RetransSegs; /proc/net/netstat TcpExt TCPLossProbes, TCPTimeouts): a
# segment lost, or an ACK late past the probe timeout, on loopback shows here.
tcp_counters() {
  python3 - <<'PY'
def table(path, prefix):
    rows = [l.split() for l in open(path) if l.startswith(prefix)]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))
t, x = table("/proc/net/snmp", "Tcp:"), table("/proc/net/netstat", "TcpExt:")
print(f'{t["RetransSegs"]},{x["TCPLossProbes"]},{x["TCPTimeouts"]}')
PY
}

# stop_fedbus: stops the router and echo task of start_fedbus and waits until both are gone
# (10 s, then SIGKILL), so that a router started next does not share core 1 with one still
# draining.
stop_fedbus() {
  # running PID: alive and not a zombie (an exited child not reaped yet still answers kill -0).
  running() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${st#Z}" = "$st" ]; }
  kill "$ROUTER" "$ECHO" 2>/dev/null || true
  local i
  for i in $(seq 100); do
    running "$ROUTER" || running "$ECHO" || break
    sleep 0.1
  done
  kill -9 "$ROUTER" "$ECHO" 2>/dev/null || true
  wait "$ROUTER" "$ECHO" 2>/dev/null || true
}

# nginx_conf NAME CORE_MASK HTTP_BODY: a config for one nginx worker pinned by CORE_MASK,
# whose http block holds HTTP_BODY (upstreams and servers); prints its path.
nginx_conf() {
  local d=$WORK/nginx-$1
  mkdir -p "$d/logs" "$d/tmp"
  cat >"$d/nginx.conf" <<EOF
user root;
worker_processes 1;
worker_cpu_affinity $2;
daemon off;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy;
  fastcgi_temp_path $d/tmp/fcgi; uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  $3
}
EOF
  [ "$(id -u)" = 0 ] || sed -i '/^user root;/d' "$d/nginx.conf"
  echo "$d/nginx.conf"
}

# start_nginx_proxy SIZE: the nginx every fedbus benchmark compares with: a reverse proxy
# (master + 1 worker, core 1; keep-alive to its upstream, no buffering) in front of an upstream
# nginx (core 0) that answers every request with SIZE bytes. Needs NGINX (its path). Sets
# UP_PORT, PROXY_PORT, NGX_UP, NGX_PROXY (their master PIDs, added to PIDS), and for further
# servers configured alike ANSWER (the upstream's location body), PROXY_OPTS (the proxy's) and
# UPSTREAM_UP (the upstream block `up`); waits until both listen.
start_nginx_proxy() {
  local body c_up c_proxy
  body=$(head -c "$1" /dev/zero | tr '\0' x)
  UP_PORT=$(free_port); PROXY_PORT=$(free_port)
  ANSWER="client_body_buffer_size 64k; default_type application/octet-stream; return 200 \"$body\";"
  PROXY_OPTS="proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_buffering off; client_body_buffer_size 64k;"
  UPSTREAM_UP="upstream up { server 127.0.0.1:$UP_PORT; keepalive 256; keepalive_requests 100000000; }"
  c_up=$(nginx_conf upstream 01 "server { listen 127.0.0.1:$UP_PORT backlog=4096; location / { $ANSWER } }")
  c_proxy=$(nginx_conf proxy 10 "$UPSTREAM_UP server { listen 127.0.0.1:$PROXY_PORT backlog=4096; location / { proxy_pass http://up; $PROXY_OPTS } }")
  taskset -c 0 "$NGINX" -c "$c_up" -e stderr >"$WORK/nginx-up.log" 2>&1 &
  NGX_UP=$!; PIDS+=("$NGX_UP")
  taskset -c 1 "$NGINX" -c "$c_proxy" -e stderr >"$WORK/nginx-proxy.log" 2>&1 &
  NGX_PROXY=$!; PIDS+=("$NGX_PROXY")
  wait_port "$UP_PORT"; wait_port "$PROXY_PORT"
}

# build_bin: BIN as given, or this tree's release build (built now); with PGO=1 (and no BIN)
# the profile-guided build of scripts/build-pgo (built now, several minutes), the build to ship.
# Used by cpu-per-request.sh and memory-per-connection.sh; compare.sh, federation.sh and
# shard-scaling.sh build the release profile (or take BIN / BEFORE_BIN) and ignore PGO.
build_bin() {
  if [ -z "${BIN:-}" ] && [ "${PGO:-0}" = 1 ]; then
    echo "== scripts/build-pgo" >&2
    BIN=$("$ROOT/scripts/build-pgo" | tail -n 1)
  elif [ -z "${BIN:-}" ]; then
    echo "== cargo build --release" >&2
    cargo build --release -q
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/fedbus
  fi
  [ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }
}

# work_dir PREFIX: a scratch folder WORK (/tmp/PREFIX.XXXXXX) and an empty PIDS; on exit the
# processes in PIDS are killed and WORK is removed (KEEP=1 keeps it).
work_dir() {
  WORK=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap cleanup EXIT
  trap 'exit 130' INT TERM
}
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
