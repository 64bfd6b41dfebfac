# The machinery of the proxy benchmarks (components/sidecar/bench/run.sh and cpu.sh,
# components/router/bench/run.sh), sourced after `cd "$ROOT"`: a scratch directory ($WORK), the
# processes they start ($PIDS) stopped on exit, and the steps both proxies are measured by
# (the bench app, `spawner sidecar`, nginx, a wrk + WebSocket echo load, memory per idle
# WebSocket). The results it leaves in $WORK are read by scripts/bench/proxy_results.py.
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    exec 3>&- 2>/dev/null || true
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Exits unless every named tool is installed; $1 names the benchmark in the message.
need_tools() {
    local bench=$1 tool; shift
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "$bench needs $tool (apt-get install nginx wrk)" >&2; exit 1; }
    done
}

# Raises the open-file limit to its hard limit and sets OPEN_FILES; lowers IDLE_WS to what it
# allows (each WebSocket through a proxy holds two descriptors there: client and upstream).
raise_open_files() {
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    OPEN_FILES=$(ulimit -n)
    if [ $((2 * IDLE_WS + 200)) -gt "$OPEN_FILES" ]; then
        echo "open-file limit $OPEN_FILES (hard; raising it needs CAP_SYS_RESOURCE): holding $(((OPEN_FILES - 200) / 2)) idle WebSockets instead of $IDLE_WS" >&2
        IDLE_WS=$(((OPEN_FILES - 200) / 2))
    fi
}

# Builds what the proxy benchmarks run, release: `spawner` (as the images run it), the bench
# app and WebSocket client of spawner-sidecar, the router's bench cluster. One cargo invocation
# for every benchmark: separate ones unify features differently and rebuild each other.
build_release() {
    cargo build --release -q -p spawner --bin spawner -p spawner-sidecar --example bench_app \
        --example bench_ws -p spawner-router --example bench_cluster
}

# Waits up to 20 s for 127.0.0.1:$1 to accept a connection; exits the script if it never does.
wait_port() {
    for _ in $(seq 1 400); do
        if (exec 9<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2
    exit 1
}

# Waits up to 120 s for a line starting with `ready` in file $1; exits the script if none comes.
wait_ready_line() {
    for _ in $(seq 1 1200); do
        grep -q '^ready' "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$1: never ready" >&2
    exit 1
}

# The bench application (examples/bench_app of spawner-sidecar) on port $1; sets APP_PID.
start_app() {
    target/release/examples/bench_app "$1" &
    APP_PID=$!; PIDS+=("$APP_PID")
    wait_port "$1"
}

# A sidecar on port $1 in front of the app on port $2, run as the rest of the arguments say
# (`target/release/spawner sidecar`, possibly under a wrapper); sets SIDECAR_PID.
start_sidecar() {
    local port=$1 upstream=$2; shift 2
    SPAWNER_SERVE_ADDRESS=127.0.0.1 SPAWNER_SERVE_PORT=$port SPAWNER_UPSTREAM_PORT=$upstream \
        RUST_LOG=warn "$@" &
    SIDECAR_PID=$!; PIDS+=("$SIDECAR_PID")
    wait_port "$port"
}

# nginx (1 worker, upstream keep-alive, a WebSocket-capable reverse proxy) on port $1 in front
# of 127.0.0.1:$2; with a third argument PREFIX it serves only /PREFIX/<name>/..., forwarded
# without that part (as the router's path mode does). Sets NGINX_PID.
start_nginx() {
    local port=$1 upstream=$2 prefix=${3:-}
    local location="location / {"
    if [ -n "$prefix" ]; then
        location="location /$prefix/ {
            rewrite ^/$prefix/[^/]+(/.*)?\$ \$1 break;"
    fi
    mkdir -p "$WORK/nginx/logs"
    cat > "$WORK/nginx/nginx.conf" <<NGINX
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile ${OPEN_FILES:-$(ulimit -n)};
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections ${OPEN_FILES:-$(ulimit -n)}; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream proxied { server 127.0.0.1:$upstream; keepalive 256; }
    server {
        listen 127.0.0.1:$port;
        $location
            proxy_pass http://proxied;
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
    wait_port "$port"
}

# Resident memory in KiB of a process and its children (nginx: master plus worker).
rss_kib() {
    local total=0 pid
    for pid in "$1" $(ps -o pid= --ppid "$1"); do
        total=$((total + $(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# One round of load on one target: HTTP (`wrk -t1`, $HTTP_CONNS connections, after a 2 s
# warm-up) and WebSocket echo ($WS_CONNS connections, 64-byte messages), each
# $SECONDS_PER_RUN seconds. Arguments: name, port, HTTP path, WebSocket address
# (host:port[/path]), round, extra wrk arguments... Leaves wrk-NAME-ROUND.txt and
# ws-NAME-ROUND.json in $WORK.
load() {
    local name=$1 port=$2 path=$3 ws=$4 round=$5; shift 5
    echo "== round $round: $name (port $port)" >&2
    wrk -t1 -c"$HTTP_CONNS" -d2s "$@" "http://127.0.0.1:$port$path" >/dev/null # warm-up
    wrk -t1 -c"$HTTP_CONNS" -d"${SECONDS_PER_RUN}s" --latency "$@" "http://127.0.0.1:$port$path" > "$WORK/wrk-$name-$round.txt"
    target/release/examples/bench_ws echo "$ws" "$WS_CONNS" "$SECONDS_PER_RUN" 64 > "$WORK/ws-$name-$round.json"
}

# Resident memory of process $3 (and its children) before and while $IDLE_WS idle WebSockets
# to $2 (host:port[/path]) are held open. Leaves mem-$1.json in $WORK.
idle_memory() {
    local name=$1 ws=$2 pid=$3
    echo "== $IDLE_WS idle WebSockets: $name" >&2
    local before after held
    before=$(rss_kib "$pid")
    mkfifo "$WORK/hold-$name"
    target/release/examples/bench_ws hold "$ws" "$IDLE_WS" < "$WORK/hold-$name" > "$WORK/hold-$name.out" &
    local holder=$!
    exec 3>"$WORK/hold-$name"
    wait_ready_line "$WORK/hold-$name.out"
    held=$(awk '/^ready/ {print $2}' "$WORK/hold-$name.out")
    sleep 2
    after=$(rss_kib "$pid")
    exec 3>&-
    wait "$holder"
    echo "{\"rss_before_kib\":$before,\"rss_idle_kib\":$after,\"idle_connections\":${held:-0}}" > "$WORK/mem-$name.json"
    sleep 3
}
