#!/bin/bash
# Side-by-side benchmark: fedbus (http, ws) vs nats-server vs the one-hop floor (--direct),
# through the same load generator (`fedbus bench`), same settings, same pinning, one run.
#
#   benches/compare.sh                  # DURATION=5s WARMUP=1s by default
#   DURATION=10s WARMUP=2s benches/compare.sh
#
# Run from the repo root. Writes benches/results/<date>-<host>.{md,svg}. Each row is one
# `fedbus bench --json` run; python3 turns the json files into the tables.
#
# Pinning (2+ cores; the load generator's executors are always on core 0, `--cores 0`):
#   fedbus   `fedbus bench` spawns `fedbus run` (router shard on core 1, control thread on
#            core 0) and `fedbus task echo` (core 0), load on core 0.
#   nats     `GOMAXPROCS=1 taskset -c 1 nats-server`; requesters and responders (queue group)
#            in `taskset -c 0 fedbus bench --target nats://...`, core 0.
#   direct   no router: the bench plays the router side of the task links on core 0; one
#            `fedbus task echo` per connection on core 1.
set -euo pipefail
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-1s}
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d crates/loadgen ] || { echo "run from the fedbus repo root" >&2; exit 1; }

echo "== cargo build --release" >&2
cargo build --release -q
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/fedbus
[ -x "$BIN" ] || { echo "no $BIN" >&2; exit 1; }

if ! command -v nats-server >/dev/null; then
  echo "== installing nats-server (Debian package)" >&2
  apt-get install -y -qq nats-server >/dev/null || { apt-get update -qq && apt-get install -y -qq nats-server >/dev/null; }
fi
NATS=$(command -v nats-server)

DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUTDIR=$ROOT/benches/results
mkdir -p "$OUTDIR"
MD=$OUTDIR/$DATE-$HOST.md
SVG=$OUTDIR/$DATE-$HOST.svg
WORK=$(mktemp -d /tmp/fedbus-compare.XXXXXX)
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg)

PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

NATS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GOMAXPROCS=1 taskset -c 1 "$NATS" -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null && break; sleep 0.1; done

COMMON="--duration $DURATION --warmup $WARMUP --cores 0"
CMDS=$WORK/commands.txt
: >"$CMDS"

# run NAME CMD... : one bench run; its json goes to $WORK/NAME.json, its log to NAME.log.
run() {
  local name=$1; shift
  echo "$* --json $name.json" | sed "s|$BIN|fedbus|; s|$NATS_PORT|\$PORT|; s|$WORK/||g; s|$OUTDIR/||g" >>"$CMDS"
  echo "== $name" >&2
  if ! timeout 120 "$@" --json "$WORK/$name.json" >"$WORK/$name.log" 2>&1; then
    echo "   failed: $(tail -1 "$WORK/$name.log")" >&2
  fi
  grep -m1 'core layout' "$WORK/$name.log" >>"$WORK/layouts.txt" 2>/dev/null || true
}

# in flight total = connections x inflight per connection
LOADS="1x1 8x8 16x16"
for size in 64B 4KiB; do
  for load in $LOADS; do
    c=${load%x*}; i=${load#*x}; n=$((c*i)); f="--connections $c --inflight $i --size $size $COMMON"
    run "nats-$size-$n" taskset -c 0 "$BIN" bench --target "nats://127.0.0.1:$NATS_PORT" $f --label "nats $size $n"
    run "direct-$size-$n" "$BIN" bench --direct $f --label "direct $size $n"
    run "fedbus-ws-$size-$n" "$BIN" bench --protocol ws $f --label "fedbus-ws $size $n"
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
PEAK=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rps"])' "$WORK/nats-64B-64.json" 2>/dev/null || echo 0)
RATE=$(python3 -c "print(max(1000, int(float('$PEAK')/2)))")
f="--connections 8 --rate $RATE --size 64B $COMMON"
run "open-fedbus-http-64B" "$BIN" bench $f --label "fedbus-http 64B @${RATE}/s"
run "open-nats-64B" taskset -c 0 "$BIN" bench --target "nats://127.0.0.1:$NATS_PORT" $f --label "nats 64B @${RATE}/s"

MODEL=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
MEM=$(free -h | awk '/^Mem:/{print $2}')
python3 - "$WORK" "$MD" "$SVG" "$DATE" "$HOST" "$DURATION" "$WARMUP" "$RATE" \
  "$(nproc) (load average at start: $LOAD_START, at end: $(cut -d" " -f1-3 /proc/loadavg))" "$MODEL" "$MEM" "$(uname -r)" "$(rustc -V)" "$("$NATS" --version 2>&1 | head -1)" <<'PY'
import json, os, sys
(work, md, svg, date, host, dur, warm, rate, nproc, model, mem, kernel, rustc, natsv) = sys.argv[1:]

def load(n):
    try:
        return json.load(open(os.path.join(work, n + ".json")))
    except Exception:
        return None

systems = [("fedbus-http", "fedbus http"), ("fedbus-ws", "fedbus ws"), ("nats", "nats-server"), ("direct", "direct (floor)")]
loads = [1, 64, 256]
out = [f"# fedbus vs nats-server vs direct: {date} on {host}", ""]
out += ["Made by `benches/compare.sh` (`DURATION=%s WARMUP=%s`). Closed loop unless marked." % (dur, warm), ""]
out += ["## Machine", "",
        f"- cores (`nproc`): {nproc}", f"- CPU: {model}", f"- memory: {mem}",
        f"- kernel: {kernel}", f"- {rustc}", f"- nats-server: {natsv}", ""]
out += ["Note: `direct` with N connections starts N `fedbus task echo` processes on core 1, so above 1 in flight it is not a strict floor (N processes share core 1; the spawned router has one echo task).", ""]
out += ["## Pinning", "",
        "| system | core 0 | core 1 |", "|---|---|---|",
        "| fedbus | load generator, control thread, `fedbus task echo` | router shard |",
        "| nats | load generator + responders (`taskset -c 0`) | `GOMAXPROCS=1 taskset -c 1 nats-server` |",
        "| direct | load generator (router side of the task links) | `fedbus task echo` x connections |", ""]
lay = os.path.join(work, "layouts.txt")
if os.path.exists(lay):
    seen = []
    for l in open(lay):
        l = l.strip()
        if l and l not in seen:
            seen.append(l)
    out += ["Layouts printed by `fedbus bench`:", "", "```"] + seen + ["```", ""]
out += ["## Commands", "", "```", "GOMAXPROCS=1 taskset -c 1 nats-server -a 127.0.0.1 -p $PORT"]
out += [l.rstrip() for l in open(os.path.join(work, "commands.txt"))] + ["```", ""]

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
    def ratio(a, b):
        return f"{a['rps'] / b['rps']:.2f}" if a and b and b["rps"] else "n/a"
    out += [f"Ratios at 64 in flight ({size}, rps): fedbus http / nats = **{ratio(f, na)}**, "
            f"fedbus ws / nats = **{ratio(ws, na)}**, fedbus http / direct = **{ratio(f, di)}**, "
            f"fedbus ws / direct = **{ratio(ws, di)}**.", ""]

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
open(md, "w").write("\n".join(out))
print(md)
PY
cat "$MD"
