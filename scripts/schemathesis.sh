#!/usr/bin/env bash
# Schemathesis (property-based tests of an OpenAPI document, from PyPI) against the api of a
# running `spawner dev`: every operation of /openapi.json with every check, with and without the
# token, stateful sequences following the document's links (spawn -> status, ready, stream,
# terminate) and a seeded Ready backend for /ready and /status. Any 5xx, any response or
# accepted request that disagrees with the document fails the run. docs/api.md.
#
# Usage: scripts/schemathesis.sh [max examples per operation, default 25]
# Needs python3 with venv (schemathesis and its dependencies, pinned in
# scripts/schemathesis/requirements.txt, are installed into
# ~/.cache/spawner/schemathesis/<version>-<hash of the pins> on first use) and curl; builds the debug `spawner` (SPAWNER_BIN to use another binary).
# Where python3/venv is missing the run is skipped, unless SPAWNER_REQUIRE_SCHEMATHESIS=1 (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
examples="${1:-25}"
version=4.32.5
requirements="$repo/scripts/schemathesis/requirements.txt"
# Keyed by the version and the exact pins (requirements.txt), so a change of either makes a new venv.
pins="$(sha256sum "$requirements" | cut -c1-12)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/spawner/schemathesis/$version-$pins"

skip() {
    if [ -n "${SPAWNER_REQUIRE_SCHEMATHESIS:-}" ]; then
        echo "schemathesis: $1 (SPAWNER_REQUIRE_SCHEMATHESIS is set)" >&2
        exit 1
    fi
    echo "schemathesis: skipped: $1" >&2
    exit 0
}

if [ ! -x "$venv/bin/schemathesis" ]; then
    command -v python3 >/dev/null || skip "python3 is missing"
    python3 -c 'import venv, ensurepip' 2>/dev/null || skip "python3's venv module is missing (apt-get install python3-venv)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    grep -qx "schemathesis==$version" "$requirements"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
fi

if [ -n "${SPAWNER_BIN:-}" ]; then
    spawner="$SPAWNER_BIN"
else
    cargo build -q -p spawner   # nothing to do after `cargo test --workspace`
    spawner="$repo/target/debug/spawner"
fi
work="$(mktemp -d)"
dev_pid=""
cleanup() {
    if [ -n "$dev_pid" ]; then
        kill -INT "$dev_pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$dev_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
api_port="$(free_port)"
router_port="$(free_port)"
token="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
api="http://127.0.0.1:$api_port"

# Finished backends are deleted 5 s after they end: hundreds are spawned in a run.
SPAWNER_TOKEN="$token" "$spawner" dev --api-listen "127.0.0.1:$api_port" \
    --router-listen "127.0.0.1:$router_port" --retention-seconds 5 \
    --state-dir "$work/state" >"$work/dev.log" 2>&1 &
dev_pid=$!

call() { # method path [body] -> prints the body; fails on a non-2xx answer
    curl -sS --fail-with-body --max-time 30 -X "$1" -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/json' ${3:+--data "$3"} "$api$2"
}
for _ in $(seq 1 300); do
    curl -sf --max-time 2 "$api/healthz" >/dev/null 2>&1 && break
    kill -0 "$dev_pid" 2>/dev/null || { cat "$work/dev.log" >&2; echo "schemathesis: spawner dev exited" >&2; exit 1; }
    sleep 0.2
done
curl -sf --max-time 2 "$api/healthz" >/dev/null || { cat "$work/dev.log" >&2; echo "schemathesis: spawner dev did not start" >&2; exit 1; }

# A Ready backend for /ready (302) and /status; the generated ones end at once.
seeded="$(call POST /spawn "{\"command\": [\"$spawner\", \"demo-backend\"], \"gracePeriodSeconds\": 3600}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["name"])')"
for _ in $(seq 1 300); do
    phase="$(call GET "/backend/$seeded/status" | python3 -c 'import json, sys; print(json.load(sys.stdin)["phase"])')"
    [ "$phase" = Ready ] && break
    sleep 0.2
done
[ "$phase" = Ready ] || { echo "schemathesis: the seeded backend is $phase, not Ready" >&2; exit 1; }
echo "schemathesis $version against $api (seeded backend $seeded; $examples examples per operation)"

# The seeded backend is given to /ready and /status as one of the ids they get; the
# terminate operation never gets it (it is reached through the links of /spawn and /connect).
config="$work/schemathesis.toml"
cp scripts/schemathesis/schemathesis.toml "$config"
cat >>"$config" <<TOML

[[operations]]
include-operation-id = ["ready", "status"]
parameters = { "path.id" = "$seeded" }
TOML

started=$(date +%s)
status=0
# From the scratch directory: hypothesis keeps caches in the working directory.
cd "$work"
SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$repo/scripts/schemathesis" \
    "$venv/bin/schemathesis" --config-file "$config" --no-color run "$api/openapi.json" \
    --header "Authorization: Bearer $token" --max-examples "$examples" --seed 18 \
    --workers 2 --report junit --report-dir "$work/report" || status=$?
echo "schemathesis: $(( $(date +%s) - started )) s"
if [ "$status" -ne 0 ]; then
    echo "schemathesis: failed; spawner dev's log ends:" >&2
    tail -n 30 "$work/dev.log" >&2
fi
exit "$status"
