#!/bin/bash
# wrk's p99 against a router started seconds before: the odd rows of cpu-per-request.sh.
#
#   benches/fresh-start-p99.sh                 # RUNS=8 CONNS=64 DURATION=4 WARMUP=1
#   BIN=/path/to/fedbus OUT=/tmp/x.md benches/fresh-start-p99.sh
#
# Every run starts a new router (shard core 1, control thread core 0) and echo task (core 0)
# with start_fedbus (benches/lib.sh), runs wrk for WARMUP seconds (discarded), then for
# DURATION seconds with one request in flight on each of CONNS connections (64 B POSTs, wrk on
# core 0), and stops both (stop_fedbus). That is the shape of the first case of each round of
# cpu-per-request.sh with EXTRA_BIN, where p99s of 12-150 ms showed up now and then
# (docs/ARCHITECTURE.md, "Deferred task work").
#
# Besides wrk's numbers each row shows the bound Little's law puts on the mean latency of a
# closed loop: CONNS x DURATION / requests (each connection has one request in flight, so the
# latencies of its requests add up to at most DURATION). A wrk mean above that bound does not
# describe the requests wrk counted: before it reports, wrk adds coordinated-omission samples
# to its histogram (`stats_correct`: for a latency L above twice the expected interval I =
# DURATION / (requests / CONNS), samples at L - I, L - 2I, ...), so one stall of every
# connection at once becomes a share of its percentiles and its mean. The odd rows are not
# tied to a fresh start after all (one showed in round 5 of a cpu-per-request.sh run that
# started its router once); cpu-per-request.sh now reads the router's own latency histogram
# and the host's TCP retransmissions around each run (docs/ARCHITECTURE.md, "Deferred task
# work").
#
# Writes benches/results/<date>-fresh-start-p99-<host>.md (or $OUT). Run from the repo root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-8}
CONNS=${CONNS:-64}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
TLS=0
CERT=
source benches/lib.sh
work_dir fedbus-fresh-start
need wrk wrk
build_bin
DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || echo host)
OUT=${OUT:-benches/results/$DATE-fresh-start-p99-$HOST.md}

export FEDBUS_HOME=$WORK/fedbus
mkdir -p "$FEDBUS_HOME"
"$BIN" keys init --keyring "$FEDBUS_HOME/keys" --app demo/echo >/dev/null
TOKEN=$("$BIN" token client --app demo/echo --sub fresh-start --ttl 2h --keyring "$FEDBUS_HOME/keys" | tail -1)
post_lua "$WORK/post.lua"
cat >>"$WORK/post.lua" <<'LUA'
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("ROW %d %d %.0f %d %d %d %d\n", summary.requests, summary.duration, latency.mean,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.status + e.timeout))
end
LUA
PATH_FMT="/api/local/dev/demo/echo/api/%d/sys/echo"

{
  echo "# wrk p99 against a freshly started router: $DATE on $HOST"
  echo
  echo "Made by \`RUNS=$RUNS CONNS=$CONNS DURATION=$DURATION WARMUP=$WARMUP benches/fresh-start-p99.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo "- CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; kernel $(uname -r); $("$(command -v wrk)" -v 2>&1 | head -1)"
  echo "- load (\`uptime\`) at start: $(uptime | sed 's/.*load average/load average/')"
  echo "- each run: a new router (\`fedbus run\`, shard core 1, control thread core 0) and echo task (core 0), wrk ${WARMUP}s discarded, then \`taskset -c 0 wrk -t1 -c$CONNS -d${DURATION}s --latency -s post.lua\` (64 B POSTs), then both stopped"
  echo
  echo "| run | requests | wrk mean us | Little's-law bound on the mean, us | p50 us | p99 us | max us | errors |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
} >"$OUT"

for run in $(seq 1 "$RUNS"); do
  echo "== run $run of $RUNS" >&2
  start_fedbus "$BIN" "" tcp
  url=http://127.0.0.1:$API_PORT/
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$WORK/post.lua" "$url" -- "$TOKEN" 64 "$PATH_FMT" >/dev/null 2>&1 || true
  row=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/post.lua" "$url" -- "$TOKEN" 64 "$PATH_FMT" 2>&1 | grep '^ROW' || true)
  stop_fedbus
  if [ -z "$row" ]; then
    echo "| $run | wrk gave no summary | | | | | | |" >>"$OUT"
    continue
  fi
  read -r _ reqs dur mean p50 p99 max errs <<<"$row"
  bound=$(awk -v c="$CONNS" -v d="$dur" -v r="$reqs" 'BEGIN { printf "%.0f", r ? c * d / r : 0 }')
  echo "| $run | $reqs | $mean | $bound | $p50 | $p99 | $max | $errs |" >>"$OUT"
done
echo "$OUT"
