#!/usr/bin/env bash
# Stops everything examples/federation/start.sh started.
cd "$(dirname "$0")"
[ -f run/pids ] || { echo "nothing to stop"; exit 0; }
while read -r p; do kill "$p" 2>/dev/null || true; done < run/pids
sleep 0.5
while read -r p; do kill -9 "$p" 2>/dev/null || true; done < run/pids
rm -f run/pids
echo "stopped"
