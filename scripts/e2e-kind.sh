#!/usr/bin/env bash
# Runs the end-to-end scenarios against Spawner on a local kind cluster:
#   1. creates the cluster from kind-config.yaml (unless it exists),
#   2. builds the image (Dockerfile) as spawner:dev and loads it into the nodes,
#   3. applies deploy/crd.yaml, then deploy/overlays/kind, and waits for the rollout,
#   4. runs `SPAWNER_E2E_KIND=1 cargo test -p spawner-e2e --test scenarios_kind`.
#
# Needs: docker, kind, kubectl, cargo.
#
# Environment:
#   KIND_CLUSTER_NAME   cluster name (default: spawner, as in kind-config.yaml)
#   SPAWNER_E2E_KEEP=1  keep the cluster afterwards (default: keep it too when it existed
#                       before; a cluster this script created is deleted at the end)
#   SPAWNER_E2E_SKIP_BUILD=1  reuse an already loaded spawner:dev image
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cluster="${KIND_CLUSTER_NAME:-spawner}"
context="kind-$cluster"
image="spawner:dev"

for tool in docker kind kubectl cargo; do
    command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is required" >&2; exit 2; }
done

created=0
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    echo "== using the existing kind cluster $cluster"
else
    echo "== creating the kind cluster $cluster"
    kind create cluster --name "$cluster" --config kind-config.yaml --wait 120s
    created=1
fi
cleanup() {
    status=$?
    if [[ $status -ne 0 ]]; then
        echo "== failed; state of the cluster:" >&2
        kubectl --context "$context" -n spawner-system get pods -o wide >&2 || true
        kubectl --context "$context" -n spawner-backends get slab,pods -o wide >&2 || true
        kubectl --context "$context" -n spawner-system logs deploy/spawner-controller --tail=50 >&2 || true
    fi
    if [[ $created -eq 1 && "${SPAWNER_E2E_KEEP:-0}" != "1" ]]; then
        echo "== deleting the kind cluster $cluster (SPAWNER_E2E_KEEP=1 keeps it)"
        kind delete cluster --name "$cluster" || true
    fi
    exit $status
}
trap cleanup EXIT

if [[ "${SPAWNER_E2E_SKIP_BUILD:-0}" != "1" ]]; then
    echo "== building $image"
    DOCKER_BUILDKIT=1 docker build -t "$image" .
    echo "== loading $image into $cluster"
    kind load docker-image "$image" --name "$cluster"
fi

echo "== applying the CRD and deploy/overlays/kind"
kubectl --context "$context" apply --server-side -f deploy/crd.yaml
kubectl --context "$context" wait --for=condition=Established --timeout=60s \
    crd/sessionlivedbackends.spawner.dev
kubectl --context "$context" apply --server-side -k deploy/overlays/kind
# A rebuilt image keeps the tag spawner:dev: restart so the pods run the image just loaded.
if [[ "${SPAWNER_E2E_SKIP_BUILD:-0}" != "1" ]]; then
    kubectl --context "$context" -n spawner-system rollout restart \
        deploy/spawner-controller deploy/spawner-api ds/spawner-sweeper
fi

echo "== waiting for the rollout"
for workload in deploy/spawner-controller deploy/spawner-api ds/spawner-sweeper; do
    kubectl --context "$context" -n spawner-system rollout status "$workload" --timeout=180s
done
# The NodePort answers once kube-proxy has programmed it.
for _ in $(seq 1 60); do
    if curl -fsS -o /dev/null http://127.0.0.1:30080/healthz 2>/dev/null; then
        break
    fi
    sleep 1
done
curl -fsS -o /dev/null http://127.0.0.1:30080/healthz || {
    echo "e2e-kind: the api is not reachable at http://127.0.0.1:30080" >&2
    exit 1
}

echo "== running the scenarios"
# The tests port-forward through this cluster's API server, whatever the current context is.
kubeconfig="$(mktemp)"
kind get kubeconfig --name "$cluster" > "$kubeconfig"
SPAWNER_E2E_KIND=1 \
SPAWNER_E2E_API_URL=http://127.0.0.1:30080 \
SPAWNER_E2E_TOKEN=kind-dev-token \
KUBECONFIG="$kubeconfig" \
    cargo test -p spawner-e2e --test scenarios_kind -- --nocapture
rm -f "$kubeconfig"
