#!/usr/bin/env bash
# Cross-cluster vs in-cluster requests through the local federation (examples/federation):
# the same load generator, the same entry router (ru/spb1 r0 on 127.0.0.11), once for its own
# cluster and once for ru/spb2 (forwarded over a peer link). Writes
# benches/results/<date>-federation-<host>.md with both runs and their ratio.
# Usage: benches/federation.sh   (DURATION=5s CONNECTIONS=8 INFLIGHT=8)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/fedbus
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-8}
INFLIGHT=${INFLIGHT:-8}
cargo build --release -q
trap 'examples/federation/stop.sh >/dev/null 2>&1 || true' EXIT
FEDBUS_BIN=$BIN examples/federation/start.sh >/dev/null
sleep 2
WORK=$(mktemp -d)
run() { # label cluster keyring
  "$BIN" bench --target http://127.0.0.11:8800 --region ru --cluster "$2" \
    --keyring "examples/federation/run/$3/keys" --connections "$CONNECTIONS" --inflight "$INFLIGHT" \
    --duration "$DURATION" --warmup 1s --label "$1" --json "$WORK/$1.json" >"$WORK/$1.log" 2>&1
}
run in-cluster spb1 spb1
run cross-cluster spb2 spb2
OUT=benches/results/$(date -u +%F)-federation-$(hostname -s).md
python3 - "$WORK" "$OUT" "$DURATION" "$CONNECTIONS" "$INFLIGHT" <<'PY'
import json, sys, os, platform, subprocess
work, out, dur, conns, infl = sys.argv[1:]
r = {k: json.load(open(os.path.join(work, k + ".json"))) for k in ("in-cluster", "cross-cluster")}
i, c = r["in-cluster"], r["cross-cluster"]
with open(out, "w") as f:
    f.write(f"# Cross-cluster vs in-cluster, {subprocess.getoutput('date -u +%F')}\n\n")
    f.write(f"- machine: {os.cpu_count()} cores, kernel {platform.release()}, load average {os.getloadavg()}\n")
    f.write("- setup: `examples/federation/start.sh` (clusters ru/spb1 and ru/spb2, two routers each, one shard each, unpinned, one echo task per cluster); all on one host\n")
    f.write(f"- command: `benches/federation.sh` (DURATION={dur}, {conns} connections x {infl} in flight, 64 B), both runs enter ru/spb1 r0 (127.0.0.11:8800)\n\n")
    f.write("| run | requests/s | p50 us | p99 us | p99.9 us | errors |\n|---|---:|---:|---:|---:|---:|\n")
    for k, d in r.items():
        l = d["latency_us"]
        f.write(f"| {k} | {d['rps']:.0f} | {l['p50']:.0f} | {l['p99']:.0f} | {l['p999']:.0f} | {d['errors']} |\n")
    f.write(f"\nRatio cross/in: requests/s **{c['rps']/i['rps']:.2f}**, p99 **{c['latency_us']['p99']/i['latency_us']['p99']:.2f}**.\n")
    f.write("A cross-cluster request takes two routers and a peer link (four more socket hops); on a 2-core host all six processes share two cores, so the ratio shows the extra work, not network distance.\n")
print(open(out).read())
PY
