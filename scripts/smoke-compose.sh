#!/usr/bin/env bash
# The compose topology as native processes on loopback (two gateways, two workers, the local
# Redis and PostgreSQL, via deploy/run-local.sh), with a short load through each gateway: every
# message answered, no error, no protocol violation.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
cargo build -q -p loadgen
db=parley_smoke
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
export PARLEY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db PARLEY_REDIS_PREFIX="smoke$$:"
export PARLEY_ADMIN_TOKEN=smoke-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n') RELEASE=0 PARLEY_LOG=warn
log=$(mktemp)
setsid deploy/run-local.sh 2 2 > "$log" 2>&1 &
topology=$!
trap 'kill -TERM -- -$topology 2>/dev/null || true; wait $topology 2>/dev/null || true; rm -f "$log" "$log".*' EXIT
for _ in $(seq 600); do grep -q "^gateways:" "$log" && break; sleep 0.5; done
grep -q "^gateways:" "$log" || { cat "$log"; echo "the topology did not start" >&2; exit 1; }
loads=()
for port in 8001 8002; do
  ./target/debug/loadgen --url "http://127.0.0.1:$port" --admin-token "$PARLEY_ADMIN_TOKEN" --sockets 40 --chats 20 \
    --messages 5 --reply-tokens 20 --report "$log.$port" >/dev/null &
  loads+=($!)
done
wait "${loads[@]}"
for port in 8001 8002; do
  python3 - "$log.$port" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
# Each of the 40 sockets sees the 5 answers of its chat.
ok = r["errors"] == 0 and r["protocol_violations"] == 0 and r["answers"] == 40 * 5
print(f"smoke {sys.argv[1][-4:]}: {r['answers']} answers, {r['tokens_per_second']:.0f} tokens/s, "
      f"errors {r['errors']}, violations {r['protocol_violations']}")
sys.exit(0 if ok else 1)
PY
done
