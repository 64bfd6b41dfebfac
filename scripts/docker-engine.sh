#!/usr/bin/env bash
# A Docker engine for the image tests and the kind cluster.
#
#   scripts/docker-engine.sh start    reuse a reachable engine, or start a private one; prints
#                                     `export DOCKER_HOST=unix://...` on stdout
#   scripts/docker-engine.sh env      prints that line for the engine in use (fails if none)
#   scripts/docker-engine.sh status   says which engine is in use and whether this script started it
#   scripts/docker-engine.sh stop     stops the private engine, and only an engine this script started
#
# Typical use: eval "$(scripts/docker-engine.sh start)"
#
# Which engine: the one DOCKER_HOST names, else this script's private engine if it is running,
# else the docker client's default (a laptop's Docker), else a new private dockerd. A private
# engine keeps its state under ${XDG_CACHE_HOME:-$HOME/.cache}/spawner/docker (data root, exec
# root, socket, pid file, log) and outlives the caller on purpose, so the image tests and the
# kind cluster share one engine and its image cache; .ci/run stops it at the end.
#
# Networks of the private engine (never Docker's default 172.17.0.0/16): the default bridge is
# 10.213.0.1/24 and user-defined networks (testcontainers', kind's) get /24s out of
# 10.213.128.0/17. Override with SPAWNER_DOCKER_BIP and SPAWNER_DOCKER_POOL.
#
# Needs root to start dockerd; installs Debian's docker.io with apt-get when dockerd is missing.
# Concurrent calls are serialised with flock on the state directory's lock file.
set -euo pipefail

STATE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/spawner/docker"
SOCKET="$STATE_DIR/docker.sock"
PIDFILE="$STATE_DIR/dockerd.pid"
LOG="$STATE_DIR/dockerd.log"
LOCK="$STATE_DIR/lock"
PRIVATE_HOST="unix://$SOCKET"
BIP="${SPAWNER_DOCKER_BIP:-10.213.0.1/24}"
POOL="${SPAWNER_DOCKER_POOL:-base=10.213.128.0/17,size=24}"
START_TIMEOUT_S=60

log() { echo "docker-engine: $*" >&2; }
die() { log "$*"; exit 1; }

# A client that speaks to any engine from API 1.41 (Docker 20.10) on: any docker CLI on PATH
# (the machine's /usr/local/bin/docker or Debian's /usr/bin/docker) negotiates the version.
client() {
    command -v docker >/dev/null 2>&1 && { command -v docker; return; }
    [ -x /usr/bin/docker ] && { echo /usr/bin/docker; return; }
    return 1
}

# Succeeds when an engine answers at $1 (a DOCKER_HOST value; empty = the client's default).
answers() {
    local docker
    docker="$(client)" || return 1
    if [ -n "$1" ]; then
        DOCKER_HOST="$1" timeout 10 "$docker" version --format '{{.Server.Version}}' >/dev/null 2>&1
    else
        (unset DOCKER_HOST; timeout 10 "$docker" version --format '{{.Server.Version}}' >/dev/null 2>&1)
    fi
}

# The pid of the private dockerd this script started, if it is still that process.
private_pid() {
    [ -f "$PIDFILE" ] || return 1
    local pid
    pid="$(cat "$PIDFILE" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    # Guard against pid reuse: the process must be a dockerd serving our socket.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "dockerd .*$SOCKET" || return 1
    echo "$pid"
}

# The DOCKER_HOST of the client's default engine (a context or /var/run/docker.sock).
default_host() {
    local docker host
    docker="$(client)" || return 1
    host="$(unset DOCKER_HOST; "$docker" context inspect --format '{{.Endpoints.docker.Host}}' 2>/dev/null)" || true
    echo "${host:-unix:///var/run/docker.sock}"
}

# Prints the DOCKER_HOST of the engine to use, without starting one.
engine_in_use() {
    if [ -n "${DOCKER_HOST:-}" ]; then
        answers "$DOCKER_HOST" && { echo "$DOCKER_HOST"; return; }
        # Our own socket named explicitly but the engine is down: let `start` bring it up.
        [ "$DOCKER_HOST" = "$PRIVATE_HOST" ] || return 1
    fi
    if private_pid >/dev/null && answers "$PRIVATE_HOST"; then
        echo "$PRIVATE_HOST"
        return
    fi
    if answers ""; then
        default_host
        return
    fi
    return 1
}

install_engine() {
    command -v dockerd >/dev/null 2>&1 && return
    [ "$(id -u)" = 0 ] || die "dockerd is missing; install Docker (Debian: apt-get install docker.io) or run as root"
    command -v apt-get >/dev/null 2>&1 || die "dockerd is missing and apt-get is not available: install Docker Engine"
    log "installing docker.io (Debian's Docker Engine)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq docker.io >&2
}

# Capability names by number (linux/capability.h), to name the ones root lacks here.
CAP_NAMES=(CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP
    LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE
    SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME
    SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP MAC_OVERRIDE MAC_ADMIN SYSLOG
    WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE)

# The capabilities the kernel knows that this process's bounding set lacks, as a JSON array
# ("CAP_SYS_RESOURCE" on our machines, whose root runs without it).
missing_caps_json() {
    local bnd last i out=""
    bnd=$((16#$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)))
    last="$(cat /proc/sys/kernel/cap_last_cap)"
    for ((i = 0; i <= last && i < ${#CAP_NAMES[@]}; i++)); do
        if (((bnd >> i) & 1)); then continue; fi
        out+="${out:+,}\"CAP_${CAP_NAMES[$i]}\""
    done
    echo "[$out]"
}

# Docker 20.10 gives a privileged container every capability the kernel knows, and runc then
# fails ("unable to apply caps: operation not permitted") where root itself lacks one, so no
# privileged container (a kind node) could start. Where root lacks some, the engine's default
# runtime is this wrapper: runc, with those capabilities taken out of each new container's
# config.json. Elsewhere the engine runs plain runc.
write_runtime_config() {
    local missing runc config="$STATE_DIR/daemon.json"
    missing="$(missing_caps_json)"
    if [ "$missing" = "[]" ]; then
        echo '{}' >"$config"
        return
    fi
    runc="$(command -v runc)" || die "runc is missing"
    command -v jq >/dev/null 2>&1 || {
        log "installing jq (the runtime wrapper edits config.json with it)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >&2
    }
    log "root lacks $missing here: containers run through $STATE_DIR/runc-bounded, which drops them"
    # The wrapper edits the spec runc reads: the bundle's config.json for `create`/`run`, the
    # --process file for `exec` (docker exec --privileged).
    cat >"$STATE_DIR/runc-bounded.tmp" <<WRAPPER
#!/bin/sh
# Written by scripts/docker-engine.sh: runc, minus the capabilities root lacks on this machine.
drop='$missing'
bundle=.
process=
command=
previous=
for arg in "\$@"; do
    case "\$previous" in
        --bundle | -b) bundle="\$arg" ;;
        --process | -p) process="\$arg" ;;
    esac
    case "\$arg" in
        --bundle=*) bundle="\${arg#--bundle=}" ;;
        --process=*) process="\${arg#--process=}" ;;
        create | run | exec) [ -n "\$command" ] || command="\$arg" ;;
    esac
    previous="\$arg"
done
bound() { # file jq-path
    filter="if \$2 then \$2 |= with_entries(.value |= ((. // []) - \\\$drop)) else . end"
    jq --argjson drop "\$drop" "\$filter" "\$1" >"\$1.bounded" && mv "\$1.bounded" "\$1"
}
case "\$command" in
    create | run) [ -f "\$bundle/config.json" ] && bound "\$bundle/config.json" .process.capabilities ;;
    exec) [ -n "\$process" ] && [ -f "\$process" ] && bound "\$process" .capabilities ;;
esac
exec $runc "\$@"
WRAPPER
    chmod 0755 "$STATE_DIR/runc-bounded.tmp"
    mv "$STATE_DIR/runc-bounded.tmp" "$STATE_DIR/runc-bounded"
    printf '{"runtimes": {"runc-bounded": {"path": "%s"}}, "default-runtime": "runc-bounded"}\n' \
        "$STATE_DIR/runc-bounded" >"$config"
}

start_private() {
    [ "$(id -u)" = 0 ] || die "no Docker engine is reachable and starting one needs root"
    install_engine
    mkdir -p "$STATE_DIR/data" "$STATE_DIR/exec"
    # A socket left by a killed engine would make dockerd refuse to start, and its exec root
    # (containerd's sockets and pid files) would point at processes that are gone: clear both
    # unless something of the old engine still runs there.
    rm -f "$SOCKET" "$PIDFILE"
    if ! pgrep -f -- "$STATE_DIR/exec" >/dev/null 2>&1; then
        rm -rf "$STATE_DIR/exec"
    fi
    mkdir -p "$STATE_DIR/exec"
    write_runtime_config
    log "starting a private dockerd on $SOCKET (log: $LOG)"
    # setsid: the engine outlives this script and its caller's process group.
    # 9>&-: the engine must not inherit the lock, or the next caller would wait forever.
    setsid dockerd \
        --config-file "$STATE_DIR/daemon.json" \
        --host "$PRIVATE_HOST" \
        --data-root "$STATE_DIR/data" \
        --exec-root "$STATE_DIR/exec" \
        --pidfile "$PIDFILE" \
        --bip "$BIP" \
        --default-address-pool "$POOL" \
        </dev/null >>"$LOG" 2>&1 9>&- &
    local waited=0
    until answers "$PRIVATE_HOST"; do
        if ! kill -0 $! 2>/dev/null; then
            tail -n 20 "$LOG" >&2
            die "dockerd exited during start-up (log above, full log: $LOG)"
        fi
        waited=$((waited + 1))
        [ "$waited" -le "$START_TIMEOUT_S" ] || die "dockerd did not answer within ${START_TIMEOUT_S}s (log: $LOG)"
        sleep 1
    done
}

cmd_start() {
    mkdir -p "$STATE_DIR"
    exec 9>"$LOCK"
    flock 9
    local host
    if ! host="$(engine_in_use)"; then
        start_private
        host="$PRIVATE_HOST"
    fi
    echo "export DOCKER_HOST=$host"
}

cmd_env() {
    local host
    host="$(engine_in_use)" || die "no Docker engine is running (start one: scripts/docker-engine.sh start)"
    echo "export DOCKER_HOST=$host"
}

cmd_status() {
    local pid host
    if pid="$(private_pid)"; then
        echo "private engine: dockerd pid $pid on $PRIVATE_HOST (state: $STATE_DIR, started by this script)"
    else
        echo "private engine: not running"
    fi
    if host="$(engine_in_use)"; then
        echo "engine in use: $host (server $(DOCKER_HOST="$host" "$(client)" version --format '{{.Server.Version}}'))"
    else
        echo "engine in use: none"
        return 1
    fi
}

cmd_stop() {
    mkdir -p "$STATE_DIR"
    exec 9>"$LOCK"
    flock 9
    local pid
    if ! pid="$(private_pid)"; then
        log "no private engine is running (an engine this script did not start is left alone)"
        return
    fi
    log "stopping dockerd pid $pid"
    kill -TERM "$pid"
    # dockerd stops its containers (10 s each by default, in parallel) before it exits.
    local waited=0
    while kill -0 "$pid" 2>/dev/null; do
        waited=$((waited + 1))
        if [ "$waited" -gt 60 ]; then
            log "dockerd pid $pid did not exit within 60s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 1
    done
    rm -f "$PIDFILE" "$SOCKET"
}

case "${1:-}" in
start) cmd_start ;;
env) cmd_env ;;
status) cmd_status ;;
stop) cmd_stop ;;
*)
    echo "usage: $0 start|env|status|stop" >&2
    exit 2
    ;;
esac
