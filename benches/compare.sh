#!/bin/bash
# Side-by-side benchmark: fedbus (http, ws) vs nats-server vs the one-hop floor (--direct),
# through the same load generator (`fedbus bench`), same settings, same pinning, one run.
#
#   benches/compare.sh                  # DURATION=5s WARMUP=1s by default
#   DURATION=10s WARMUP=2s benches/compare.sh
#   BEFORE_BIN=/path/to/older/fedbus benches/compare.sh   # adds "before" rows for fedbus
#                                                          # http and ws, same run, same pinning
#   SUITE=tls benches/compare.sh        # only the TLS rows (and their plaintext baselines):
#                                       # benches/results/<date>-tls-<host>.md
#   SUITE=before-after BEFORE_BIN=/path/to/older/fedbus REPEAT=5 benches/compare.sh
#                                       # only fedbus http and ws, this build and BEFORE_BIN
#                                       # (its router and echo task; this build's load generator),
#                                       # every shape and size REPEAT times (rounds, the two
#                                       # builds' order swapped each round): paired ratios with
#                                       # median and range, throughput and router CPU per
#                                       # request: benches/results/<date>-before-after-<host>.md
#   SUITE=before-after BENCH_ARGS="--router-spin-us 100" ...
#                                       # extra `fedbus bench` arguments for both builds' runs
#                                       # (before-after suite only)
#
# Run from the repo root. Writes benches/results/<date>-<host>.{md,svg}. Each row is one
# `fedbus bench --json` run; python3 turns the json files into the tables.
#
# TLS rows (64 B bodies; SUITE=all adds them after the others): fedbus HTTPS (`fedbus bench
# --tls`: the spawned router also listens for HTTPS) at 64 connections x 1 in flight and at
# 8 x 8 (pipelined), fedbus wss at 8 x 8, the same shapes in plaintext, and nginx as a
# TLS-terminating reverse proxy in front of a fedbus router's plaintext api listener (and so
# in front of the same echo task), certificate from `fedbus keys cert` (the keyring's dev CA).
# Full handshakes: `--conn-per-request` (a new connection, a full TLS handshake and one
# request each, 16 at a time), for fedbus, nginx, resumed fedbus sessions and plaintext.
# Every TLS row reports the server's CPU (user + system from /proc of the router, plus the
# nginx worker for nginx rows) per request.
#
# Pinning (2+ cores; the load generator's executors are always on core 0, `--cores 0`):
#   fedbus   `fedbus bench` spawns `fedbus run` (router shard on core 1, control thread on
#            core 0; the shard spins 100 us before it parks, as tuning/2-core.toml) and
#            `fedbus task echo` (core 0), load on core 0.
#   nats     `GOMAXPROCS=1 taskset -c 1 nats-server`; requesters and responders (queue group)
#            in `taskset -c 0 fedbus bench --target nats://...`, core 0.
#   direct   no router: the bench plays the router side of the task links on core 0; one
#            `fedbus task echo` per connection on core 1.
#   nginx    `fedbus run` (router shard on core 1, control thread on core 0), `fedbus task
#            echo` on core 0, `taskset -c 1 nginx` (one worker) on core 1 beside the router
#            shard: the server side has the one core fedbus has alone in its own rows.
set -euo pipefail
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
SUITE=${SUITE:-all}
REPEAT=${REPEAT:-5}
# The before-after suite runs both builds' routers without spinning unless BENCH_ARGS says
# otherwise: builds before 56722c9 saw nothing that arrived while they spun (docs/TUNING.md).
if [ "$SUITE" = before-after ]; then BENCH_ARGS=${BENCH_ARGS:---router-spin-us 0}; fi
BENCH_ARGS=${BENCH_ARGS:-}
export BENCH_ARGS
case "$SUITE" in all|tls|before-after) ;; *) echo "SUITE must be all, tls or before-after" >&2; exit 1;; esac
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
BEFORE_BIN=${BEFORE_BIN:-}
[ -z "$BEFORE_BIN" ] || [ -x "$BEFORE_BIN" ] || { echo "BEFORE_BIN $BEFORE_BIN is not executable" >&2; exit 1; }
[ "$SUITE" != before-after ] || [ -n "$BEFORE_BIN" ] || { echo "SUITE=before-after needs BEFORE_BIN" >&2; exit 1; }

echo "== cargo build --release" >&2
cargo build --release -q
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/fedbus
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }

# need CMD PACKAGE: installs the Debian package when the command is missing.
need() {
  command -v "$1" >/dev/null && return 0
  echo "== installing $2 (Debian package)" >&2
  apt-get install -y -qq "$2" >/dev/null || { apt-get update -qq && apt-get install -y -qq "$2" >/dev/null; }
}
if [ "$SUITE" != before-after ]; then
  need nats-server nats-server
  NATS=$(command -v nats-server)
  need nginx nginx
  NGINX=$(command -v nginx)
fi

DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUTDIR=$ROOT/benches/results
mkdir -p "$OUTDIR"
MD=$OUTDIR/$DATE-$HOST.md
[ "$SUITE" = tls ] && MD=$OUTDIR/$DATE-tls-$HOST.md
[ "$SUITE" = before-after ] && MD=$OUTDIR/$DATE-before-after-$HOST.md
SVG=$OUTDIR/$DATE-$HOST.svg
WORK=$(mktemp -d /tmp/fedbus-compare.XXXXXX)
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)
UPTIME_START=$(uptime)

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NATS_PORT=@none@
if [ "$SUITE" != before-after ]; then
  NATS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  GOMAXPROCS=1 taskset -c 1 "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats-server.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null && break; sleep 0.1; done
fi

COMMON="--duration $DURATION --warmup $WARMUP --cores 0"
CMDS=$WORK/commands.txt
: >"$CMDS"

# run NAME CMD... : one bench run; its json goes to $WORK/NAME.json, its log to NAME.log.
run() {
  local name=$1; shift
  echo "$* --json $name.json" | sed "s|${BEFORE_BIN:-@none@}|fedbus-before|; s|$BIN|fedbus|; s|:$NATS_PORT|:\$PORT|; s|:${NGINX_PORT:-@none@}|:\$NGINX_PORT|; s|--cpu-pid [0-9]*|--cpu-pid \$PID|g; s|$WORK/||g; s|$OUTDIR/||g" >>"$CMDS"
  echo "== $name" >&2
  if ! timeout 120 "$@" --json "$WORK/$name.json" >"$WORK/$name.log" 2>&1; then
    echo "   failed: $(tail -1 "$WORK/$name.log")" >&2
  fi
  grep -m1 'core layout' "$WORK/$name.log" >>"$WORK/layouts.txt" 2>/dev/null || true
}

# ---- SUITE=before-after: this build vs BEFORE_BIN only, in rounds ----
if [ "$SUITE" = before-after ]; then
  for r in $(seq 1 "$REPEAT"); do
    echo "== round $r of $REPEAT" >&2
    for size in 64B 4KiB; do
      for load in 1x1 8x8 16x16; do
        c=${load%x*}; i=${load#*x}; n=$((c*i)); f="--connections $c --inflight $i --size $size $COMMON $BENCH_ARGS"
        for proto in http ws; do
          # Odd rounds run the older build first, even rounds this one: drift over a round
          # (a neighbour's load, the host's clock) falls on each side equally often.
          order="before now"; [ $((r % 2)) = 0 ] && order="now before"
          for who in $order; do
            # One load generator (this build's) for both: the older build runs the router
            # and the echo task only (`--fedbus-bin`).
            b=(); [ "$who" = before ] && b=(--fedbus-bin "$BEFORE_BIN")
            run "ba-$who-$proto-$size-$n-r$r" "$BIN" bench ${b[@]+"${b[@]}"} --protocol "$proto" $f --label "$who $proto $size $n round $r"
          done
        done
      done
    done
  done
  MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
  python3 - "$WORK" "$MD" "$DATE" "$HOST" "$DURATION" "$WARMUP" "$REPEAT" "$BEFORE_BIN" "$MODEL" \
    "$(nproc) (load average at start: $LOAD_START, at end: $(cut -d" " -f1-3 /proc/loadavg))" "$(uname -r)" "$(rustc -V)" \
    "$UPTIME_START" "$(uptime)" "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')" <<'PY'
import json, os, statistics, sys
(work, md, date, host, dur, warm, repeat, before, model, nproc, kernel, rustc, up0, up1, rev) = sys.argv[1:]
rounds = range(1, int(repeat) + 1)

def load(n):
    try:
        return json.load(open(os.path.join(work, n + ".json")))
    except Exception:
        return None

def rps(d):
    return d["rps"] if d and d.get("rps") else None

def cpu(d):
    return ((d or {}).get("server_cpu") or {}).get("us_per_request")

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def span(xs):
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}-{max(xs):.2f}" if xs else "n/a"

def f(x, p=2):
    return "n/a" if x is None else f"{x:.{p}f}"

out = [f"# fedbus before / after: {date} on {host}", "",
       f"Made by `SUITE=before-after BEFORE_BIN=<older build> REPEAT={repeat} DURATION={dur} WARMUP={warm}"
       + (f" BENCH_ARGS=\"{os.environ['BENCH_ARGS']}\"" if os.environ.get("BENCH_ARGS") else "")
       + " benches/compare.sh` "
       f"at {rev}. BEFORE_BIN: `{before}`.", "",
       "Each run is one `fedbus bench` of this build that spawns a router (shard on core 1, control thread core 0) "
       "and an echo task (core 0), load generator on core 0; for the older build's runs both children come from "
       "BEFORE_BIN (`--fedbus-bin`), so one load generator drives both builds. "
       "Every shape, size and protocol runs once per round for each build, the order of the two builds swapped "
       "each round. A ratio is paired within its round (now / before), then the median and range over the rounds "
       "are shown. Throughput (rps) depends on the load generator, which shares core 0; router CPU per request "
       "(user + system from `/proc` of the router, over the measured window) does not.", "",
       "## Machine", "", f"- CPU (`lscpu` model name): {model}", f"- cores (`nproc`): {nproc}",
       f"- kernel (`uname -r`): {kernel}", f"- {rustc}", f"- `uptime` at start: `{up0.strip()}`",
       f"- `uptime` at end: `{up1.strip()}`", "",
       "## Now / before, paired by round", "",
       "| protocol | size | in flight | rps now (median) | rps before (median) | rps now / before: median (range) | "
       "router us/req now | before | CPU now / before: median (range) | rps ratio per round |",
       "|---|---|---:|---:|---:|---|---:|---:|---|---|"]
worst = []
for proto in ("http", "ws"):
    for size in ("64B", "4KiB"):
        for n in (1, 64, 256):
            now = [load(f"ba-now-{proto}-{size}-{n}-r{r}") for r in rounds]
            bef = [load(f"ba-before-{proto}-{size}-{n}-r{r}") for r in rounds]
            rr = [rps(a) / rps(b) if rps(a) and rps(b) else None for a, b in zip(now, bef)]
            cr = [cpu(a) / cpu(b) if cpu(a) and cpu(b) else None for a, b in zip(now, bef)]
            out.append(f"| {proto} | {size} | {n} | {f(med(map(rps, now)), 0)} | {f(med(map(rps, bef)), 0)} | "
                       f"**{f(med(rr))}** ({span(rr)}) | {f(med(map(cpu, now)))} | {f(med(map(cpu, bef)))} | "
                       f"**{f(med(cr))}** ({span(cr)}) | {' '.join(f(x) for x in rr)} |")
            worst.append((med(rr), med(cr), f"{proto} {size} {n} in flight"))
out += ["", "## Reading", ""]
slow = [w for w in worst if (w[0] is not None and w[0] < 0.95) or (w[1] is not None and w[1] > 1.05)]
if slow:
    out.append("Rows whose median is more than 5% worse than before (rps ratio below 0.95 or CPU ratio above 1.05): "
               + "; ".join(f"{w[2]} (rps {f(w[0])}, CPU {f(w[1])})" for w in slow) + ".")
else:
    out.append("No row's median is more than 5% worse than before (every rps ratio at least 0.95 and every CPU "
               "ratio at most 1.05).")
out += ["", "## Commands (round 1; every round runs the same)", "", "```"]
out += [l.rstrip() for l in open(os.path.join(work, "commands.txt")) if "round 1 " in l or l.rstrip().endswith("round 1")]
out += ["```", ""]
open(md, "w").write("\n".join(out))
print(md)
PY
  exit 0
fi

# in flight total = connections x inflight per connection
LOADS="1x1 8x8 16x16"
SIZES="64B 4KiB"
[ "$SUITE" = tls ] && SIZES=""
for size in $SIZES; do
  for load in $LOADS; do
    c=${load%x*}; i=${load#*x}; n=$((c*i)); f="--connections $c --inflight $i --size $size $COMMON"
    run "nats-$size-$n" taskset -c 0 "$BIN" bench --target "nats://127.0.0.1:$NATS_PORT" $f --label "nats $size $n"
    run "direct-$size-$n" "$BIN" bench --direct $f --label "direct $size $n"
    run "fedbus-ws-$size-$n" "$BIN" bench --protocol ws $f --label "fedbus-ws $size $n"
    if [ -n "$BEFORE_BIN" ]; then
      run "before-http-$size-$n" "$BEFORE_BIN" bench $f --label "before-http $size $n"
      run "before-ws-$size-$n" "$BEFORE_BIN" bench --protocol ws $f --label "before-ws $size $n"
    fi
    # The SVG: the 64-in-flight 64 B runs; --plot draws this run plus the --plot-add files.
    PLOT=()
    if [ "$size/$n" = 64B/64 ]; then
      PLOT=(--plot "$SVG")
      for p in nats direct fedbus-ws; do
        [ -s "$WORK/$p-$size-$n.json" ] && PLOT+=(--plot-add "$WORK/$p-$size-$n.json")
      done
    fi
    run "fedbus-http-$size-$n" "$BIN" bench $f --label "fedbus-http $size $n" "${PLOT[@]}"
  done
done

# Open loop at half of nats-server's measured 64-in-flight peak (64 B).
RATE=0
if [ "$SUITE" = all ]; then
  PEAK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rps"])' "$WORK/nats-64B-64.json" 2>/dev/null || echo 0)
  RATE=$(python3 -c "print(max(1000, int(float('$PEAK')/2)))")
  f="--connections 8 --rate $RATE --size 64B $COMMON"
  run "open-fedbus-http-64B" "$BIN" bench $f --label "fedbus-http 64B @${RATE}/s"
  run "open-nats-64B" taskset -c 0 "$BIN" bench --target "nats://127.0.0.1:$NATS_PORT" $f --label "nats 64B @${RATE}/s"
fi

# ---- TLS rows ----
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# fedbus itself (spawned by `fedbus bench`, HTTPS with --tls), plaintext beside it.
for shape in 64x1 8x8; do
  c=${shape%x*}; i=${shape#*x}; f="--connections $c --inflight $i --size 64B $COMMON"
  run "tls-http-$shape" "$BIN" bench $f --label "fedbus http $shape"
  run "tls-https-$shape" "$BIN" bench --tls $f --label "fedbus https $shape"
done
f="--connections 8 --inflight 8 --size 64B $COMMON"
run "tls-ws-8x8" "$BIN" bench --protocol ws $f --label "fedbus ws 8x8"
run "tls-wss-8x8" "$BIN" bench --tls --protocol ws $f --label "fedbus wss 8x8"
f="--conn-per-request --connections 16 --size 64B $COMMON"
run "hs-http" "$BIN" bench $f --label "fedbus http, connection per request"
run "hs-https" "$BIN" bench --tls $f --label "fedbus https, full handshake per request"
run "hs-https-resume" "$BIN" bench --tls --resume $f --label "fedbus https, resumed handshake per request"

# nginx terminating TLS in front of a fedbus router (plaintext api) and the same echo task.
HOME_NX=$WORK/nginx-home
KEYS=$HOME_NX/keys
mkdir -p "$HOME_NX" "$WORK/nginx"
API_PORT=$(free_port); INTERNAL_PORT=$(free_port); NGINX_PORT=$(free_port)
FEDBUS_HOME=$HOME_NX "$BIN" keys init --keyring "$KEYS" --app demo/echo >/dev/null 2>&1
FEDBUS_HOME=$HOME_NX "$BIN" keys cert --keyring "$KEYS" --name 127.0.0.1 --name localhost --out "$WORK/nginx-cert" >/dev/null
printf '%s\n' 'region = "local"' 'cluster = "dev"' "keyring = \"$KEYS\"" '' '[listen]' \
  "api = \"127.0.0.1:$API_PORT\"" "internal = \"127.0.0.1:$INTERNAL_PORT\"" 'admin_enabled = false' '' \
  '[tuning]' 'shard_cores = [1]' 'control_core = 0' '' '[[apps]]' 'name = "demo/echo"' 'partitions = 16' \
  >"$WORK/router.toml"
FEDBUS_HOME=$HOME_NX "$BIN" run --config "$WORK/router.toml" >"$WORK/nginx-router.log" 2>&1 &
ROUTER_PID=$!; PIDS+=("$ROUTER_PID")
FEDBUS_HOME=$HOME_NX taskset -c 0 "$BIN" task echo --router "127.0.0.1:$INTERNAL_PORT" --app demo/echo >"$WORK/nginx-task.log" 2>&1 &
PIDS+=($!)
NX=$WORK/nginx
printf '%s\n' '# written by benches/compare.sh' 'user root;' 'worker_processes 1;' 'worker_cpu_affinity 10;' 'daemon off;' \
  "pid $NX/nginx.pid;" "error_log $NX/error.log warn;" 'events { worker_connections 4096; }' 'http {' \
  '  access_log off;' "  client_body_temp_path $NX/body;" "  proxy_temp_path $NX/proxy;" \
  "  upstream fedbus { server 127.0.0.1:$API_PORT; keepalive 128; keepalive_requests 100000000; }" \
  '  server {' "    listen 127.0.0.1:$NGINX_PORT ssl;" "    ssl_certificate $WORK/nginx-cert.pem;" \
  "    ssl_certificate_key $WORK/nginx-cert.key;" '    ssl_protocols TLSv1.2 TLSv1.3;' \
  '    ssl_session_cache shared:SSL:10m;' '    ssl_session_tickets on;' '    keepalive_requests 100000000;' \
  '    location / {' '      proxy_pass http://fedbus;' '      proxy_http_version 1.1;' \
  '      proxy_set_header Connection "";' '    }' '  }' '}' >"$NX/nginx.conf"
[ "$(id -u)" = 0 ] || sed -i '/^user root;/d' "$NX/nginx.conf"
taskset -c 1 "$NGINX" -p "$NX" -c "$NX/nginx.conf" -e "$NX/error.log" >"$NX/out.log" 2>&1 &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
# Ready when the router answers through nginx (the echo task registered): a short bench.
TGT=(--target "https://127.0.0.1:$NGINX_PORT" --keyring "$KEYS")
ready=no
for _ in $(seq 1 40); do
  if timeout 10 "$BIN" bench "${TGT[@]}" --connections 1 --inflight 1 --duration 100ms --warmup 0s --cores 0 >/dev/null 2>&1; then ready=yes; break; fi
  sleep 0.25
done
WORKER=$(pgrep -P "$NGINX_PID" | head -1 || true)
if [ "$ready" = yes ] && [ -n "$WORKER" ]; then
  echo "core layout (nginx rows): router shards on [1], control thread on core 0, echo task on core 0, nginx worker on core 1, load generator on cores [0]" >>"$WORK/layouts.txt"
  CPU=(--cpu-pid "$WORKER" --cpu-pid "$ROUTER_PID")
  for shape in 64x1 8x8; do
    c=${shape%x*}; i=${shape#*x}
    run "tls-nginx-$shape" "$BIN" bench "${TGT[@]}" "${CPU[@]}" --connections "$c" --inflight "$i" --size 64B $COMMON --label "nginx tls proxy $shape"
  done
  run "hs-nginx" "$BIN" bench "${TGT[@]}" "${CPU[@]}" --conn-per-request --connections 16 --size 64B $COMMON --label "nginx tls proxy, full handshake per request"
else
  echo "   nginx rows skipped: no answer through nginx ($(tail -2 "$NX/error.log" 2>/dev/null))" >&2
fi
UPTIME_END=$(uptime)

MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
MEM=$(free -h | awk '/^Mem:/{print $2}')
python3 - "$WORK" "$MD" "$SVG" "$DATE" "$HOST" "$DURATION" "$WARMUP" "$RATE" \
  "$(nproc) (load average at start: $LOAD_START, at end: $(cut -d" " -f1-3 /proc/loadavg))" "$MODEL" "$MEM" "$(uname -r)" "$(rustc -V)" "$("$NATS" --version 2>&1 | head -1)" "$BEFORE_BIN" \
  "$SUITE" "$("$NGINX" -v 2>&1 | head -1)" "$UPTIME_START" "$UPTIME_END" "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD 2>/dev/null || echo ' with uncommitted changes')" <<'PY'
import json, os, sys
(work, md, svg, date, host, dur, warm, rate, nproc, model, mem, kernel, rustc, natsv, before,
 suite, nginxv, up0, up1, rev) = sys.argv[1:]

def load(n):
    try:
        return json.load(open(os.path.join(work, n + ".json")))
    except Exception:
        return None

def ratio(a, b):
    return f"{a['rps'] / b['rps']:.2f}" if a and b and b["rps"] else "n/a"

def cpu(d):
    """(server CPU us per request, requests per server CPU-second) or None."""
    c = (d or {}).get("server_cpu") or {}
    if c.get("us_per_request") is None:
        return None
    return c["us_per_request"], c["requests_per_cpu_second"]

def core_ratio(a, b):
    ca, cb = cpu(a), cpu(b)
    return f"{ca[1] / cb[1]:.2f}" if ca and cb and cb[1] else "n/a"

def layouts():
    lay = os.path.join(work, "layouts.txt")
    if not os.path.exists(lay):
        return []
    seen = []
    for l in open(lay):
        l = l.strip()
        if l and l not in seen:
            seen.append(l)
    return ["Layouts printed by `fedbus bench` (and the script, for nginx):", "", "```"] + seen + ["```", ""]

def commands(with_nats):
    head = ["GOMAXPROCS=1 taskset -c 1 nats-server -a 127.0.0.1 -p $PORT"] if with_nats else []
    return ["## Commands", "", "```"] + head + [l.rstrip() for l in open(os.path.join(work, "commands.txt"))] + ["```", ""]

def machine():
    return ["## Machine", "",
            f"- CPU (`lscpu` model name): {model}", f"- cores (`nproc`): {nproc}", f"- memory: {mem}",
            f"- kernel (`uname -r`): {kernel}", f"- {rustc}", f"- nats-server: {natsv}", f"- nginx: {nginxv}",
            f"- fedbus commit: {rev}",
            f"- `uptime` at start: `{up0.strip()}`", f"- `uptime` at end: `{up1.strip()}`", ""]

def tls_section(level):
    h = "#" * level
    out = [f"{h} TLS (64 B bodies)", "",
           "Keep-alive rows: `fedbus bench --tls` spawns the router with an HTTPS listener (a fresh CA and "
           "certificate, ECDSA P-256); the load generator (rustls + ring, one shared `ClientConfig`) "
           "connects once and keeps the connections. nginx rows: nginx (one worker, core 1, beside the "
           "router shard) terminates TLS and proxies over keep-alive HTTP/1.1 to a fedbus router's "
           "plaintext api listener, so the same echo task answers. Server CPU is user + system time "
           "from `/proc/PID/stat` over the measured window: the router process (shard and control "
           "thread), plus the nginx worker in nginx rows; \"per CPU-second\" is requests divided by it "
           "(throughput per server core).", "",
           "| system | connections x in flight | rps | p50 us | p99 us | server CPU us/request | requests per server CPU-second | errors |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    rows = [("tls-http-64x1", "fedbus http", "64 x 1"), ("tls-https-64x1", "fedbus https", "64 x 1"),
            ("tls-nginx-64x1", "nginx TLS proxy + fedbus http", "64 x 1"),
            ("tls-http-8x8", "fedbus http", "8 x 8"), ("tls-https-8x8", "fedbus https", "8 x 8"),
            ("tls-nginx-8x8", "nginx TLS proxy + fedbus http", "8 x 8"),
            ("tls-ws-8x8", "fedbus ws", "8 x 8"), ("tls-wss-8x8", "fedbus wss", "8 x 8")]
    for key, label, shape in rows:
        d = load(key)
        if d is None:
            out.append(f"| {label} | {shape} | failed | | | | | |")
            continue
        l, c = d["latency_us"], cpu(d)
        cs = (f"{c[0]:.2f} | {c[1]:.0f}") if c else "n/a | n/a"
        out.append(f"| {label} | {shape} | {d['rps']:.0f} | {l['p50']:.0f} | {l['p99']:.0f} | {cs} | {d['errors']} |")
    out.append("")
    g = {k: load(k) for k, _, _ in rows}
    def verdict(r, target):
        try:
            return "met" if float(r) >= target else "**not met**"
        except ValueError:
            return "n/a"
    lines = []
    for shape in ["64x1", "8x8"]:
        a, p, n = g[f"tls-https-{shape}"], g[f"tls-http-{shape}"], g[f"tls-nginx-{shape}"]
        r1, r1c, r2, r2c = ratio(a, p), core_ratio(a, p), ratio(a, n), core_ratio(a, n)
        lines.append(f"- {shape.replace('x', ' x ')}: fedbus https / fedbus http = **{r1}** (rps), **{r1c}** (per server CPU-second), target >= 0.7: {verdict(r1, 0.7)}; "
                     f"fedbus https / nginx TLS proxy = **{r2}** (rps), **{r2c}** (per server CPU-second), target >= 1.5: {verdict(r2, 1.5)}.")
    r3 = ratio(g["tls-wss-8x8"], g["tls-ws-8x8"])
    lines.append(f"- 8 x 8: fedbus wss / fedbus ws = **{r3}** (rps), **{core_ratio(g['tls-wss-8x8'], g['tls-ws-8x8'])}** (per server CPU-second).")
    out += ["Ratios:", ""] + lines + [""]
    out += [f"{h}# Handshakes", "",
            "`--conn-per-request --connections 16`: each request opens a new TCP connection, does a full TLS "
            "handshake (resumption off in the client; the `--resume` row resumes with the router's session "
            "tickets), sends one request, reads the answer and closes. \"per server CPU-second\" is full "
            "handshakes (with their one request) per second of one server core.", "",
            "| system | connections/s | p50 us | p99 us | server CPU us/connection | connections per server CPU-second | TLS handshakes full / resumed | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in [("hs-http", "fedbus http (no TLS)"), ("hs-https", "fedbus https, full handshake"),
                       ("hs-https-resume", "fedbus https, resumed"), ("hs-nginx", "nginx TLS proxy + fedbus http, full handshake")]:
        d = load(key)
        if d is None:
            out.append(f"| {label} | failed | | | | | | |")
            continue
        l, c = d["latency_us"], cpu(d)
        cs = (f"{c[0]:.1f} | {c[1]:.0f}") if c else "n/a | n/a"
        hk = d.get("tls_handshakes")
        hs_kinds = f"{hk['full']} / {hk['resumed']}" if hk else "-"
        out.append(f"| {label} | {d['rps']:.0f} | {l['p50']:.0f} | {l['p99']:.0f} | {cs} | {hs_kinds} | {d['errors']} |")
    out.append("")
    hs, hn = load("hs-https"), load("hs-nginx")
    fmt = lambda d: f"{cpu(d)[1]:.0f}" if cpu(d) else "n/a"
    out += [f"Full handshakes per second per server core (each with its one request): fedbus **{fmt(hs)}**, "
            f"nginx TLS proxy + fedbus **{fmt(hn)}** (ratio {core_ratio(hs, hn)}).", ""]
    return out

if suite == "tls":
    out = [f"# fedbus TLS vs plaintext vs nginx TLS proxy: {date} on {host}", "",
           f"Made by `SUITE=tls DURATION={dur} WARMUP={warm} benches/compare.sh`. Closed loop. Router shard on core 1, "
           "load generator on core 0 (`taskset`/`--cores 0`, as in the other compare runs).", ""]
    out += machine()
    out += ["## Pinning", "",
            "| system | core 0 | core 1 |", "|---|---|---|",
            "| fedbus http / https / ws / wss | load generator, control thread, `fedbus task echo` | router shard |",
            "| nginx TLS proxy | load generator, control thread, `fedbus task echo` | router shard + nginx worker (`taskset -c 1`, `worker_processes 1`) |", ""]
    out += layouts()
    out += commands(False)
    out += tls_section(2)
    open(md, "w").write("\n".join(out))
    print(md)
    sys.exit(0)

systems = [("fedbus-http", "fedbus http"), ("fedbus-ws", "fedbus ws"), ("nats", "nats-server"), ("direct", "direct (floor)")]
if before:
    systems[2:2] = [("before-http", "fedbus http, before"), ("before-ws", "fedbus ws, before")]
loads = [1, 64, 256]
out = [f"# fedbus vs nats-server vs direct: {date} on {host}", ""]
out += ["Made by `benches/compare.sh` (`DURATION=%s WARMUP=%s`). Closed loop unless marked." % (dur, warm), ""]
if before:
    out += ["\"before\" rows: `BEFORE_BIN=%s` (an older build of fedbus: router, echo task and load generator), same pinning, same run." % before, ""]
out += ["## Machine", "",
        f"- cores (`nproc`): {nproc}", f"- CPU: {model}", f"- memory: {mem}",
        f"- kernel: {kernel}", f"- {rustc}", f"- nats-server: {natsv}", f"- nginx: {nginxv}",
        f"- `uptime` at start: `{up0.strip()}`", f"- `uptime` at end: `{up1.strip()}`", ""]
out += ["Note: `direct` with N connections starts N `fedbus task echo` processes on core 1, so above 1 in flight it is not a strict floor (N processes share core 1; the spawned router has one echo task).", ""]
out += ["## Pinning", "",
        "| system | core 0 | core 1 |", "|---|---|---|",
        "| fedbus | load generator, control thread, `fedbus task echo` | router shard |",
        "| nats | load generator + responders (`taskset -c 0`) | `GOMAXPROCS=1 taskset -c 1 nats-server` |",
        "| direct | load generator (router side of the task links) | `fedbus task echo` x connections |",
        "| nginx TLS proxy | load generator, control thread, `fedbus task echo` | router shard + nginx worker |", ""]
out += layouts()
out += commands(True)

def row(name, label, inflight, d):
    if d is None:
        return f"| {label} | {inflight} | failed | | | | |"
    l = d["latency_us"]
    return f"| {label} | {inflight} | {d['rps']:.0f} | {l['p50']:.0f} | {l['p99']:.0f} | {l['p999']:.0f} | {d['errors']} |"

for size in ["64B", "4KiB"]:
    out += [f"## {size} bodies", "", "| system | in flight | rps | p50 us | p99 us | p99.9 us | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    for n in loads:
        for key, label in systems:
            out.append(row(key, label, n, load(f"{key}-{size}-{n}")))
    f, na, di, ws = (load(f"{k}-{size}-64") for k in ["fedbus-http", "nats", "direct", "fedbus-ws"])
    out.append("")
    out += [f"Ratios at 64 in flight ({size}, rps): fedbus http / nats = **{ratio(f, na)}**, "
            f"fedbus ws / nats = **{ratio(ws, na)}**, fedbus http / direct = **{ratio(f, di)}**, "
            f"fedbus ws / direct = **{ratio(ws, di)}**.", ""]
    if before:
        bh, bw = load(f"before-http-{size}-64"), load(f"before-ws-{size}-64")
        out += [f"Now / before at 64 in flight ({size}, rps): http **{ratio(f, bh)}**, ws **{ratio(ws, bw)}**; "
                f"at 1 in flight: http **{ratio(load(f'fedbus-http-{size}-1'), load(f'before-http-{size}-1'))}**, "
                f"ws **{ratio(load(f'fedbus-ws-{size}-1'), load(f'before-ws-{size}-1'))}**.", ""]

out += [f"## Open loop, 64B, 8 connections, {rate} req/s (half of nats-server's 64-in-flight peak)", "",
        "Latency is corrected for coordinated omission (from the scheduled send time); uncorrected p99 beside it.", "",
        "| system | rate | rps | p50 us | p99 us | p99.9 us | uncorrected p99 us | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
for key, label in [("open-fedbus-http-64B", "fedbus http"), ("open-nats-64B", "nats-server")]:
    d = load(key)
    if d is None:
        out.append(f"| {label} | {rate} | failed | | | | | |")
        continue
    l, u = d["latency_us"], d.get("uncorrected_latency_us", {})
    out.append(f"| {label} | {rate} | {d['rps']:.0f} | {l['p50']:.0f} | {l['p99']:.0f} | {l['p999']:.0f} | {u.get('p99', 0):.0f} | {d['errors']} |")
out.append("")
if os.path.exists(svg):
    out += ["## Latency by percentile, 64B, 64 in flight", "", f"![latency]({os.path.basename(svg)})", ""]
out += tls_section(2)
open(md, "w").write("\n".join(out))
print(md)
PY
cat "$MD"
