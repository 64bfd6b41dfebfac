#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time from its committed corpus (copied, so the
# committed one stays as it is). Usage: scripts/fuzz.sh [seconds per target, default 25].
# Needs cargo-fuzz (`cargo install cargo-fuzz`); the stable toolchain is enough: no sanitizer,
# RUSTC_BOOTSTRAP only for libFuzzer's `-Z` flags. A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the run: turn it into a unit test next to the code.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-25}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export RUSTC_BOOTSTRAP=1 CARGO_INCREMENTAL=0
for target in $(cargo fuzz list); do
    mkdir -p "$work/$target"
    cp -r "corpus/$target/." "$work/$target/"
    echo "fuzz: $target for ${seconds}s"
    if ! cargo fuzz run --sanitizer none "$target" "$work/$target" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$work/$target.log" 2>&1; then
        tail -n 60 "$work/$target.log" >&2
        echo "fuzz: $target failed; its input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|new_units_added)" "$work/$target.log" || true
done
