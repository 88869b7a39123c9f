#!/usr/bin/env bash
# The compose topology as native processes on loopback (nginx in front of three gateways, two
# workers, the local Redis and PostgreSQL, via deploy/run-local.sh), with a short load through
# each gateway and through the load balancer's one URL: every message answered, no error, no
# protocol violation. Then two rolling restarts: SIGTERM to the gateway holding a socket that is
# streaming an answer; the reconnecting client (deploy/clients/resuming_client.py, then
# resuming_client.js) comes back through the same URL with last_seq and holds the whole
# answer, as saved.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
cargo build -q -p loadgen
db=parley_smoke
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
export PARLEY_DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db PARLEY_REDIS_PREFIX="smoke$$:"
export PARLEY_ADMIN_TOKEN=smoke-$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n') RELEASE=0 PARLEY_LOG=warn
# A short drain, so that the restart below cuts the answer and the client must resume.
export PARLEY_DRAIN_TIMEOUT_SECS=1 BUILD=0
LB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export LB_PORT
cargo build -q -p gateway -p worker
log=$(mktemp)
setsid deploy/run-local.sh 3 2 > "$log" 2>&1 &
topology=$!
trap 'kill -TERM -- -$topology 2>/dev/null || true; wait $topology 2>/dev/null || true; rm -f "$log" "$log".*' EXIT
for _ in $(seq 600); do grep -q "^gateways:" "$log" && break; sleep 0.5; done
grep -q "^gateways:" "$log" || { cat "$log"; echo "the topology did not start" >&2; exit 1; }
loads=()
for port in 8001 8002 "$LB_PORT"; do
  ./target/debug/loadgen --url "http://127.0.0.1:$port" --admin-token "$PARLEY_ADMIN_TOKEN" --sockets 40 --chats 20 \
    --messages 5 --reply-tokens 20 --report "$log.$port" >/dev/null &
  loads+=($!)
done
wait "${loads[@]}"
for port in 8001 8002 "$LB_PORT"; do
  python3 - "$log.$port" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
# Each of the 40 sockets sees the 5 answers of its chat.
ok = r["errors"] == 0 and r["protocol_violations"] == 0 and r["answers"] == 40 * 5
print(f"smoke {sys.argv[1].rsplit('.', 1)[-1]}: {r['answers']} answers, {r['tokens_per_second']:.0f} tokens/s, "
      f"errors {r['errors']}, violations {r['protocol_violations']}")
sys.exit(0 if ok else 1)
PY
done
# Rolling restarts, through the load balancer: one for the Python client, one for the JavaScript
# one (three gateways, so that one is left).
python3 - "$log" "$LB_PORT" <<'PY'
import asyncio, json, os, re, signal, subprocess, sys, urllib.request
sys.path.insert(0, "deploy/clients")
from resuming_client import ResumingClient

log, lb = open(sys.argv[1]).read(), int(sys.argv[2])
gateways = {int(m[1]): int(m[0]) for m in re.findall(r"pid (\d+) on :(\d+)", log)}
admin, base = os.environ["PARLEY_ADMIN_TOKEN"], f"http://127.0.0.1:{lb}"
url = f"ws://127.0.0.1:{lb}/ws/chat"

def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, headers={"Content-Type": "application/json", **(headers or {})},
                                 data=json.dumps(body).encode() if body is not None else None)
    with urllib.request.urlopen(req) as res:
        return json.load(res)

def stop_the_holder():
    """SIGTERM to the gateway that holds the (only) socket, as a rolling restart would."""
    for port, pid in list(gateways.items()):
        text = urllib.request.urlopen(f"http://127.0.0.1:{port + 1000}/metrics").read().decode()
        if float(re.search(r"^parley_open_sockets (\S+)", text, re.M)[1]) >= 1:
            os.kill(pid, signal.SIGTERM)
            del gateways[port]
            return port
    raise AssertionError("no gateway holds the socket")

def setup(name):
    key = call("POST", "/admin/v1/tenants", {"name": f"{name}-{os.getpid()}", "settings": {"agent": {"options": {
        "reply_tokens": 120, "token_delay_ms": 25}}}}, {"Authorization": f"Bearer {admin}"})["api_key"]
    chat = call("POST", "/api/v1/chats/", {"user_id": "sre"}, {"X-API-Key": key})["id"]
    return key, chat

def check(name, key, chat, answer, reconnects, holder):
    saved = call("GET", f"/api/v1/chats/{chat}/messages", headers={"X-API-Key": key})["messages"]
    saved = [m["content"] for m in saved if m["sender_role"] == "assistant"]
    print(f"restart ({name}): gateway :{holder} stopped mid-answer; the client reconnected {reconnects} time(s) "
          f"through :{lb} and holds the whole answer ({len(answer.split())} words)")
    assert reconnects >= 1, "the restart should have cut the stream"
    assert saved == [answer], (saved, answer)

async def python_client():
    key, chat = setup("restart-py")
    client = ResumingClient(url, chat, api_key=key, user_id="sre")
    asking = asyncio.create_task(client.ask("survive a restart"))
    while not any(client.answers.values()):
        await asyncio.sleep(0.05)
    holder = stop_the_holder()
    check("python", key, chat, await asking, client.reconnects, holder)

def javascript_client():
    key, chat = setup("restart-js")
    script = f"""
const {{ ResumingClient }} = require("./deploy/clients/resuming_client.js");
const c = new ResumingClient({json.dumps(url)}, {json.dumps(chat)}, {{ apiKey: {json.dumps(key)}, userId: "sre" }});
const t = setInterval(() => {{ if ([...c.answers.values()].some(Boolean)) {{ console.log("streaming"); clearInterval(t); }} }}, 20);
c.ask("survive a restart").then(
  (answer) => {{ console.log(JSON.stringify({{ answer, reconnects: c.reconnects }})); process.exit(0); }},
  (e) => {{ console.error(e); process.exit(1); }});
"""
    node = subprocess.Popen(["node", "--experimental-websocket", "-e", script], stdout=subprocess.PIPE, text=True)
    assert node.stdout.readline().strip() == "streaming"
    holder = stop_the_holder()
    result = json.loads(node.stdout.readline())
    assert node.wait(timeout=60) == 0
    check("javascript", key, chat, result["answer"], result["reconnects"], holder)

asyncio.run(python_client())
javascript_client()
PY
