#!/usr/bin/env bash
# Starts a local federation: clusters ru/spb1 (routers 127.0.0.11, 127.0.0.12) and ru/spb2
# (127.0.0.21, 127.0.0.22), each router with api :8800, internal :8900 (tasks), external :8950
# (peer links, mutual TLS with certificates of a federation CA made here), admin :8700; one
# echo task per cluster connected to both of its routers.
# Prints each router's api address and a try-it command. Stop with ./stop.sh.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(cd ../.. && pwd)
BIN=${FEDBUS_BIN:-$ROOT/target/release/fedbus}
if [ ! -x "$BIN" ]; then
  (cd "$ROOT" && cargo build --release -q)
fi
[ -f run/pids ] && ./stop.sh >/dev/null 2>&1 || true
mkdir -p run/spb1 run/spb2 run/certs
for c in spb1 spb2; do
  "$BIN" keys init --keyring run/$c/keys --app demo/echo >/dev/null
done
# The federation CA (kept across runs) and each router's peer certificate for its address.
"$BIN" keys ca --out run/federation-ca >/dev/null
for c in spb1 spb2; do
  for r in 0 1; do
    n=${c#spb}; ip=127.0.0.$n$((r+1))
    "$BIN" keys cert --ca run/federation-ca.pem --ca-key run/federation-ca.key \
      --name $ip --out run/certs/$c-r$r >/dev/null
  done
done
: > run/pids
for c in spb1 spb2; do
  for r in 0 1; do
    "$BIN" run --config $c-r$r.toml >run/$c-r$r.log 2>&1 &
    echo $! >> run/pids
  done
done
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/${1%:*}/${1#*:}) 2>/dev/null && return 0; sleep 0.1; done; echo "router $1 did not start; see examples/federation/run/*.log" >&2; exit 1; }
for a in 127.0.0.11 127.0.0.12 127.0.0.21 127.0.0.22; do wait_port $a:8800; done
"$BIN" task echo --cluster ru/spb1 --keyring run/spb1/keys --router 127.0.0.11:8900 --router 127.0.0.12:8900 >run/task-spb1.log 2>&1 &
echo $! >> run/pids
"$BIN" task echo --cluster ru/spb2 --keyring run/spb2/keys --router 127.0.0.21:8900 --router 127.0.0.22:8900 >run/task-spb2.log 2>&1 &
echo $! >> run/pids
T=$("$BIN" token client --app demo/echo --sub alice --keyring run/spb2/keys)
URL=http://127.0.0.11:8800/api/ru/spb2/demo/echo/api/7/sys/echo
# Up when a request entering spb1 is served by spb2 (task links and TLS peer links ready).
if command -v curl >/dev/null; then
  for _ in $(seq 1 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $T" -d probe "$URL" || true)
    [ "$code" = 200 ] && break
    sleep 0.1
  done
  [ "$code" = 200 ] || { echo "spb1 -> spb2 not served ($code); see examples/federation/run/*.log" >&2; exit 1; }
else
  sleep 1
fi
echo "local federation up:"
for c in spb1 spb2; do
  for r in 0 1; do
    n=${c#spb}; ip=127.0.0.$n$((r+1))
    echo "  ru/$c router r$r  api http://$ip:8800  internal $ip:8900  external $ip:8950 (TLS)"
  done
done
cat <<MSG
try it (enters spb1, served by spb2):
  curl -i -H "Authorization: Bearer $T" -d hello $URL
stop it: examples/federation/stop.sh
MSG
