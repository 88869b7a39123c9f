#!/usr/bin/env bash
# The playground in a real browser: Debian's Chromium (installed from Debian's packages when
# absent) driven by playwright-core from the npm registry (package-lock.json), headless, against
# a fresh embedded gateway. Needs the debug `gateway` binary (cargo build -p gateway). The
# screenshot is kept in target/browser/playground.png.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../../.. && pwd)

if ! command -v chromium >/dev/null; then
  if command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "please install chromium" >&2; exit 1
  fi
fi
command -v npm >/dev/null || { echo "please install nodejs and npm" >&2; exit 1; }
[ -d node_modules/playwright-core ] || npm ci --silent --no-audit --no-fund

work=$(mktemp -d)
admin="browser-admin-token-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
PARLEY_BIND="127.0.0.1:$port" PARLEY_METRICS_BIND="127.0.0.1:$(free_port)" \
  PARLEY_DATABASE_URL="sqlite://$work/browser.db" PARLEY_ADMIN_TOKEN="$admin" PARLEY_LOG=warn \
  "$root/target/debug/gateway" > "$work/gateway.log" 2>&1 &
gateway=$!
trap 'kill $gateway 2>/dev/null || true; rm -rf "$work"' EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.1; done
mkdir -p "$root/target/browser"
node playground.test.mjs "$base" "$admin" "$root/target/browser/playground.png" \
  || { echo "--- gateway log"; cat "$work/gateway.log"; exit 1; }
