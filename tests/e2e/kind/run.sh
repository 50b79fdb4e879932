#!/usr/bin/env bash
# End-to-end on a throwaway kind cluster: KubeRay + the elasticmoe chart + the CPU
# example, then requests under load while a worker pod is deleted; then a two-pool
# deployment (pools cpu-a and cpu-b, one worker group each).
#
#   tests/e2e/kind/run.sh            # create the cluster, run the suite, delete the cluster
#   KEEP_CLUSTER=1 tests/e2e/kind/run.sh
#
# Needs docker, kind, kubectl and helm on PATH, and the elasticmoe image
# ($ELASTICMOE_IMAGE, default ghcr.io/elasticmoe/elasticmoe:0.1.0) built or pullable.
# It cannot run on the development machines (no Docker); pytest skips the suite there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
cluster="${KIND_CLUSTER:-elasticmoe-e2e}"
image="${ELASTICMOE_IMAGE:-ghcr.io/elasticmoe/elasticmoe:0.1.0}"
kuberay_version="${KUBERAY_VERSION:-1.4.2}"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 2; }
done

kind create cluster --name "$cluster" --wait 120s
cleanup() { [[ "${KEEP_CLUSTER:-}" == 1 ]] || kind delete cluster --name "$cluster"; }
trap cleanup EXIT
kind load docker-image "$image" --name "$cluster" || true

helm repo add kuberay https://ray-project.github.io/kuberay-helm/ >/dev/null
helm install kuberay-operator kuberay/kuberay-operator --version "$kuberay_version" \
  --namespace kuberay --create-namespace --wait
helm install elasticmoe "$repo/helm/elasticmoe" --namespace elasticmoe --create-namespace \
  --set operator.image.tag="${image##*:}" --set operator.scaleIntervalSeconds=10 --wait

export ELASTICMOE_E2E_KIND=1 ELASTICMOE_E2E_NAMESPACE=elasticmoe ELASTICMOE_IMAGE="$image"
cd "$repo"
python -m pytest -q -m kind tests/e2e/kind
