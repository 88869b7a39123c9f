#!/usr/bin/env bash
# Runs the distributed topology as native processes on loopback: G gateways and W workers
# sharing the local Redis (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database `parley`).
#   deploy/run-local.sh [G] [W]      # gateways on :8001, :8002, …; Ctrl-C stops everything
# Environment: PARLEY_ADMIN_TOKEN (default: a random one, printed), PARLEY_LOG, PARLEY_REDIS_PREFIX, and
# RELEASE=0 for debug builds.
set -euo pipefail
cd "$(dirname "$0")/.."
gateways=${1:-2}
workers=${2:-2}
profile=release; [ "${RELEASE:-1}" = 0 ] && profile=debug
flag=--release; [ "$profile" = debug ] && flag=
. scripts/services.sh
cargo build $flag -q -p gateway -p worker
psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'parley'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE parley"
export PARLEY_DATABASE_URL=${PARLEY_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/parley}
export PARLEY_REDIS_URL=${PARLEY_REDIS_URL:-redis://127.0.0.1:6379}
export PARLEY_ADMIN_TOKEN=${PARLEY_ADMIN_TOKEN:-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export PARLEY_LOG=${PARLEY_LOG:-warn}
./target/$profile/gateway migrate >/dev/null
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for i in $(seq "$gateways"); do
  PARLEY_BIND=127.0.0.1:$((8000 + i)) PARLEY_METRICS_BIND=127.0.0.1:$((9000 + i)) ./target/$profile/gateway &
  pids+=($!)
done
for i in $(seq "$workers"); do PARLEY_METRICS_BIND=127.0.0.1:$((9100 + i)) ./target/$profile/worker & pids+=($!); done
for i in $(seq "$gateways"); do
  until curl -sf "127.0.0.1:$((8000 + i))/readyz" >/dev/null; do sleep 0.1; done
done
echo "gateways: $(seq -s ' ' -f 'http://127.0.0.1:80%02g' 1 "$gateways"); workers: $workers; admin token: $PARLEY_ADMIN_TOKEN"
wait
