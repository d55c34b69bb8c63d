#!/usr/bin/env bash
# Runs the JavaScript client's tests: node unit tests, then the headless-Chromium browser test
# against a real router. Needs node (18+), npm, and Debian's chromium (`apt-get install -y
# chromium`). The router binary comes from FEDBUS_BIN (default: target/release/fedbus under the
# repository root). Usage, from anywhere: clients/js/test/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# puppeteer-core only (it downloads no browser). npm ci when node_modules is missing or older
# than the lock file.
if [ ! -f node_modules/puppeteer-core/package.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi

node --test test/unit.test.mjs
node test/browser.mjs
