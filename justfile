# Spawner's recipes. `just --list` shows them.

# Run Spawner on this machine, no cluster needed (open the printed demo URL in two tabs).
dev:
    cargo run --release -p spawner -- dev --demo

# Run the whole test suite (the README's test command; CI runs it through .ci/run).
test:
    cargo test --workspace

# Print the CRD and check that deploy/crd.yaml is up to date.
crd:
    cargo run -q -p spawner -- crd | diff - deploy/crd.yaml && echo "deploy/crd.yaml is up to date"

# Regenerate deploy/crd.yaml from the Rust types.
crd-write:
    cargo run -q -p spawner -- crd > deploy/crd.yaml

# Formatting and lints, as CI wants them.
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Every fuzz target of fuzz/ for a bounded time from fuzz/corpus (docs/fuzzing.md); CI runs 8 s each.
fuzz seconds="25":
    scripts/fuzz.sh {{seconds}}

# schemathesis (from PyPI, cached in ~/.cache/spawner/schemathesis) against the api of a
# `spawner dev` it starts: every operation and check of /openapi.json (docs/api.md); CI runs 10.
schemathesis examples="25":
    scripts/schemathesis.sh {{examples}}

# Build (or reuse) the real kube-apiserver, kube-controller-manager and etcd used by the tests.
controlplane:
    e2e/controlplane/build.sh

# localcluster's API server benchmark: creates/s, patches/s, watch fan-out latency.
bench-localcluster:
    cargo run --release -p spawner-localcluster --example bench

# The sweeper with thousands of backends: memory and subscription time.
bench-sweeper backends="2000":
    cargo run --release -p spawner-sweeper --example scale -- {{backends}}

# `spawner sidecar` (release, as the images run it) vs nginx (1 worker) vs the app directly
# (needs `apt-get install nginx wrk`); writes target/bench/sidecar.json.
bench-sidecar:
    components/sidecar/bench/run.sh

# `spawner router` (release) -> sidecar vs nginx -> sidecar vs the sidecar alone vs the app,
# idle WebSocket memory, 10 vs 10,000 backends in the router's cache (needs nginx, wrk); writes
# target/bench/router.json. Results: docs/router.md.
bench-router:
    components/router/bench/run.sh

# Reuse a running Docker engine or start a private one (docs/images.md); prints its DOCKER_HOST.
docker:
    scripts/docker-engine.sh start

# Build every image (spawner, spawner-{controller,api,router,sweeper,sidecar}) from a release binary
# built here, on the engine scripts/docker-engine.sh finds or starts (docs/images.md).
images tag="dev":
    scripts/images.sh --tag {{tag}}

# Build the all-in-one image from source inside Docker (BuildKit; pulls rust:1-bookworm).
image tag="spawner:dev":
    DOCKER_BUILDKIT=1 docker build -t {{tag}} .

# Check that deploy/ and the kind overlay render.
manifests:
    kubectl kustomize deploy > /dev/null && kubectl kustomize deploy/overlays/kind > /dev/null && echo "deploy/ renders"

# deploy/ against a real kube-apiserver (server-side dry run) and the CLI's flags.
e2e-manifests:
    cargo test -p spawner-e2e --test controlplane_manifests

# End-to-end scenarios against `spawner dev` (no cluster).
e2e-local:
    cargo test -p spawner-e2e --test scenarios_local -- --nocapture

# Needs go, cc, debootstrap, kubectl, root for the private Docker engine (docs/kind.md);
# `scripts/e2e-kind.sh --dry-run` prints every command.
# End-to-end scenarios on a kind cluster built from source.
e2e:
    scripts/e2e-kind.sh

# 50 sequential spawns and 3 bursts of 20, split into steps (e2e/examples/kind_spawn_bench.rs).
# Spawn-to-ready latency on the kind cluster `SPAWNER_E2E_KEEP=1 just e2e` leaves.
bench-kind:
    eval "$(scripts/docker-engine.sh env)" && kubeconfig="$(mktemp)" && "$(scripts/kind-node-image.sh --print-kind)" get kubeconfig --name spawner >"$kubeconfig" && KUBECONFIG="$kubeconfig" cargo run -p spawner-e2e --example kind_spawn_bench

# `spawner dev` under N spawns/min for M minutes, its memory sampled every 30 s
# (benches/soak.rs; target/bench/soak.md). Defaults 1000/min for 30 min; e.g. `just bench-soak 1000 10`.
bench-soak per_minute="1000" minutes="30":
    SPAWNER_DEV_LOG=warn SPAWNER_SOAK_PER_MINUTE={{per_minute}} SPAWNER_SOAK_MINUTES={{minutes}} cargo bench -p spawner --bench soak

# Spawn-to-ready latency of `spawner dev` (release). Measured with a backend that binds at once
# (examples/bind_at_once.rs: target/bench/spawn.md and spawn.json), then with
# `spawner demo-backend` (target/bench/spawn-demo.md and spawn-demo.json).
bench-spawn:
    cargo build --release -p spawner --example bind_at_once
    SPAWNER_BENCH_BACKEND='{{justfile_directory()}}/target/release/examples/bind_at_once $(PORT)' cargo bench -p spawner --bench spawn
    SPAWNER_BENCH_NAME=spawn-demo cargo bench -p spawner --bench spawn
