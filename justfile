# Spawner's recipes. `just --list` shows them.

# Run the whole test suite (the README's test command).
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
