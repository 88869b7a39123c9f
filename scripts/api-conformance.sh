#!/usr/bin/env bash
# The OpenAPI document against a live gateway (API.md §7): validates it as OpenAPI 3.1
# (`openapi-spec-validator`), then lets `schemathesis` call every operation with generated
# requests, once with the API key (and the admin token) and once with a client token: no 5xx,
# no response that contradicts the document. Starts its own embedded gateway on a fresh
# database; run by scripts/test.sh. Needs the debug `gateway` binary (cargo build -p gateway).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import openapi_spec_validator, schemathesis' 2>/dev/null \
  || python3 -m pip install -q openapi-spec-validator schemathesis 2>/dev/null \
  || python3 -m pip install -q --break-system-packages openapi-spec-validator schemathesis

work=$(mktemp -d)
admin="conformance-admin-token-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
metrics=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
PARLEY_BIND="127.0.0.1:$port" PARLEY_METRICS_BIND="127.0.0.1:$metrics" \
  PARLEY_DATABASE_URL="sqlite://$work/conformance.db" PARLEY_ADMIN_TOKEN="$admin" \
  PARLEY_BOOTSTRAP_TENANT=false PARLEY_LOG=warn \
  PARLEY_AUTH__FAILURE_BURST=1000000 PARLEY_AUTH__FAILURES_PER_MINUTE=1000000 \
  target/debug/gateway > "$work/gateway.log" 2>&1 &
gateway=$!
trap 'kill $gateway 2>/dev/null || true; rm -rf "$work"' EXIT
base="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$base/healthz" >/dev/null && break; sleep 0.1; done

python3 - "$base" "$admin" "$work" <<'PY'
import json, sys, urllib.request
base, admin, work = sys.argv[1:4]
def call(method, path, body=None, headers=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as res:
        return json.load(res)
from openapi_spec_validator import validate
validate(call("GET", "/openapi.json"))
print("openapi.json: valid OpenAPI", call("GET", "/openapi.json")["openapi"])
tenant = call("POST", "/admin/v1/tenants", {"name": "conformance", "settings": {"requests_per_minute": 1000000}},
              {"Authorization": "Bearer " + admin})
key = tenant["api_key"]
call("POST", "/api/v1/chats/", {"user_id": "conformance-user"}, {"X-API-Key": key})
token = call("POST", "/api/v1/tokens", {"user_id": "conformance-user", "ttl_seconds": 3600}, {"X-API-Key": key})["token"]
open(f"{work}/key", "w").write(key)
open(f"{work}/token", "w").write(token)
PY

run() {
  schemathesis --config-file scripts/schemathesis.toml run "$base/openapi.json" --checks all --max-examples "${CONFORMANCE_EXAMPLES:-25}" \
    --generation-deterministic --suppress-health-check all "$@"
}
echo "== with the API key and the admin token"
run -H "X-API-Key: $(cat "$work/key")" -H "Authorization: Bearer $admin"
echo "== with a client token"
run -H "Authorization: Bearer $(cat "$work/token")" --include-path-regex '^/api/'
