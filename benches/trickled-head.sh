#!/bin/bash
# What a request head trickled one byte per write costs the router, as its length grows.
# httparse keeps no state between calls, so a router that parsed an incomplete head again from
# its start after each read paid a cost that grew with the head (session 45: 4.97 us per byte at
# 1,000 bytes, 5.65 at 8,000; benches/results/2026-12-07-trickled-head-s45-vm.md). Since
# `api::http::HeadScan` parses again only once a line has ended, the cost per byte stays flat
# (session 46: 5.76 / 5.54 / 5.90 / 5.02 us per byte at 1,000 / 4,000 / 8,000 / 15,000 bytes, the
# build before 6.22 / 6.78 / 6.64 / 7.13 beside it; benches/results/2026-12-08-trickled-head-s46-gated-vm.md).
#
#   benches/trickled-head.sh                     # CONNS=20 SIZES="1000 4000 8000" PACE=40000 REPEAT=3
#   BIN=/path/to/fedbus EXTRA_BIN=/path/to/other/fedbus benches/trickled-head.sh
#   FEDBUS_TUNING=$(printf '\n[limits]\nhandshake_timeout_ms = 30000\n') SIZES=15000 benches/trickled-head.sh
#                                   # heads that take longer than the default 5 s deadline
#
# Run from the repo root. Writes benches/results/<date>-trickled-head-<host>.md (or $OUT).
#
# Method: for each build, size S and round, a fresh router and echo task (benches/lib.sh's
# start_fedbus: shard on core 1, the rest on core 0). A client (core 0, TCP_NODELAY) opens CONNS
# connections and writes, over all of them in turn, a POST head whose one `x-pad` header holds S
# bytes, one byte per write, at most PACE writes a second in all, then the end of the head and
# a 2-byte body, and reads every answer (200 expected). Router CPU = on-CPU time of all its
# threads (`/proc/PID/task/*/schedstat`) from the first byte to the last answer, divided by
# CONNS: per head. Busy = that CPU over the wall time: a router near 1.00 falls behind and reads
# several bytes at once, so its CPU then says how long the client ran, not what a byte costs;
# the client's pace keeps it well below (each read then brings about one byte).
set -euo pipefail
CONNS=${CONNS:-20}
SIZES=${SIZES:-1000 4000 8000}
PACE=${PACE:-40000}
REPEAT=${REPEAT:-3}
EXTRA_BIN=${EXTRA_BIN:-}
ROOT=$(pwd)
[ -f Cargo.toml ] && [ -d benches ] || { echo "run from the fedbus repo root" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (router on core 1, client on core 0)" >&2; exit 1; }
for s in $SIZES; do
  [[ "$s" =~ ^[1-9][0-9]*$ ]] && [ "$s" -le 15000 ] || { echo "each size must be at most 15000 (limits.max_header_bytes is 16 KiB)" >&2; exit 1; }
done
[ -z "$EXTRA_BIN" ] || [ -x "$EXTRA_BIN" ] || { echo "EXTRA_BIN $EXTRA_BIN is not executable" >&2; exit 1; }
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"
build_bin
DATE=$(date +%F)
HOST=$(hostname -s 2>/dev/null || hostname)
OUT=${OUT:-$ROOT/benches/results/$DATE-trickled-head-$HOST.md}
work_dir fedbus-trickle
LOAD_START=$(uptime | sed 's/.*load average/load average/')
dev_keyring trickle-bench

# The client: prints "ready" once connected, waits for a line, trickles, prints "done SECONDS".
cat >"$WORK/trickle.py" <<'PY'
import socket, sys, time
port, token, path, conns, size, pace = (int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                        int(sys.argv[5]), int(sys.argv[6]))
socks = []
for _ in range(conns):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
start = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
         f"Content-Length: 2\r\nx-pad: ").encode()
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
for s in socks:
    s.sendall(start)
for i in range(size):
    for s in socks:
        s.send(b"a")
    # At most `pace` writes a second.
    ahead = t0 + (i + 1) * conns / pace - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
for s in socks:
    s.sendall(b"\r\n\r\nok")
for i, s in enumerate(socks):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"connection {i}: closed before an answer")
        data += chunk
    status = int(data.split(b" ", 2)[1])
    if status != 200:
        sys.exit(f"connection {i}: status {status}")
print(f"done {time.monotonic() - t0:.3f}", flush=True)
PY

# run_case BIN NAME SIZE: one round; appends "NAME size ns seconds" to rows.
run_case() {
  local bin=$1 name=$2 size=$3 line c0 c1
  start_fedbus "$bin" "-$name-$size"
  fifo_client trickle python3 "$WORK/trickle.py" "$API_PORT" "$TOKEN" "$FEDBUS_PATH" "$CONNS" "$size" "$PACE"
  local a=$CLIENT_IN b=$CLIENT_OUT pid=$CLIENT_PID
  [ "$CLIENT_LINE" = ready ] || { echo "$name: the client did not connect" >&2; exit 1; }
  c0=$(cpu_ns "$ROUTER")
  echo >&"$a"
  read -r line <&"$b" || line=""
  c1=$(cpu_ns "$ROUTER")
  [ "${line%% *}" = done ] || { echo "$name: the client failed" >&2; exit 1; }
  echo "$name $size $((c1 - c0)) ${line#done }" >>"$WORK/rows"
  wait "$pid" || true
  eval "exec $a>&- $b<&-"
  stop_fedbus
}

# one_case SIZE BIN BUILD: one round of BIN.
one_case() {
  echo "== round $round: $3, heads of $1 bytes" >&2
  run_case "$2" "$3" "$1"
}
for round in $(seq 1 "$REPEAT"); do
  for size in $SIZES; do each_build one_case "$size"; done
done

{
  report_head "Router CPU per request head trickled one byte per write ($CONNS connections at once)" \
    "CONNS=$CONNS SIZES=\"$SIZES\" PACE=$PACE REPEAT=$REPEAT BIN=$BIN${EXTRA_BIN:+ EXTRA_BIN=$EXTRA_BIN} benches/trickled-head.sh"
  python3 - "$WORK/rows" "$CONNS" "$EXTRA_BIN" <<'PY'
import statistics, sys
rows_file, conns, extra = sys.argv[1:]
conns = int(conns)
rows = [l.split() for l in open(rows_file)]
o = ["- pinning: router shard core 1; its control thread, the echo task and the client core 0",
     "- CPU = on-CPU time of every router thread (`/proc/PID/task/*/schedstat`) from the first byte to the last "
     "answer / connections; each head has one `x-pad` header of the size given, written a byte at a time "
     "over the connections in turn (TCP_NODELAY)",
     "", "| build | x-pad bytes | router CPU per head, ms | per byte, us | busy | client's writes per second |",
     "|---|---:|---:|---:|---:|---:|"]
by = {}
for name, size, ns, secs in rows:
    by.setdefault((name, int(size)), []).append(
        (int(ns) / conns / 1e6, int(size) * conns / float(secs), int(ns) / 1e9 / float(secs)))
for (name, size), v in sorted(by.items()):
    ms = [m for m, _, _ in v]
    pace = statistics.median([p for _, p, _ in v])
    busy = statistics.median([b for _, _, b in v])
    label = "this build" if name == "fedbus" else f"other build ({extra})"
    med = statistics.median(ms)
    o.append(f"| {label} | {size} | {med:.2f} ({min(ms):.2f}-{max(ms):.2f}) | {med * 1000 / size:.2f} | "
             f"{busy:.2f} | {pace:,.0f} |")
o += ["", "Medians over the rounds, their range in brackets."]
print("\n".join(o))
PY
} >"$OUT"
cat "$OUT"
echo "wrote $OUT" >&2
