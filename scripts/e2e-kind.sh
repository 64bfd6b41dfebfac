#!/usr/bin/env bash
# Runs the end-to-end scenarios against Spawner on a real kind cluster (`just e2e`, and .ci/run):
#   1. a Docker engine (scripts/docker-engine.sh start),
#   2. kind and its node image: built here from source (scripts/kind-node-image.sh), or the
#      image SPAWNER_KIND_NODE_IMAGE names,
#   3. the cluster from kind-config.yaml (one control plane, two workers),
#   4. the Spawner image (spawner:dev, scripts/images.sh from the debug binary) built and loaded
#      into the nodes,
#   5. deploy/crd.yaml and deploy/overlays/kind applied, the rollout awaited,
#   6. `SPAWNER_E2E_KIND=1 cargo test -p spawner-e2e --test scenarios_kind`,
#   7. on failure, the cluster's state, events and logs (kind export logs) under target/e2e-kind,
#   8. the cluster deleted (unless it existed before or SPAWNER_E2E_KEEP=1).
#
# Usage: scripts/e2e-kind.sh [--dry-run]   (--dry-run prints every command and runs none)
#
# Environment:
#   SPAWNER_KIND_NODE_IMAGE  the node image; empty (default): built from source here; `kind`:
#                            kind's published default image for its version (needs a registry)
#   SPAWNER_KIND_BIN         the kind binary (default: built by scripts/kind-node-image.sh)
#   KIND_CLUSTER_NAME        cluster name (default: spawner, as in kind-config.yaml)
#   SPAWNER_E2E_KEEP=1       keep the cluster afterwards
#   SPAWNER_E2E_SKIP_BUILD=1 reuse an already loaded spawner:dev image
#   SPAWNER_REQUIRE_KIND=1   a missing tool fails the run (CI); otherwise it is a skip that says so
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cluster="${KIND_CLUSTER_NAME:-spawner}"
context="kind-$cluster"
image="spawner:dev"
dry_run=0
[[ "${1:-}" == "--dry-run" ]] && dry_run=1

log() { echo "== e2e-kind: $*" >&2; }
run() {
    if [[ $dry_run -eq 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}
step_start=$(date +%s)
total_start=$step_start
step() {
    local now
    now=$(date +%s)
    [[ -n "${step_name:-}" ]] && log "$step_name: $((now - step_start))s"
    step_name="$1"
    step_start=$now
    log "$1"
}
missing() {
    if [[ "${SPAWNER_REQUIRE_KIND:-0}" == "1" ]]; then
        echo "e2e-kind: $* (SPAWNER_REQUIRE_KIND=1: failing)" >&2
        exit 2
    fi
    echo "e2e-kind: skipped: $*" >&2
    exit 0
}

for tool in cargo kubectl curl; do
    command -v "$tool" >/dev/null || missing "$tool is required"
done

# One run at a time per machine: two runs would share the cluster name (one deleting it under
# the other) and the host ports 30080/30081 of kind-config.yaml. A second run waits.
if [[ $dry_run -eq 0 ]] && command -v flock >/dev/null; then
    lock_file="${XDG_CACHE_HOME:-$HOME/.cache}/spawner/kind/e2e.lock"
    mkdir -p "$(dirname "$lock_file")"
    exec 9>"$lock_file"
    if ! flock -n 9; then
        log "another e2e-kind run holds $lock_file: waiting for it to end"
        flock 9
    fi
fi

step "[1/6] docker engine"
if [[ $dry_run -eq 1 ]]; then
    run scripts/docker-engine.sh start
else
    engine_env="$(scripts/docker-engine.sh start)" || missing "no Docker engine (scripts/docker-engine.sh start failed)"
    eval "$engine_env"
fi

step "[2/6] kind and its node image"
node_image="${SPAWNER_KIND_NODE_IMAGE:-}"
kind="${SPAWNER_KIND_BIN:-}"
if [[ -z "$node_image" || -z "$kind" ]]; then
    for tool in go cc debootstrap; do
        command -v "$tool" >/dev/null || missing "$tool is required to build kind and its node image"
    done
fi
if [[ -z "$node_image" ]]; then
    if [[ $dry_run -eq 1 ]]; then
        run scripts/kind-node-image.sh --dry-run
        node_image="$(scripts/kind-node-image.sh --print-image)"
    else
        node_image="$(scripts/kind-node-image.sh build)"
    fi
elif [[ -z "$kind" && $dry_run -eq 0 ]]; then
    # Only kind itself is needed: the node image builder skips what exists, so build it alone.
    kind_path="$(scripts/kind-node-image.sh --print-kind)"
    [[ -x "$kind_path" ]] || scripts/kind-node-image.sh build >/dev/null
fi
kind="${kind:-$(scripts/kind-node-image.sh --print-kind)}"
image_args=()
config="kind-config.yaml"
if [[ "$node_image" != "kind" ]]; then
    image_args=(--image "$node_image")
    # A node image built here carries the etcd it has (kubeadm's default tag may be newer).
    etcd_tag=""
    if [[ $dry_run -eq 0 ]]; then
        etcd_tag="$(docker image inspect -f '{{index .Config.Labels "spawner.dev/etcd-image-tag"}}' "$node_image" 2>/dev/null || true)"
    fi
    if [[ -n "$etcd_tag" ]]; then
        config="$(mktemp --suffix=.yaml)"
        cat kind-config.yaml - >"$config" <<EOF
kubeadmConfigPatches:
- |
  kind: ClusterConfiguration
  etcd:
    local:
      imageTag: "$etcd_tag"
EOF
    fi
fi

created=0
cleanup() {
    status=$?
    if [[ $status -ne 0 && $created -eq 1 ]]; then
        out="$root/target/e2e-kind"
        log "failed (exit $status); the cluster's state, events and logs go to $out"
        mkdir -p "$out"
        {
            kubectl --context "$context" get nodes -o wide
            kubectl --context "$context" get pods -A -o wide
            kubectl --context "$context" -n spawner-backends get slab -o wide
            kubectl --context "$context" get events -A --sort-by=.lastTimestamp
        } >"$out/state.txt" 2>&1 || true
        for workload in deploy/spawner-controller deploy/spawner-api deploy/spawner-router ds/spawner-sweeper; do
            kubectl --context "$context" -n spawner-system logs "$workload" --all-containers \
                --tail=200 >"$out/$(basename "$workload").log" 2>&1 || true
        done
        "$kind" export logs "$out/kind" --name "$cluster" >/dev/null 2>&1 || true
        tail -n 60 "$out/state.txt" >&2 || true
    fi
    if [[ $created -eq 1 && "${SPAWNER_E2E_KEEP:-0}" != "1" ]]; then
        log "deleting the kind cluster $cluster (SPAWNER_E2E_KEEP=1 keeps it)"
        "$kind" delete cluster --name "$cluster" >/dev/null 2>&1 || true
    fi
    [[ "$config" != "kind-config.yaml" ]] && rm -f "$config"
    [[ -n "${kubeconfig:-}" ]] && rm -f "$kubeconfig"
    log "total: $(($(date +%s) - total_start))s"
    exit $status
}
[[ $dry_run -eq 0 ]] && trap cleanup EXIT

step "[3/6] cluster $cluster (node image $node_image)"
if [[ $dry_run -eq 0 ]] && "$kind" get clusters 2>/dev/null | grep -qx "$cluster"; then
    log "using the existing kind cluster $cluster"
else
    created=1
    run "$kind" create cluster --name "$cluster" --config "$config" "${image_args[@]}" --wait 300s
fi
kubeconfig="$(mktemp)"
run sh -c "'$kind' get kubeconfig --name '$cluster' >'$kubeconfig'"
export KUBECONFIG="$kubeconfig"

if [[ "${SPAWNER_E2E_SKIP_BUILD:-0}" != "1" ]]; then
    step "[4/6] image $image, loaded into the nodes"
    # The debug binary, as the image tests use: `cargo test` has built it already, and a cold
    # release build would add a quarter of an hour on two cores.
    run cargo build -p spawner
    run scripts/images.sh --binary target/debug/spawner --tag dev
    run "$kind" load docker-image "$image" --name "$cluster"
fi

step "[5/6] deploy/crd.yaml and deploy/overlays/kind"
run kubectl --context "$context" apply --server-side -f deploy/crd.yaml
run kubectl --context "$context" wait --for=condition=Established --timeout=60s \
    crd/sessionlivedbackends.spawner.dev
run kubectl --context "$context" apply --server-side -k deploy/overlays/kind
# A rebuilt image keeps the tag spawner:dev: restart so the pods run the image just loaded.
if [[ $created -eq 0 && "${SPAWNER_E2E_SKIP_BUILD:-0}" != "1" ]]; then
    run kubectl --context "$context" -n spawner-system rollout restart \
        deploy/spawner-controller deploy/spawner-api deploy/spawner-router ds/spawner-sweeper
fi
for workload in deploy/spawner-controller deploy/spawner-api deploy/spawner-router ds/spawner-sweeper; do
    run kubectl --context "$context" -n spawner-system rollout status "$workload" --timeout=300s
done
# The NodePorts answer once kube-proxy has programmed them (the router's answers 404 for a
# backend that does not exist).
if [[ $dry_run -eq 0 ]]; then
    for _ in $(seq 1 60); do
        curl -fsS -o /dev/null http://127.0.0.1:30080/healthz 2>/dev/null && break
        sleep 1
    done
    for _ in $(seq 1 60); do
        curl -sS -o /dev/null -H 'Host: none.localhost:30081' http://127.0.0.1:30081/ 2>/dev/null && break
        sleep 1
    done
fi
run curl -fsS -o /dev/null http://127.0.0.1:30080/healthz
run curl -sS -o /dev/null -H 'Host: none.localhost:30081' http://127.0.0.1:30081/

step "[6/6] scenarios (cargo test -p spawner-e2e --test scenarios_kind)"
run env SPAWNER_E2E_KIND=1 SPAWNER_E2E_API_URL=http://127.0.0.1:30080 SPAWNER_E2E_TOKEN=kind-dev-token \
    cargo test -p spawner-e2e --test scenarios_kind -- --nocapture --test-threads=1
step "done"
