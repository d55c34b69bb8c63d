#!/usr/bin/env bash
# Shard scaling of one router: requests/s at N shards vs N x requests/s at 1 shard, on one
# machine with enough cores (made for a 16-core host). Core layout per run: control thread on
# core 0, shards on cores 1..N, echo tasks and the load generator split the remaining cores
# (tasks: half, load generator: the other half). Per-core CPU use during the run shows which
# side saturated. Usage: benches/shard-scaling.sh [FEDBUS_BIN] [OUT.md] (SHARDS="1 2 4 8").
set -euo pipefail
BIN=${1:-target/release/fedbus}
OUT=${2:-benches/results/shard-scaling.md}
SHARDS=${SHARDS:-"1 2 4 6 8"}
DURATION=${DURATION:-5s}
PROTO=${PROTO:-ws}
CORES=${CORES:-$(nproc)}
# PIN=0: smoke test on a small host (no pinning of tasks and load; only checks the script).
PIN=${PIN:-1}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; sleep 0.3; kill -9 $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
"$BIN" keys init --keyring "$WORK/keys" --app demo/echo >/dev/null
list() { local a=$1 b=$2; [ "$a" -gt "$b" ] && { echo ""; return; }; seq -s, "$a" "$b"; }
cpu_snap() { awk '/^cpu[0-9]/ {print $1, $2+$3+$4+$6+$7+$8, $5}' /proc/stat; }
{
echo "# Shard scaling, $(date -u +%F)"
echo
echo "- machine: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "- command: \`benches/shard-scaling.sh\` with SHARDS=\"$SHARDS\" DURATION=$DURATION PROTO=$PROTO"
echo "- layout: control core 0; shards on 1..N; echo tasks and load generator split the other cores"
echo
echo "| shards | shard cores | task cores | load cores | connections | rps | p99 us | efficiency | shard core busy % |"
echo "|---:|---|---|---|---:|---:|---:|---:|---:|"
} > "$OUT"
base=0
for N in $SHARDS; do
  rest=$((CORES - 1 - N)); [ "$rest" -lt 2 ] && { echo "| $N | skipped: no cores left for load |||||||" >> "$OUT"; continue; }
  nt=$(( (rest + 1) / 2 )); nl=$((rest - nt))
  shard_cores=$(list 1 "$N"); task_first=$((N + 1)); task_last=$((N + nt)); load_first=$((task_last + 1)); load_last=$((CORES - 1))
  port=$((18800 + N)); iport=$((19000 + N * 20))
  cat > "$WORK/r$N.toml" <<CFG
keyring = "$WORK/keys"
[listen]
api = "127.0.0.1:$port"
internal = "127.0.0.1:$iport"
admin_enabled = false
[tuning]
shard_cores = [$([ "$PIN" = 1 ] && echo "$shard_cores" || echo 1)]
control_core = 0
pin = $([ "$PIN" = 1 ] && echo true || echo false)
CFG
  "$BIN" run --config "$WORK/r$N.toml" > "$WORK/r$N.log" 2>&1 &
  rpid=$!
  for _ in $(seq 1 50); do grep -q "api " "$WORK/r$N.log" && break; sleep 0.1; done
  for c in $(seq "$task_first" "$task_last"); do
    if [ "$PIN" = 1 ]; then pin=(taskset -c "$c"); else pin=(); fi
    "${pin[@]}" "$BIN" task echo --keyring "$WORK/keys" --router "127.0.0.1:$iport" > "$WORK/t$N-$c.log" 2>&1 &
  done
  sleep 2
  conns=$(( nl * 16 ))
  before=$(cpu_snap)
  "$BIN" bench --target "http://127.0.0.1:$port" --protocol "$PROTO" --keyring "$WORK/keys" \
    --cores "$([ "$PIN" = 1 ] && list "$load_first" "$load_last" || echo 0)" --connections "$conns" --inflight 16 \
    --duration "$DURATION" --warmup 1s --json "$WORK/b$N.json" > "$WORK/b$N.log" 2>&1 || { tail -3 "$WORK/b$N.log"; }
  after=$(cpu_snap)
  busy=$(python3 - "$N" <<PY
import sys
n=int(sys.argv[1])
b={l.split()[0]:(int(l.split()[1]),int(l.split()[2])) for l in """$before""".splitlines()}
a={l.split()[0]:(int(l.split()[1]),int(l.split()[2])) for l in """$after""".splitlines()}
v=[]
for c in range(1,n+1):
    k=f"cpu{c}"; db=a[k][0]-b[k][0]; di=a[k][1]-b[k][1]
    v.append(100*db/max(1,db+di))
print(f"{sum(v)/len(v):.0f}")
PY
)
  read -r rps p99 <<<"$(python3 -c "import json;d=json.load(open('$WORK/b$N.json'));print(d['rps'], d['latency_us']['p99'])")"
  [ "$N" = "$(echo $SHARDS | cut -d' ' -f1)" ] && base=$rps
  eff=$(python3 -c "print(f'{$rps/($N*$base):.2f}' if $base else '-')")
  echo "| $N | $shard_cores | $task_first-$task_last | $load_first-$load_last | $conns | $(printf '%.0f' "$rps") | $(printf '%.0f' "$p99") | $eff | $busy |" >> "$OUT"
  kill $(jobs -p) 2>/dev/null || true; sleep 0.5; kill -9 $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true
done
cat "$OUT"
