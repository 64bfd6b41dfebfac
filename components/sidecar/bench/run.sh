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
# BENCH_PORT_BASE (18080).
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

for tool in nginx wrk python3; do
    command -v "$tool" >/dev/null || { echo "bench-sidecar needs $tool (apt-get install nginx wrk)" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release -q -p spawner --bin spawner
cargo build --release -q -p spawner-sidecar --example bench_app --example bench_ws
BIN=target/release
OUT=target/bench
mkdir -p "$OUT"
# shellcheck source=components/sidecar/bench/common.sh
. "$ROOT/components/sidecar/bench/common.sh"

# --- the three targets ------------------------------------------------------------------------
"$BIN/examples/bench_app" "$APP_PORT" &
APP_PID=$!; PIDS+=("$APP_PID")
wait_port "$APP_PORT"

SPAWNER_SERVE_ADDRESS=127.0.0.1 SPAWNER_SERVE_PORT=$SIDECAR_PORT SPAWNER_UPSTREAM_PORT=$APP_PORT \
    RUST_LOG=warn "$BIN/spawner" sidecar &
SIDECAR_PID=$!; PIDS+=("$SIDECAR_PID")
wait_port "$SIDECAR_PORT"

mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx/nginx.conf" <<NGINX
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile 65536;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream app { server 127.0.0.1:$APP_PORT; keepalive 256; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
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

# Resident memory in KiB of a process and its children (nginx: master plus workers).
rss_kib() {
    local total=0 pid
    for pid in "$1" $(ps -o pid= --ppid "$1"); do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

load() {
    local name=$1 port=$2 round=$3
    echo "== round $round: $name (port $port)" >&2
    wrk -t1 -c"$HTTP_CONNS" -d2s "http://127.0.0.1:$port/" >/dev/null # warm-up
    wrk -t1 -c"$HTTP_CONNS" -d"${SECONDS_PER_RUN}s" --latency "http://127.0.0.1:$port/" > "$WORK/wrk-$name-$round.txt"
    "$BIN/examples/bench_ws" echo "127.0.0.1:$port" "$WS_CONNS" "$SECONDS_PER_RUN" 64 > "$WORK/ws-$name-$round.json"
}

idle_memory() {
    local name=$1 port=$2 pid=$3
    echo "== idle WebSockets: $name (port $port)" >&2
    local before after
    before=$(rss_kib "$pid")
    mkfifo "$WORK/hold-$name"
    "$BIN/examples/bench_ws" hold "127.0.0.1:$port" "$IDLE_WS" < "$WORK/hold-$name" > "$WORK/hold-$name.out" &
    local holder=$!
    exec 3>"$WORK/hold-$name"
    for _ in $(seq 1 600); do
        grep -q '^ready' "$WORK/hold-$name.out" 2>/dev/null && break
        sleep 0.1
    done
    sleep 1
    after=$(rss_kib "$pid")
    exec 3>&-
    wait "$holder"
    echo "{\"rss_before_kib\":$before,\"rss_idle_kib\":$after,\"idle_connections\":$IDLE_WS}" > "$WORK/mem-$name.json"
    sleep 2
}

# Rounds interleave the targets so a noisy moment on a shared machine does not hit only one;
# the report takes the median of the rounds.
for round in $(seq 1 "$ROUNDS"); do
    load app "$APP_PORT" "$round"
    load sidecar "$SIDECAR_PORT" "$round"
    load nginx "$NGINX_PORT" "$round"
done
idle_memory app "$APP_PORT" "$APP_PID"
idle_memory sidecar "$SIDECAR_PORT" "$SIDECAR_PID"
idle_memory nginx "$NGINX_PORT" "$NGINX_PID"

python3 "$(dirname "$0")/report.py" "$WORK" "$OUT/sidecar.json" \
    "$SECONDS_PER_RUN" "$HTTP_CONNS" "$WS_CONNS" "$IDLE_WS" "$ROUNDS"
