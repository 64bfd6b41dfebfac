#!/usr/bin/env bash
# CPU per proxied HTTP request of the sidecar in one or more `spawner` binaries (to compare
# builds on a shared, noisy machine, where throughput says little); each runs `BIN sidecar`:
#
#   components/sidecar/bench/cpu.sh [SPAWNER_BIN ...]     (default: target/release/spawner)
#
# For each binary, in front of examples/bench_app:
# - `cpu`: the sidecar's CPU time (utime + stime from /proc) during `wrk -t2 -c64` for
#   BENCH_SECONDS (8), divided by the requests wrk completed; BENCH_ROUNDS (2) rounds;
# - `instructions`: user-space instructions per request under callgrind (needs valgrind), with
#   `wrk -t1 -c8` for 5 s after a warm-up. Deterministic up to batching: the number to compare
#   builds by (hardware counters are not available in this VM, so `perf stat -e instructions`
#   does not work here).
# Knobs: BENCH_SECONDS, BENCH_ROUNDS, BENCH_PORT_BASE (28480), CALLGRIND (1; 0 skips it).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
SECS=${BENCH_SECONDS:-8}
ROUNDS=${BENCH_ROUNDS:-2}
BASE=${BENCH_PORT_BASE:-28480}
APP_PORT=$BASE
SIDECAR_PORT=$((BASE + 10))
CALLGRIND=${CALLGRIND:-1}
# shellcheck source=scripts/bench/proxy.sh
. "$ROOT/scripts/bench/proxy.sh"
need_tools bench/cpu.sh wrk

build_release
BINS=("$@")
[ ${#BINS[@]} -gt 0 ] || BINS=(target/release/spawner)

stop_sidecar() {
    kill "$SIDECAR_PID" 2>/dev/null || true
    wait "$SIDECAR_PID" 2>/dev/null || true
}

requests() { awk '/requests in/ {print $1}'; }

start_app "$APP_PORT"
TICK=$(getconf CLK_TCK)
URL="http://127.0.0.1:$SIDECAR_PORT/"

for bin in "${BINS[@]}"; do
    start_sidecar "$SIDECAR_PORT" "$APP_PORT" "$bin" sidecar
    wrk -t2 -c64 -d2s "$URL" >/dev/null
    for round in $(seq 1 "$ROUNDS"); do
        read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$SIDECAR_PID/stat")
        n=$(wrk -t2 -c64 -d"${SECS}s" "$URL" | requests)
        read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$SIDECAR_PID/stat")
        awk -v b="$bin" -v r="$round" -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$TICK" \
            'BEGIN { printf "%s round %d: cpu %.2f us/request (user %.2f, system %.2f), %d requests\n",
                     b, r, (u + s) * 1e6 / t / n, u * 1e6 / t / n, s * 1e6 / t / n, n }'
    done
    stop_sidecar
    if [ "$CALLGRIND" = 1 ] && command -v valgrind >/dev/null; then
        start_sidecar "$SIDECAR_PORT" "$APP_PORT" valgrind -q --tool=callgrind --callgrind-out-file="$WORK/cg.%p" "$bin" sidecar
        wrk -t1 -c8 -d2s "$URL" >/dev/null
        callgrind_control -z "$SIDECAR_PID" >/dev/null 2>&1
        n=$(wrk -t1 -c8 -d5s "$URL" | requests)
        callgrind_control -d "$SIDECAR_PID" >/dev/null 2>&1
        sleep 0.5
        ir=$(awk '/^summary:/ {print $2}' "$(ls -t "$WORK"/cg.*.1 | head -1)")
        stop_sidecar
        rm -f "$WORK"/cg.*
        awk -v b="$bin" -v n="$n" -v ir="$ir" \
            'BEGIN { printf "%s: %.0f user-space instructions/request (callgrind, %d requests)\n", b, ir / n, n }'
    fi
done
