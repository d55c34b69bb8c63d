#!/usr/bin/env bash
# Runs the edge probe of the JavaScript client (test/edges.mjs) in headless Chromium against
# real routers. FEDBUS_BIN picks the router binary (default bin/fedbus, else target/release/fedbus).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f node_modules/puppeteer-core/package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
exec node test/edges.mjs "$@"
