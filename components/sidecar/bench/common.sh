# Sourced by run.sh and cpu.sh: a scratch directory ($WORK), the processes they start ($PIDS)
# stopped on exit, and waiting for a port to accept connections.
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

# Waits up to 20 s for 127.0.0.1:$1 to accept a connection; exits the script if it never does.
wait_port() {
    for _ in $(seq 1 400); do
        if (exec 9<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "port $1 never opened" >&2
    exit 1
}
