#!/usr/bin/env bash
# Runs the distributed topology as native processes on loopback, like docker-compose.yml: nginx
# (Debian's package, installed when absent) as the WebSocket-aware load balancer on one URL
# (:8000), with the configuration compose uses (deploy/compose/nginx.conf, its upstreams pointed
# at these gateways), in front of G gateways and W workers sharing the local Redis
# (127.0.0.1:6379) and PostgreSQL (127.0.0.1:5432, database `parley`, created if missing).
#   deploy/run-local.sh [G] [W]      # gateways on :8001, :8002, …; Ctrl-C stops everything
# Environment: PARLEY_ADMIN_TOKEN (default: a random one, printed), PARLEY_LOG, PARLEY_REDIS_PREFIX,
# LB_PORT (8000; 0: no load balancer), RELEASE=0 for debug builds, BUILD=0 to use the binaries
# already in target/ without running cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
gateways=${1:-2}
workers=${2:-2}
profile=release; [ "${RELEASE:-1}" = 0 ] && profile=debug
flag=--release; [ "$profile" = debug ] && flag=
. scripts/services.sh
if [ "${BUILD:-1}" = 1 ] || [ ! -x "target/$profile/gateway" ] || [ ! -x "target/$profile/worker" ]; then
  cargo build $flag -q -p gateway -p worker
fi
lb_port=${LB_PORT:-8000}
if [ "$lb_port" != 0 ] && ! command -v nginx >/dev/null && ! [ -x /usr/sbin/nginx ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null
fi
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
  echo "gateway $i: pid $! on :$((8000 + i)), metrics :$((9000 + i))"
done
for i in $(seq "$workers"); do PARLEY_METRICS_BIND=127.0.0.1:$((9100 + i)) ./target/$profile/worker & pids+=($!); done
for i in $(seq "$gateways"); do
  until curl -sf "127.0.0.1:$((8000 + i))/readyz" >/dev/null; do sleep 0.1; done
done
if [ "$lb_port" != 0 ]; then
  lb=$(mktemp -d)
  mkdir -p "$lb/tmp"
  # compose's file, with loopback upstreams, this port, and its files in a scratch directory.
  python3 - deploy/compose/nginx.conf "$lb" "$lb_port" "$gateways" > "$lb/nginx.conf" <<'PY'
import re, sys
conf, lb, port, gateways = open(sys.argv[1]).read(), sys.argv[2], sys.argv[3], int(sys.argv[4])
servers = "".join(f"        server 127.0.0.1:{8000 + i} max_fails=1 fail_timeout=5s;\n" for i in range(1, gateways + 1))
conf = re.sub(r"        server gateway-\d+:8000[^\n]*\n", "", conf)
conf = conf.replace("least_conn;\n", "least_conn;\n" + servers)
conf = conf.replace("listen 8000;", f"listen 127.0.0.1:{port};")
conf = conf.replace("/var/log/nginx/access.log", f"{lb}/access.log")
temp = " ".join(f"{k}_temp_path {lb}/tmp;" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
conf = conf.replace("http {\n", "http {\n    " + temp + "\n", 1)
print(f"daemon off; pid {lb}/nginx.pid; error_log {lb}/error.log warn;\n" + conf)
PY
  "$(command -v nginx || echo /usr/sbin/nginx)" -p "$lb" -c "$lb/nginx.conf" &
  pids+=($!)
  until curl -sf "127.0.0.1:$lb_port/readyz" >/dev/null; do sleep 0.1; done
  echo "load balancer: http://127.0.0.1:$lb_port (nginx, $lb/nginx.conf)"
fi
echo "gateways: $(seq -s ' ' -f 'http://127.0.0.1:80%02g' 1 "$gateways"); workers: $workers; admin token: $PARLEY_ADMIN_TOKEN"
wait
