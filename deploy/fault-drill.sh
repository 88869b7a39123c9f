#!/usr/bin/env bash
# Fault drills on a native distributed topology of its own: a private redis-server on a free
# port (so that killing it harms nothing else), two gateways (:18001, :18002), two workers, and
# the local PostgreSQL (database parley_drill, recreated). `loadgen drill` then drives chats
# through both gateways while it, in turn:
#   gateway  SIGKILLs gateway 1, then starts it again
#   worker   SIGKILLs worker 1, then starts it again
#   pubsub   kills every pub/sub connection (CLIENT KILL TYPE pubsub)
#   redis    SIGKILLs Redis and starts it again empty
# and prints one JSON report per drill (acknowledged, answered, lost, answered twice, answers
# differing from the saved text, duplicate events, RESUME_UNAVAILABLE, reconnects, recovery
# time). Exit 1 when any drill lost, doubled or garbled an answer.
#   deploy/fault-drill.sh [loadgen drill flags, e.g. --chats 50 --messages 6]
# DRILLS="gateway redis" runs only those; RELEASE=0 uses debug builds; KEEP_LOGS=1 keeps the
# processes' logs (their folder is printed). Against a compose deployment, run `loadgen drill` directly with
# `--drill 'gateway|docker compose kill gateway1|docker compose start gateway1'` and so on.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
profile=release; [ "${RELEASE:-1}" = 0 ] && profile=debug
flag=--release; [ "$profile" = debug ] && flag=
cargo build $flag -q -p gateway -p worker -p loadgen
bin=$PWD/target/$profile
dir=$(mktemp -d)
rport=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
db=parley_drill
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
export PARLEY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db
export PARLEY_REDIS_URL=redis://127.0.0.1:$rport PARLEY_LOG=${PARLEY_LOG:-warn}
export PARLEY_ADMIN_TOKEN=fault-drill-admin-token-0123456789 PARLEY_BOOTSTRAP_TENANT=false
# Short bounds, so that a drill recovers within seconds.
export PARLEY_DELIVERY__UNANSWERED_AFTER_SECS=${PARLEY_DELIVERY__UNANSWERED_AFTER_SECS:-3}
export PARLEY_DRAIN_TIMEOUT_SECS=5

# One start script per process, so that a drill's recovery command can start it again.
cat > "$dir/redis.sh" <<EOF
redis-server --port $rport --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile $dir/redis.pid --logfile $dir/redis.log
for _ in \$(seq 50); do redis-cli -p $rport ping >/dev/null 2>&1 && exit 0; sleep 0.1; done
exit 1
EOF
for i in 1 2; do
  cat > "$dir/gateway$i.sh" <<EOF
PARLEY_BIND=127.0.0.1:$((18000 + i)) PARLEY_METRICS_BIND=127.0.0.1:$((19000 + i)) \
  nohup $bin/gateway >> $dir/gateway$i.log 2>&1 &
echo \$! > $dir/gateway$i.pid
for _ in \$(seq 100); do curl -sf 127.0.0.1:$((18000 + i))/readyz >/dev/null && exit 0; sleep 0.1; done
EOF
  cat > "$dir/worker$i.sh" <<EOF
PARLEY_METRICS_BIND=127.0.0.1:$((19100 + i)) nohup $bin/worker >> $dir/worker$i.log 2>&1 &
echo \$! > $dir/worker$i.pid
EOF
done
cleanup() {
  for f in "$dir"/*.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null || true; done
  if [ -n "${KEEP_LOGS:-}" ]; then echo "logs: $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT
sh "$dir/redis.sh"
"$bin/gateway" migrate >/dev/null
for p in gateway1 gateway2 worker1 worker2; do sh "$dir/$p.sh"; done
declare -A drill=(
  [gateway]="gateway|kill -9 \$(cat $dir/gateway1.pid)|sh $dir/gateway1.sh"
  [worker]="worker|kill -9 \$(cat $dir/worker1.pid)|sh $dir/worker1.sh"
  [pubsub]="pubsub|redis-cli -p $rport CLIENT KILL TYPE pubsub >/dev/null"
  [redis]="redis|kill -9 \$(cat $dir/redis.pid)|sh $dir/redis.sh"
)
args=()
for name in ${DRILLS:-gateway worker pubsub redis}; do args+=(--drill "${drill[$name]}"); done
"$bin/loadgen" drill --urls http://127.0.0.1:18001,http://127.0.0.1:18002 "${args[@]}" "$@"
