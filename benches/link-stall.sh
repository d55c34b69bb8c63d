#!/bin/bash
# Stalls of a task link: how often every request in flight is held at once (the odd p99 rows of
# cpu-per-request.sh; docs/ARCHITECTURE.md, "Deferred task work" and "Lost wake-ups"), and p99
# at the same offered load as an nginx reverse proxy, over many runs. Up to four settings side
# by side: this build with its main rings deferring their task work (the default), the same
# build without (FEDBUS_IO_URING_DEFER=0: COOP_TASKRUN; COOP=0 leaves it out), another build
# (EXTRA_BIN, e.g. the build before a change, default rings), and the nginx proxy of
# cpu-per-request.sh (NGINX_PROXY=0 leaves it out).
#
#   benches/link-stall.sh                 # RUNS=20 BLOCK=5 RATE=20000 CONNS=64 DURATION=5
#   EXTRA_BIN=/tmp/fedbus-old EXTRA_DESC="the build of abc1234" COOP=0 benches/link-stall.sh
#   BIN=/path/to/fedbus OUT=/tmp/x.md benches/link-stall.sh
#
# The settings take turns in blocks of BLOCK runs (the stall rate changes from minute to
# minute, so no setting gets all the quiet minutes). For each block: one router (shard core 1,
# control thread core 0) and one echo task (core 0) started with start_fedbus (benches/lib.sh),
# then BLOCK open-loop runs of `fedbus bench --rate` (core 0, CONNS connections, one request in
# flight on each, 64 B; the load generator is always this build's). Around each run it reads
# the router's own latency histogram (`fedbus_request_duration_seconds`, request parsed to
# answer ready, the task hop included) and the host's TCP retransmission counters. A run is a
# stall when the router saw requests over 12.8 ms: in every stall so far that was exactly one
# request per connection, all held at once. FEDBUS_IO_URING_DEFER is in the environment of all
# three processes of its block (router, echo task, load generator: all run glommio executors).
#
# Writes benches/results/<date>-link-stall-<host>.md (or $OUT). Run from the repo root.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RUNS=${RUNS:-20}
BLOCK=${BLOCK:-5}
COOP=${COOP:-1}
NGINX_PROXY=${NGINX_PROXY:-1}
RATE=${RATE:-20000}
CONNS=${CONNS:-64}
DURATION=${DURATION:-5}
TLS=0
CERT=
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
work_dir fedbus-link-stall
build_bin
DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || echo host)
OUT=${OUT:-$ROOT/benches/results/$DATE-link-stall-$HOST.md}
export FEDBUS_HOME=$WORK/fedbus
mkdir -p "$FEDBUS_HOME"
"$BIN" keys init --keyring "$FEDBUS_HOME/keys" --app demo/echo >/dev/null
TOKEN=$("$BIN" token client --app demo/echo --sub link-stall --ttl 2h --keyring "$FEDBUS_HOME/keys" | tail -1)
FEDBUS_PATH="/api/local/dev/demo/echo/api/%d/sys/echo"
LINES=$WORK/lines.txt; : >"$LINES"

# run LABEL TARGET: one open-loop run against TARGET (a URL); with a router up (ADMIN_PORT set),
# its histogram around the run. Appends a line to LINES.
run() {
  local c0 c1 rl="{}" p
  [ -z "$ADMIN_PORT" ] || router_metrics >"$WORK/m0"
  c0=$(tcp_counters)
  taskset -c 0 "$BIN" bench --target "$2" --rate "$RATE" --keyring "$FEDBUS_HOME/keys" \
    --connections "$CONNS" --inflight 1 --size 64B --cores 0 --duration "${DURATION}s" --warmup 0s \
    --json "$WORK/b.json" >/dev/null 2>&1 || true
  c1=$(tcp_counters)
  if [ -n "$ADMIN_PORT" ]; then router_metrics >"$WORK/m1"; rl=$(router_latency "$WORK/m0" "$WORK/m1"); fi
  p=$(python3 -c 'import json, sys; l = json.load(open(sys.argv[1]))["latency_us"]; print(l["p99"], l["max"])' "$WORK/b.json" 2>/dev/null || echo "- -")
  rm -f "$WORK/b.json"
  echo "$1 $RUN $p $c0 $c1 $rl" | tee -a "$LINES" >&2
}
# block LABEL BINARY: BLOCK runs (numbered from BASE + 1) against a router and echo task of
# BINARY started for them.
block() {
  start_fedbus "$2" "" tcp
  for RUN in $(seq $((BASE + 1)) $((BASE + BLOCK))); do run "$1" "http://127.0.0.1:$API_PORT"; done
  stop_fedbus
  ADMIN_PORT=
}
# The nginx reverse proxy (core 1) in front of an upstream nginx (core 0), up for the whole
# script: its blocks take their turn with the others, at the same offered load.
ADMIN_PORT=
if [ "$NGINX_PROXY" != 0 ]; then
  need nginx nginx
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
  start_nginx_proxy 64
fi
BASE=0
while [ "$BASE" -lt "$RUNS" ]; do
  unset FEDBUS_IO_URING_DEFER
  block default "$BIN"
  if [ "$COOP" != 0 ]; then
    export FEDBUS_IO_URING_DEFER=0
    block coop "$BIN"
    unset FEDBUS_IO_URING_DEFER
  fi
  [ -z "${EXTRA_BIN:-}" ] || block extra "$EXTRA_BIN"
  if [ "$NGINX_PROXY" != 0 ]; then
    for RUN in $(seq $((BASE + 1)) $((BASE + BLOCK))); do run nginx "http://127.0.0.1:$PROXY_PORT"; done
  fi
  BASE=$((BASE + BLOCK))
done

python3 - "$LINES" "$OUT" "$DATE" "$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)" "$(uname -r)" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$RUNS" "$RATE" "$CONNS" "$DURATION" \
  "$BLOCK" "$COOP" "${EXTRA_BIN:-}" "${EXTRA_DESC:-}" <<'PY'
import json, sys
lines, out, date, model, kernel, commit, runs, rate, conns, dur, block, coop, extra, extra_desc = sys.argv[1:]
names = {"default": "this build, default rings (DEFER_TASKRUN)",
         "coop": "this build, FEDBUS_IO_URING_DEFER=0 (COOP_TASKRUN)",
         "extra": f"EXTRA_BIN{' (' + extra_desc + ')' if extra_desc else ''}, default rings",
         "nginx": "nginx reverse proxy (core 1) in front of an upstream nginx (core 0)"}
rows = {}
for l in open(lines):
    label, i, p99, pmax, c0, c1, rl = l.split(" ", 6)
    r = json.loads(rl)
    tcp = [int(b) - int(a) for a, b in zip(c0.split(","), c1.split(","))]
    rows.setdefault(label, []).append((int(i), p99, pmax, tcp, r))
def num(x):
    try:
        return float(x)
    except ValueError:
        return None
def median(v):
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 if v else None
env = f"RUNS={runs} BLOCK={block} RATE={rate} CONNS={conns} DURATION={dur}" + ("" if coop != "0" else " COOP=0") + \
    (f" EXTRA_BIN={extra}" if extra else "") + ("" if "nginx" in rows else " NGINX_PROXY=0")
o = [f"# Task-link stalls and p99 at the same offered load: {date}", "",
     f"Made by `{env} benches/link-stall.sh` at commit {commit}"
     + (f"; EXTRA_BIN is {extra_desc}." if extra_desc else "."),
     "The settings took turns in blocks of BLOCK runs, each fedbus block with its own router and echo task; "
     "every run is an open loop of `fedbus bench --rate` (latency from each request's intended send time).",
     "", f"- CPU (`lscpu`): {model}; kernel {kernel}",
     "- layout: router shard core 1, control thread core 0; echo task and load generator core 0; "
     "nginx proxy core 1, its upstream core 0", "",
     "A stall: a run in which the router's own histogram has requests over 12.8 ms (nginx has no such histogram: n/a).", "",
     "| setting | runs | stalls | requests over 12.8 ms in the stalls | load generator p99 in the stalls (us) | median p99 (us) | largest max (us) |",
     "|---|---:|---:|---|---|---:|---:|"]
for label, rs in rows.items():
    st = [x for x in rs if x[4].get("over_12ms")]
    p99s = [v for v in (num(x[1]) for x in rs) if v is not None]
    maxs = [v for v in (num(x[2]) for x in rs) if v is not None]
    med = median(p99s)
    o.append(f"| {names[label]} | {len(rs)} | "
             + ("n/a | n/a | n/a" if label == "nginx" else
                f"**{len(st)}** | {', '.join(str(x[4]['over_12ms']) for x in st) or '-'} | "
                f"{', '.join(x[1] for x in st) or '-'}")
             + f" | {'-' if med is None else f'{med:.0f}'} | {f'{max(maxs):.0f}' if maxs else '-'} |")
if "nginx" in rows:
    ng = {x[0]: num(x[1]) for x in rows["nginx"]}
    o += ["", "p99 over the nginx proxy's p99, paired by run number (runs of the same block turn, minutes apart at most; target < 1):", ""]
    for label, rs in rows.items():
        if label == "nginx":
            continue
        rat = [num(x[1]) / ng[x[0]] for x in rs if num(x[1]) is not None and ng.get(x[0])]
        if rat:
            o.append(f"- {names[label]}: median **{median(rat):.2f}** (range {min(rat):.2f}-{max(rat):.2f}), "
                     f"below 1 in {sum(r < 1 for r in rat)} of {len(rat)} runs")
o += ["", "## Every run", "",
      "| setting | run | p99 us | max us | router: requests, mean us, over 12.8 ms, slowest bucket us | TCP: retransmitted, loss probes, timeouts |",
      "|---|---:|---:|---:|---|---|"]
for label, rs in rows.items():
    for i, p99, pmax, tcp, r in rs:
        router = (f"{r.get('requests')}, {r.get('mean_us') or 0:.0f}, {r.get('over_12ms')}, {r.get('worst_bucket_us')}"
                  if r else "-")
        o.append(f"| {label} | {i} | {p99} | {pmax} | {router} | {tcp[0]}, {tcp[1]}, {tcp[2]} |")
open(out, "w").write("\n".join(o) + "\n")
print(out)
PY
