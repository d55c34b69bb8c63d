#!/bin/bash
# What a new client connection costs the router when the shard is at
# `limits.max_connections_per_shard` and must close a waiting connection to make room for it,
# against the same connection below the limit, as the number of connections held grows.
#
#   benches/eviction-cost.sh                     # HELD="1000 4000 10000" FLOOD=1000 REPEAT=3
#   BIN=/path/to/fedbus EXTRA_BIN=/path/to/other/fedbus benches/eviction-cost.sh
#   OUT=/tmp/e.md benches/eviction-cost.sh
#
# Run from the repo root. Writes benches/results/<date>-eviction-cost-<host>.md (or $OUT).
#
# Method: for each build, each count H in HELD, each case and each of REPEAT rounds, a fresh
# router (shard on core 1, control thread on core 0) and echo task (core 0) are started by
# benches/lib.sh's start_fedbus, with `limits.max_connections_per_shard` = H ("at the limit")
# or H + FLOOD + 1000 ("below the limit"). benches/hold-connections.py (core 0) opens H
# connections, has one POST answered on each and holds them idle (keep-alive). Then a second
# client (core 0) opens FLOOD more connections one after the other, has one POST answered on
# each and keeps it open. At the limit each of them makes the router close the connection that
# has waited longest (one of the H held: `fedbus_idle_evicted_total` counts them); below it,
# none. Router CPU = the time on CPU of all the router's threads (`/proc/PID/task/*/schedstat`,
# nanoseconds) over the flood, divided by FLOOD. The difference between the two cases is what
# making room costs, the closing of the connection chosen included.
set -euo pipefail
HELD=${HELD:-1000 4000 10000}
FLOOD=${FLOOD:-1000}
REPEAT=${REPEAT:-3}
EXTRA_BIN=${EXTRA_BIN:-}
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (router on core 1, clients on core 0)" >&2; exit 1; }
for h in $HELD; do
  [[ "$h" =~ ^[1-9][0-9]*$ ]] && [ "$h" -ge "$FLOOD" ] || { echo "each HELD count must be at least FLOOD ($FLOOD)" >&2; exit 1; }
done
[ -z "$EXTRA_BIN" ] || [ -x "$EXTRA_BIN" ] || { echo "EXTRA_BIN $EXTRA_BIN is not executable" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
MAX_HELD=$(echo "$HELD" | tr ' ' '\n' | sort -n | tail -1)
# The router holds HELD + FLOOD client connections (each client its share).
ulimit -n $((MAX_HELD + FLOOD + 1024)) 2>/dev/null || {
  echo "cannot raise the open-file limit to $((MAX_HELD + FLOOD + 1024)) (ulimit -n); lower HELD" >&2; exit 1; }

build_bin
DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${OUT:-$ROOT/benches/results/$DATE-eviction-cost-$HOST.md}
work_dir fedbus-evict
LOAD_START=$(uptime | sed 's/.*load average/load average/')
dev_keyring evict-bench

# metric NAME: that counter of the router (summed over its labels), from its /metrics.
metric() { router_metrics | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $2} END {printf "%d\n", s}'; }

# The flood: FLOOD connections, one after the other, each POSTs 64 B, reads its answer
# (200 expected) and stays open; prints "ok", then waits for a line on stdin and resets them all.
cat >"$WORK/flood.py" <<'PY'
import socket, struct, sys
port, token, path, n = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
       f"Content-Length: 64\r\n\r\n").encode() + b"x" * 64
held = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(req)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection {i}: closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        sys.exit(f"connection {i}: status {status}")
    length = next(int(l.split(b":", 1)[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection {i}: closed in its answer")
        body += chunk
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    held.append(s)
print("ok", flush=True)
sys.stdin.readline()
for s in held:
    s.close()
PY

# run_case BIN NAME HELD LIMIT: one round; appends "NAME held limit ns evicted" to rows.
run_case() {
  local bin=$1 name=$2 held=$3 limit=$4 line e0 e1 c0 c1
  FEDBUS_TUNING=$(printf '\n[limits]\nmax_connections_per_shard = %s\n' "$limit") start_fedbus "$bin" "-$name-$held-$limit"
  fifo_client hold python3 "$ROOT/benches/hold-connections.py" http 127.0.0.1 "$API_PORT" "$held" "$FEDBUS_PATH" "$TOKEN"
  local a=$CLIENT_IN b=$CLIENT_OUT hold_pid=$CLIENT_PID
  [ "$CLIENT_LINE" = "held $held" ] || { echo "$name: the client did not hold $held connections (said: $CLIENT_LINE)" >&2; exit 1; }
  # The held connections give their buffers back after tuning.idle_buffer_release_ms (1 s):
  # wait for all of that before measuring, so it falls in neither case's flood.
  local released=0
  for _ in $(seq 1 100); do
    [ "$(metric fedbus_idle_buffers_released_total)" -ge "$held" ] && { released=1; break; }
    sleep 0.1
  done
  [ "$released" = 1 ] || { echo "$name: the held connections did not give their buffers back" >&2; exit 1; }
  e0=$(metric fedbus_idle_evicted_total)
  c0=$(cpu_ns "$ROUTER")
  fifo_client flood python3 "$WORK/flood.py" "$API_PORT" "$TOKEN" "$FEDBUS_PATH" "$FLOOD"
  c1=$(cpu_ns "$ROUTER")
  local fa=$CLIENT_IN fb=$CLIENT_OUT flood_pid=$CLIENT_PID
  [ "$CLIENT_LINE" = ok ] || { echo "$name: the flood failed" >&2; exit 1; }
  e1=$(metric fedbus_idle_evicted_total)
  echo "$name $held $limit $((c1 - c0)) $((e1 - e0))" >>"$WORK/rows"
  echo >&"$fa"; wait "$flood_pid" || true
  echo >&"$a"; read -r line <&"$b" || true; wait "$hold_pid" || true
  eval "exec $a>&- $b<&- $fa>&- $fb<&-"
  stop_fedbus
}

# both_cases HELD BIN BUILD: one round of BIN at the limit and below it.
both_cases() {
  echo "== round $round: $3, $1 held, at the limit and below it" >&2
  run_case "$2" "$3-at" "$1" "$1"
  run_case "$2" "$3-below" "$1" $(($1 + FLOOD + 1000))
}
for round in $(seq 1 "$REPEAT"); do
  for h in $HELD; do each_build both_cases "$h"; done
done

{
  report_head "Router CPU per new connection at the connection limit ($FLOOD new connections)" \
    "HELD=\"$HELD\" FLOOD=$FLOOD REPEAT=$REPEAT BIN=$BIN${EXTRA_BIN:+ EXTRA_BIN=$EXTRA_BIN} benches/eviction-cost.sh"
  python3 - "$WORK/rows" "$FLOOD" "$EXTRA_BIN" <<'PY'
import statistics, sys
rows_file, flood, extra = sys.argv[1:]
flood = int(flood)
rows = [l.split() for l in open(rows_file)]
o = ["- pinning: router shard core 1, its control thread, the echo task and both clients core 0",
     "- CPU = on-CPU time of every router thread (`/proc/PID/task/*/schedstat`) over the flood / new connections; "
     "each new connection connects, POSTs 64 B, gets its 200 and stays open",
     "- at the limit: `limits.max_connections_per_shard` = held, so each new connection closes one held "
     "(evicted = `fedbus_idle_evicted_total` over the flood); below: the limit is held + flood + 1000",
     "", "| build | held | at the limit: us per new connection | below the limit | difference (making room) | evicted |",
     "|---|---:|---:|---:|---:|---:|"]
by = {}
for name, h, limit, ns, ev in rows:
    build, case = name.rsplit("-", 1)
    by.setdefault((build, int(h)), {}).setdefault(case, []).append((int(ns) / flood / 1000, int(ev)))
for (build, h), cases in sorted(by.items()):
    at = [c for c, _ in cases["at"]]
    below = [c for c, _ in cases["below"]]
    ev = [e for _, e in cases["at"]]
    label = "this build" if build == "fedbus" else f"other build ({extra})"
    o.append(f"| {label} | {h} | {statistics.median(at):.1f} ({min(at):.1f}-{max(at):.1f}) | "
             f"{statistics.median(below):.1f} ({min(below):.1f}-{max(below):.1f}) | "
             f"{statistics.median(at) - statistics.median(below):.1f} | {min(ev)}-{max(ev)} |")
o += ["", "Medians over the rounds, their range in brackets."]
print("\n".join(o))
PY
} >"$OUT"
cat "$OUT"
echo "wrote $OUT" >&2
