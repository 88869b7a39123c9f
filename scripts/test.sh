#!/usr/bin/env bash
# Runs every test. On a fresh Debian machine with only Rust it first starts (installing when
# absent) the PostgreSQL and Redis the tests use, and installs what the black-box tests drive the
# product with: Python 3 with `websockets` (the seed's Python client) and Node.js (the seed's
# JavaScript client; `ws` stands in for the global WebSocket of Node < 20).
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
  if command -v apt-get >/dev/null; then
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else
    echo "please install: $*" >&2; exit 1
  fi
}

. scripts/services.sh

command -v python3 >/dev/null || apt_install python3 python3-pip
if ! python3 -c 'import websockets' 2>/dev/null; then
  python3 -m pip install -q websockets 2>/dev/null \
    || python3 -m pip install -q --break-system-packages websockets 2>/dev/null \
    || apt_install python3-websockets
fi
command -v node >/dev/null || apt_install nodejs npm
if ! node --experimental-websocket -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null \
   && ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  command -v npm >/dev/null || apt_install npm
  npm install --silent --no-audit --no-fund --prefix gateway/tests/clients ws@8 >/dev/null
fi

# The cluster tests start gateway and worker binaries as real processes.
cargo build -p gateway -p worker
cargo test --workspace --all-targets "$@"
# The black-box suite once more with the Postgres store behind the embedded gateway, and once
# with the distributed wiring (Postgres, Redis, a separate worker).
PARLEY_TEST_STORE=postgres cargo test -p gateway --test api "$@"
PARLEY_TEST_MODE=distributed cargo test -p gateway --test api "$@"
# The OpenAPI document against a live gateway, and the playground in a real browser.
scripts/api-conformance.sh
gateway/tests/browser/run.sh
