#!/usr/bin/env bash
# Router benchmark (`just bench-router`): side by side in one run, in front of the same
# upstream (the sidecar bench's app behind `spawner sidecar`):
#   - the application directly, the sidecar alone,
#   - `spawner router` (release binary, as the images run it; path mode, a session cookie on
#     every request, as browsers send) -> sidecar,
#   - the same router recording a session trace (--record-trace),
#   - nginx (Debian package, 1 worker, upstream keep-alive) -> sidecar, on the same path.
# Then: memory per idle WebSocket through the router and through nginx, and the router's
# lookup cost with 10 and with 10,000 backends in its cache (a localcluster API server,
# components/router/examples/bench_cluster.rs, holds them).
#
#   components/router/bench/run.sh      (from anywhere in the repository)
#
# Needs `nginx` and `wrk`. Writes target/bench/router.json and prints Markdown tables. The
# machinery it shares with the sidecar's benchmark: scripts/bench/proxy.sh and proxy_results.py.
# Knobs: BENCH_SECONDS (10), BENCH_CONNECTIONS (64), BENCH_WS_CONNECTIONS (32),
# BENCH_IDLE_WS (10000, lowered to what the open-file limit allows), BENCH_ROUNDS (3),
# BENCH_BIG_CACHE (10000), BENCH_PORT_BASE (19080).
set -euo pipefail

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
cd "$ROOT"
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
HTTP_CONNS=${BENCH_CONNECTIONS:-64}
WS_CONNS=${BENCH_WS_CONNECTIONS:-32}
IDLE_WS=${BENCH_IDLE_WS:-10000}
ROUNDS=${BENCH_ROUNDS:-3}
BIG_CACHE=${BENCH_BIG_CACHE:-10000}
BASE=${BENCH_PORT_BASE:-19080}
APP_PORT=$BASE
SIDECAR_PORT=$((BASE + 10))
NGINX_PORT=$((BASE + 11))
ROUTER_PORT=$((BASE + 12))
TRACED_PORT=$((BASE + 13))
BIG_PORT=$((BASE + 14))
SECRET=bench-connect-key-0123456789abcdef
PREFIX=b

# shellcheck source=scripts/bench/proxy.sh
. "$ROOT/scripts/bench/proxy.sh"
need_tools bench-router nginx wrk python3 curl
raise_open_files

build_release
BIN=target/release
OUT=target/bench
mkdir -p "$OUT"

start_app "$APP_PORT"
start_sidecar "$SIDECAR_PORT" "$APP_PORT" "$BIN/spawner" sidecar

# A localcluster with `$1` Ready backends at the sidecar; sets COOKIE and KUBECONFIG_FILE.
start_cluster() {
    local backends=$1 name=$2
    KUBECONFIG_FILE="$WORK/kubeconfig-$name"
    mkfifo "$WORK/cluster-$name"
    "$BIN/examples/bench_cluster" "$KUBECONFIG_FILE" "$backends" "127.0.0.1:$SIDECAR_PORT" "$SECRET" \
        < "$WORK/cluster-$name" > "$WORK/cluster-$name.out" &
    PIDS+=("$!")
    # Keep its stdin open until the script ends.
    exec {fd}>"$WORK/cluster-$name"
    wait_ready_line "$WORK/cluster-$name.out"
    COOKIE=$(awk '/^ready/ {print $2}' "$WORK/cluster-$name.out")
    [ -n "$COOKIE" ] || { echo "bench cluster $name never got ready" >&2; exit 1; }
}

# `spawner router` on port $1 reading the cluster's backends; extra flags after.
start_router() {
    local port=$1; shift
    KUBECONFIG=$KUBECONFIG_FILE SPAWNER_ROUTER_LISTEN=127.0.0.1:$port RUST_LOG=warn \
        "$BIN/spawner" router --path-prefix "$PREFIX" --connect-key "bench:$SECRET" "$@" &
    ROUTER_PID=$!; PIDS+=("$ROUTER_PID")
    wait_port "$port"
    # Ready once the cache is synced.
    for _ in $(seq 1 600); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "router on $port never synced its cache" >&2
    exit 1
}

start_cluster 10 small
start_router "$ROUTER_PORT"
MAIN_ROUTER_PID=$ROUTER_PID
start_router "$TRACED_PORT" --record-trace "$WORK/trace.jsonl" --trace-key bench-trace-key \
    --trace-rotate-bytes 0
TRACED_ROUTER_PID=$ROUTER_PID

start_nginx "$NGINX_PORT" "$SIDECAR_PORT" "$PREFIX"

COOKIE_HEADER="Cookie: spawner_session=$COOKIE"
PRIVATE="/$PREFIX/sb-bench-0/"
PUBLIC_WS="$PREFIX/sb-bench-1"
# Rounds interleave the targets so a noisy moment on a shared machine does not hit only one.
for round in $(seq 1 "$ROUNDS"); do
    load app "$APP_PORT" / "127.0.0.1:$APP_PORT" "$round"
    load sidecar "$SIDECAR_PORT" / "127.0.0.1:$SIDECAR_PORT" "$round"
    load router "$ROUTER_PORT" "$PRIVATE" "127.0.0.1:$ROUTER_PORT/$PUBLIC_WS" "$round" -H "$COOKIE_HEADER"
    load router-traced "$TRACED_PORT" "$PRIVATE" "127.0.0.1:$TRACED_PORT/$PUBLIC_WS" "$round" -H "$COOKIE_HEADER"
    load nginx "$NGINX_PORT" "$PRIVATE" "127.0.0.1:$NGINX_PORT/$PUBLIC_WS" "$round"
done

idle_memory router "127.0.0.1:$ROUTER_PORT/$PUBLIC_WS" "$MAIN_ROUTER_PID"
idle_memory nginx "127.0.0.1:$NGINX_PORT/$PUBLIC_WS" "$NGINX_PID"

# Lookup cost: the same load through a router whose cache holds 10,000 backends, interleaved
# with the 10-backend router (still running).
# The traced router writes what it buffered when it stops.
kill "$TRACED_ROUTER_PID" 2>/dev/null || true
wait "$TRACED_ROUTER_PID" 2>/dev/null || true
TRACE_LINES=$(wc -l < "$WORK/trace.jsonl")
rm -f "$WORK/trace.jsonl"
start_cluster "$BIG_CACHE" big
start_router "$BIG_PORT"
for round in $(seq 1 "$ROUNDS"); do
    load router-10 "$ROUTER_PORT" "$PRIVATE" "127.0.0.1:$ROUTER_PORT/$PUBLIC_WS" "$round" -H "$COOKIE_HEADER"
    load router-big "$BIG_PORT" "$PRIVATE" "127.0.0.1:$BIG_PORT/$PUBLIC_WS" "$round" -H "$COOKIE_HEADER"
done

python3 "$(dirname "$0")/report.py" "$WORK" "$OUT/router.json" \
    "$SECONDS_PER_RUN" "$HTTP_CONNS" "$WS_CONNS" "$ROUNDS" "$BIG_CACHE" "$TRACE_LINES"
