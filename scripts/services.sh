#!/usr/bin/env bash
# Makes sure the PostgreSQL (127.0.0.1:5432, user postgres, trust auth) and Redis
# (127.0.0.1:6379) the tests use are reachable. Where one is not running it is started, and
# installed from Debian's packages when absent.
# Source it (`. scripts/services.sh`) after defining apt_install, or run it directly.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! declare -F apt_install >/dev/null; then
  apt_install() {
    [ -n "${APT_UPDATED:-}" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  }
fi

ensure_postgres() {
  port_open 5432 && return 0
  ls /etc/postgresql/*/main >/dev/null 2>&1 || apt_install postgresql
  local ver conf
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  conf=/etc/postgresql/$ver/main/pg_hba.conf
  # Test machines only: let the tests connect as postgres over loopback without a password.
  grep -q "parley-tests" "$conf" || sed -i "1i host all postgres 127.0.0.1/32 trust # parley-tests" "$conf"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main start
  for _ in $(seq 50); do port_open 5432 && return 0; sleep 0.2; done
  echo "PostgreSQL did not start" >&2
  return 1
}

ensure_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/parley-test-redis.log
  for _ in $(seq 50); do port_open 6379 && return 0; sleep 0.1; done
  echo "Redis did not start" >&2
  return 1
}

ensure_postgres
ensure_redis
