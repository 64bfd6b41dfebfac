#!/usr/bin/env bash
# Sidecar benchmark: the same load against the application directly, the sidecar as the images
# run it (`spawner sidecar`, release build), and nginx (Debian package, one worker, upstream
# keep-alive, configured as a WebSocket-capable reverse proxy) in front of the same app.
#
#   components/sidecar/bench/run.sh        (from anywhere in the repository; `just bench-sidecar`)
#
# Needs `nginx` and `wrk` (apt-get install nginx wrk). Writes target/bench/sidecar.json and
# prints a Markdown table. Knobs: BENCH_SECONDS (10), BENCH_CONNECTIONS (64, HTTP),
# BENCH_WS_CONNECTIONS (32, echo), BENCH_IDLE_WS (5000, memory), BENCH_ROUNDS (3),
# BENCH_PORT_BASE (18080). The machinery it shares with the router's benchmark:
# scripts/bench/proxy.sh and proxy_results.py.
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
HTTP_CONNS=${BENCH_CONNECTIONS:-64}
WS_CONNS=${BENCH_WS_CONNECTIONS:-32}
IDLE_WS=${BENCH_IDLE_WS:-5000}
ROUNDS=${BENCH_ROUNDS:-3}
BASE=${BENCH_PORT_BASE:-18080}
APP_PORT=$BASE
SIDECAR_PORT=$((BASE + 10))
NGINX_PORT=$((BASE + 11))

# shellcheck source=scripts/bench/proxy.sh
. "$ROOT/scripts/bench/proxy.sh"
need_tools bench-sidecar nginx wrk python3
raise_open_files

build_release
OUT=target/bench
mkdir -p "$OUT"

# --- the three targets ------------------------------------------------------------------------
start_app "$APP_PORT"
start_sidecar "$SIDECAR_PORT" "$APP_PORT" target/release/spawner sidecar
start_nginx "$NGINX_PORT" "$APP_PORT"

# Rounds interleave the targets so a noisy moment on a shared machine does not hit only one;
# the report takes the median of the rounds.
for round in $(seq 1 "$ROUNDS"); do
    load app "$APP_PORT" / "127.0.0.1:$APP_PORT" "$round"
    load sidecar "$SIDECAR_PORT" / "127.0.0.1:$SIDECAR_PORT" "$round"
    load nginx "$NGINX_PORT" / "127.0.0.1:$NGINX_PORT" "$round"
done
idle_memory app "127.0.0.1:$APP_PORT" "$APP_PID"
idle_memory sidecar "127.0.0.1:$SIDECAR_PORT" "$SIDECAR_PID"
idle_memory nginx "127.0.0.1:$NGINX_PORT" "$NGINX_PID"

python3 "$(dirname "$0")/report.py" "$WORK" "$OUT/sidecar.json" \
    "$SECONDS_PER_RUN" "$HTTP_CONNS" "$WS_CONNS" "$IDLE_WS" "$ROUNDS"
