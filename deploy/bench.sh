#!/usr/bin/env bash
# Benchmarks of the embedded gateway with the bundled load generator (release builds).
#   deploy/bench.sh throughput   # 200 chats back to back, 50-token answers
#   deploy/bench.sh ttft         # a steady 200 messages/s over 200 chats
#   deploy/bench.sh idle [N] [K] # gateway memory per idle socket at N sockets over K chats (10000, 100)
#   deploy/bench.sh storm [N] [K] # N sockets (10000) over K chats (100) dropped and resumed at once
#   deploy/bench.sh connect [N] [K] # connect rate: N sockets (15000) over K fresh chats (3000) opened
#                                # 512 at a time; prints the rate, connect p50/p99 and the gateway's
#                                # CPU per handshake (PROCESSES=N spreads the generator over N;
#                                # CONNECT_RATE=R opens them at R per second, open loop)
#   deploy/bench.sh fairness     # tenant B's time to first token (50 msg/s), alone and while tenant A
#                                # fills the worker with slow answers (3,000 chats, 200 ms per token)
#   deploy/bench.sh flood [R]    # R upgrades/s with made-up keys (5000) from 50 addresses: a real
#                                # client's handshake p99 and a load run's tokens/s, alone and flooded,
#                                # and the gateway's CPU per flood upgrade
#   deploy/bench.sh flood-floor [R] # the same flood against the least server possible
#                                # (loadgen's examples/bare_refuser.rs) and against the gateway,
#                                # each on CPU 0 with the flooder on CPU 1: CPU per upgrade
# TOPOLOGY=distributed runs one gateway and one worker process on the local Redis and
# PostgreSQL instead of the embedded gateway, and also reports Redis PUBLISH calls per token.
# throughput also prints the CPU seconds each process used (gateway, worker, Redis, PostgreSQL,
# the load generator): where a change's cost went, steadier than a rate on a shared machine.
# GATEWAY_BIN / WORKER_BIN run other builds (say, the previous commit's) for a same-day comparison;
# GATEWAY_WRAP prefixes the gateway's command (e.g. "heaptrack -o /tmp/gw"), LOADGEN_WRAP the load
# generator's: GATEWAY_WRAP="taskset -c 0" LOADGEN_WRAP="taskset -c 1" gives each its own core.
# Reports land in reports/. The gateway and the load generator share this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# Sockets are file descriptors: raise the soft limit as far as the hard one allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mode=${1:-throughput}
cargo build --release -q -p gateway -p worker -p loadgen
mkdir -p reports
dir=$(mktemp -d)
port=${PARLEY_BENCH_PORT:-18000}
export PARLEY_ADMIN_TOKEN=bench-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n') PARLEY_LOG=warn PARLEY_BOOTSTRAP_TENANT=false
wk=
if [ "${TOPOLOGY:-embedded}" = distributed ]; then
  . scripts/services.sh
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS parley_bench WITH (FORCE)" -c "CREATE DATABASE parley_bench"
  export PARLEY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/parley_bench
  export PARLEY_REDIS_URL=redis://127.0.0.1:6379 PARLEY_REDIS_PREFIX="bench$$:"
  ${GATEWAY_BIN:-./target/release/gateway} migrate >/dev/null
  PARLEY_METRICS_BIND=127.0.0.1:$((port + 1001)) ${WORKER_BIN:-./target/release/worker} &
  wk=$!
else
  export PARLEY_DATABASE_URL="sqlite://$dir/bench.db"
fi
PARLEY_BIND=127.0.0.1:$port PARLEY_METRICS_BIND=127.0.0.1:$((port + 1000)) ${GATEWAY_WRAP:-} ${GATEWAY_BIN:-./target/release/gateway} &
gw=$!
trap 'kill $gw $wk 2>/dev/null; wait $gw $wk 2>/dev/null; rm -rf "$dir"' EXIT
publishes() { redis-cli info commandstats | awk -F'[=,:]' '/^cmdstat_publish:/ {print $3}'; }
for _ in $(seq 50); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
# CPU seconds (user + system) of a process, of Redis, and of every PostgreSQL process: where a
# run's cost went, steadier than a rate on this shared machine.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / hz}' "/proc/$1/stat" 2>/dev/null || echo 0; }
redis_cpu() { redis-cli info cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s += $2} END {printf "%.2f", s}'; }
pg_cpu() { for p in $(pgrep -x postgres); do cpu_s "$p"; echo; done | awk '{s += $1} END {printf "%.2f", s}'; }
cpu_line() { echo "$(cpu_s $gw) ${wk:+$(cpu_s $wk)} $(redis_cpu) $(pg_cpu)"; }
# Upgrades sent, from the flood report $1.
flood_sent() { python3 -c "import json; print(json.load(open('$1'))['flood']['sent'])"; }
# CPU microseconds process $1 spent per flood upgrade since it had used $2 CPU seconds, from
# the flood report $3 (labelled $4).
per_upgrade() {
  awk -v a="$2" -v b="$(cpu_s "$1")" -v n="$(flood_sent "$3")" -v l="$4" \
    'BEGIN {printf "%s CPU per flood upgrade: %.0f us (%d upgrades)\n", l, (b - a) / n * 1e6, n}'
}
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$gw/status"; }
lg="${LOADGEN_WRAP:-} ./target/release/loadgen"
case "$mode" in
  throughput)
    p0=$(publishes || echo 0)
    c0=$(cpu_line)
    TIMEFORMAT='loadgen cpu seconds: %U user, %S system'
    time $lg --url "http://127.0.0.1:$port" --sockets 200 --chats 200 --messages 50 --reply-tokens 50 \
        --report reports/throughput.json
    c1=$(cpu_line)
    if [ -n "$wk" ]; then
      echo "redis PUBLISH calls per token: $(awk -v a="$p0" -v b="$(publishes)" 'BEGIN {printf "%.3f", (b - a) / 500000}')"
      echo "$c0 $c1" | awk '{printf "cpu seconds: gateway %.2f, worker %.2f, redis %.2f, postgres %.2f\n", $5 - $1, $6 - $2, $7 - $3, $8 - $4}'
    else
      echo "$c0 $c1" | awk '{printf "cpu seconds: gateway %.2f\n", $4 - $1}'
    fi ;;
  ttft)
    $lg --url "http://127.0.0.1:$port" --sockets 200 --chats 200 --messages 30 --reply-tokens 50 \
        --rate 200 --report reports/ttft.json ;;
  idle)
    n=${2:-10000}
    # The baseline is taken once the tenant and chats exist, so it counts sockets only.
    $lg --url "http://127.0.0.1:$port" --sockets "$n" --chats "${3:-100}" --setup-wait 4 --idle 20 --connect-concurrency "${CONNECT_CONCURRENCY:-256}" \
        --source-ips 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 2>reports/idle.log &
    lgpid=$!
    until grep -q "chats created" reports/idle.log 2>/dev/null; do sleep 0.2; done
    sleep 2
    before=$(rss_kib)
    until grep -q "holding" reports/idle.log 2>/dev/null; do sleep 0.5; done
    for t in 1 4 8 12; do sleep 3; echo "t+${t}: $(rss_kib) KiB" >&2; done
    during=$(rss_kib)
    wait $lgpid || true
    echo "{\"sockets\": $n, \"rss_before_kib\": $before, \"rss_with_sockets_kib\": $during, \"kib_per_socket\": $(awk -v d="$during" -v b="$before" -v n="$n" 'BEGIN {printf "%.2f", (d - b) / n}')}" \
      | tee reports/idle.json ;;
  connect)
    n=${2:-15000}
    $lg --url "http://127.0.0.1:$port" --sockets "$n" --chats "${3:-3000}" --messages 1 --reply-tokens 1 \
        --connect-concurrency "${CONNECT_CONCURRENCY:-512}" --connect-rate "${CONNECT_RATE:-0}" \
        --source-ips 127.0.0.1,127.0.0.2 --processes "${PROCESSES:-0}" \
        --report reports/connect.json >/dev/null 2>reports/connect.log &
    lgpid=$!
    until grep -q "opening" reports/connect.log 2>/dev/null; do sleep 0.05; done
    c0=$(cpu_line)
    until grep -q -e "all sockets open" -e "partial" reports/connect.log 2>/dev/null; do sleep 0.02; done
    c1=$(cpu_line)
    wait $lgpid || true
    echo "$c0 $c1" | awk -v n="$n" -v w="${wk:+1}" '{h = w ? 4 : 3; printf "gateway cpu per handshake: %.0f us", ($(h+1) - $1) * 1e6 / n;
      if (w) printf ", redis %.0f us, postgres %.0f us", ($(h+3) - $3) * 1e6 / n, ($(h+4) - $4) * 1e6 / n; print ""}'
    python3 -c "
import json; d = json.load(open('reports/connect.json'))
print(json.dumps({'connect_rate_per_s': round(d['connect_rate_per_s']), 'connect_ms': d['connect_ms'],
                  'refused': d['refused_by_code'], 'generator_cpu_s': d['generator_cpu_s']}, indent=2))" ;;
  storm)
    $lg storm --url "http://127.0.0.1:$port" --sockets "${2:-10000}" --chats "${3:-100}" \
        --source-ips 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4 --report reports/storm.json ;;
  fairness)
    b() { $lg --url "http://127.0.0.1:$port" --sockets 50 --chats 50 --messages 20 --reply-tokens 20 --rate 50 --report "$1" >/dev/null; }
    b reports/fair-alone.json
    # A: each of 3,000 chats asks for a slow answer (50 tokens, 200 ms apart, 10 s): uncapped it
    # takes every one of the worker's 1,024 slots; capped at the default 256 it leaves the rest.
    # A is stopped once B's run is over.
    a() { $lg --url "http://127.0.0.1:$port" --sockets 3000 --chats 3000 --messages 1 --reply-tokens 50 \
            --token-delay-ms 200 --concurrent-answers "$1" --connect-concurrency 512 \
            --source-ips 127.0.0.1,127.0.0.2 >/dev/null 2>&1; }
    for cap in 256 100000; do
      a "$cap" & ap=$!
      sleep 10
      b "reports/fair-busy-$cap.json"
      kill $ap 2>/dev/null || true; wait $ap 2>/dev/null || true
      sleep 12   # A's answers in progress end (10 s) before the next run
    done
    python3 - <<'PY'
import json
r = lambda n: json.load(open(f"reports/{n}.json"))["ttft_ms"]
alone, busy, uncapped = r("fair-alone"), r("fair-busy-256"), r("fair-busy-100000")
print(json.dumps({"b_ttft_ms": {"alone": alone, "a_busy_capped": busy, "a_busy_uncapped": uncapped},
                  "p99_ratio_capped": round(busy["p99"] / alone["p99"], 2),
                  "p99_ratio_uncapped": round(uncapped["p99"] / alone["p99"], 2)}, indent=2))
PY
    ;;
  flood)
    rate=${2:-5000}
    ips=$(seq -s, -f '127.0.2.%g' 1 50)
    # FLOOD_PIN=1 (with GATEWAY_WRAP="taskset -c 0") keeps the flooder on CPU 1 and the gateway
    # and the load on CPU 0, so that the ratio shows the gateway's cost, not the flooder's.
    pl=; pf=
    if [ -n "${FLOOD_PIN:-}" ]; then pl="taskset -c 0"; pf="taskset -c 1"; fi
    load() { $pl $lg --url "http://127.0.0.1:$port" --sockets 200 --chats 200 --messages 20 --reply-tokens 50 --report "$1" >/dev/null; }
    $pf $lg flood --url "http://127.0.0.1:$port" --rate 0 --duration 10 --report reports/flood-alone.json >/dev/null
    f0=$(cpu_s $gw)
    $pf $lg flood --url "http://127.0.0.1:$port" --rate "$rate" --duration 20 --source-ips "$ips" --report reports/flood.json >/dev/null
    per_upgrade "$gw" "$f0" reports/flood.json gateway
    c0=$(cpu_s $gw)
    load reports/flood-load-alone.json
    c1=$(cpu_s $gw)
    $pf $lg flood --url "http://127.0.0.1:$port" --rate "$rate" --duration 60 --source-ips "$ips" --report reports/flood-beside-load.json >/dev/null &
    fl=$!
    sleep 3
    c2=$(cpu_s $gw)
    load reports/flood-load.json
    c3=$(cpu_s $gw)
    kill $fl 2>/dev/null || true; wait $fl 2>/dev/null || true
    echo "$c0 $c1 $c2 $c3" | awk '{printf "gateway cpu seconds: load alone %.2f, load while flooded %.2f\n", $2 - $1, $4 - $3}'
    python3 - <<'PY'
import json
r = lambda n: json.load(open(f"reports/{n}.json"))
alone, flood = r("flood-alone"), r("flood")
la, lf = r("flood-load-alone"), r("flood-load")
print(json.dumps({
    "flood_rate_achieved": round(flood["flood"]["achieved_rate"]),
    "flood_outcomes": flood["flood"]["outcomes"],
    "real_handshake_p99_ms": {"alone": alone["real_handshake_ms"]["p99"], "flooded": flood["real_handshake_ms"]["p99"]},
    "real_handshake_p50_ms": {"alone": alone["real_handshake_ms"]["p50"], "flooded": flood["real_handshake_ms"]["p50"]},
    "tokens_per_second": {"alone": round(la["tokens_per_second"]), "flooded": round(lf["tokens_per_second"]),
                          "ratio": round(lf["tokens_per_second"] / la["tokens_per_second"], 3)},
}, indent=2))
PY
    ;;
  flood-floor)
    rate=${2:-5000}
    ips=$(seq -s, -f '127.0.2.%g' 1 50)
    cargo build --release -q -p loadgen --example bare_refuser
    floor_port=$((port + 300))
    taskset -c 0 ./target/release/examples/bare_refuser "127.0.0.1:$floor_port" &
    fp=$!
    sleep 0.5
    for target in floor gateway; do
      pid=$gw; p=$port
      if [ $target = floor ]; then pid=$fp; p=$floor_port; else taskset -a -p -c 0 $gw >/dev/null; fi
      f0=$(cpu_s $pid)
      TIMEFORMAT="%U %S"
      { time taskset -c 1 ./target/release/loadgen flood --no-probe --url "http://127.0.0.1:$p" --rate "$rate" --duration 20 --source-ips "$ips" --report "reports/flood-$target.json" >/dev/null 2>&1; } 2> "$dir/flooder-cpu"
      per_upgrade "$pid" "$f0" "reports/flood-$target.json" "$target"
      awk -v n="$(flood_sent "reports/flood-$target.json")" \
        '{printf "  (the flooder: %.0f us per upgrade)\n", ($1 + $2) / n * 1e6}' "$dir/flooder-cpu"
    done
    kill $fp
    ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
