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
# Needs `nginx` and `wrk`. Writes target/bench/router.json and prints Markdown tables.
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

for tool in nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "bench-router needs $tool (apt-get install nginx wrk)" >&2; exit 1; }
done
# Each WebSocket through a proxy holds two descriptors there (client and upstream).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
LIMIT=$(ulimit -n)
if [ $((2 * IDLE_WS + 200)) -gt "$LIMIT" ]; then
    echo "open-file limit $LIMIT (hard; raising it needs CAP_SYS_RESOURCE): holding $(((LIMIT - 200) / 2)) idle WebSockets instead of $IDLE_WS" >&2
    IDLE_WS=$(((LIMIT - 200) / 2))
fi

# One cargo invocation: separate ones unify features differently and rebuild each other.
cargo build --release -q -p spawner --bin spawner -p spawner-sidecar --example bench_app \
    --example bench_ws -p spawner-router --example bench_cluster
BIN=target/release
OUT=target/bench
mkdir -p "$OUT"
# shellcheck source=components/sidecar/bench/common.sh
. "$ROOT/components/sidecar/bench/common.sh"

"$BIN/examples/bench_app" "$APP_PORT" &
APP_PID=$!; PIDS+=("$APP_PID")
wait_port "$APP_PORT"

SPAWNER_SERVE_ADDRESS=127.0.0.1 SPAWNER_SERVE_PORT=$SIDECAR_PORT SPAWNER_UPSTREAM_PORT=$APP_PORT \
    RUST_LOG=warn "$BIN/spawner" sidecar &
SIDECAR_PID=$!; PIDS+=("$SIDECAR_PID")
wait_port "$SIDECAR_PORT"

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
    for _ in $(seq 1 1200); do
        grep -q '^ready' "$WORK/cluster-$name.out" 2>/dev/null && break
        sleep 0.1
    done
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

mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<NGINX
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile $LIMIT;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 30000; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream sidecar { server 127.0.0.1:$SIDECAR_PORT; keepalive 256; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location /$PREFIX/ {
            rewrite ^/$PREFIX/[^/]+(/.*)?\$ \$1 break;
            proxy_pass http://sidecar;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_read_timeout 3600s;
        }
    }
}
NGINX
nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
NGINX_PID=$!; PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT"

# Resident memory in KiB of a process and its children (nginx: master plus worker).
rss_kib() {
    local total=0 pid
    for pid in "$1" $(ps -o pid= --ppid "$1"); do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# name, port, HTTP path, WebSocket address (host:port[/path]), round, extra wrk arguments...
load() {
    local name=$1 port=$2 path=$3 ws=$4 round=$5; shift 5
    echo "== round $round: $name (port $port)" >&2
    wrk -t1 -c"$HTTP_CONNS" -d2s "$@" "http://127.0.0.1:$port$path" >/dev/null # warm-up
    wrk -t1 -c"$HTTP_CONNS" -d"${SECONDS_PER_RUN}s" --latency "$@" "http://127.0.0.1:$port$path" > "$WORK/wrk-$name-$round.txt"
    "$BIN/examples/bench_ws" echo "$ws" "$WS_CONNS" "$SECONDS_PER_RUN" 64 > "$WORK/ws-$name-$round.json"
}

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

idle_memory() {
    local name=$1 ws=$2 pid=$3
    echo "== $IDLE_WS idle WebSockets: $name" >&2
    local before after
    before=$(rss_kib "$pid")
    mkfifo "$WORK/hold-$name"
    "$BIN/examples/bench_ws" hold "$ws" "$IDLE_WS" < "$WORK/hold-$name" > "$WORK/hold-$name.out" &
    local holder=$!
    exec 3>"$WORK/hold-$name"
    for _ in $(seq 1 1200); do
        grep -q '^ready' "$WORK/hold-$name.out" 2>/dev/null && break
        sleep 0.1
    done
    local held
    held=$(awk '/^ready/ {print $2}' "$WORK/hold-$name.out")
    sleep 2
    after=$(rss_kib "$pid")
    exec 3>&-
    wait "$holder"
    echo "{\"rss_before_kib\":$before,\"rss_idle_kib\":$after,\"idle_connections\":${held:-0}}" > "$WORK/mem-$name.json"
    sleep 3
}
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
