#!/usr/bin/env bash
# Builds every Spawner image from the Dockerfile, from a `spawner` binary built on this
# machine (no Rust image is pulled; docs/images.md):
#
#   spawner:TAG  spawner-controller:TAG  spawner-api:TAG  spawner-router:TAG  spawner-sweeper:TAG
#   spawner-sidecar:TAG
#
# Usage: scripts/images.sh [--binary PATH] [--tag TAG]
#   --binary PATH  the binary to put in the images (default: `cargo build --release -p spawner`
#                  and target/release/spawner)
#   --tag TAG      image tag (default: dev)
#
# Uses the engine scripts/docker-engine.sh finds or starts, and makes the base image
# (debian:bookworm-slim) with scripts/base-image.sh when the engine lacks it. Layers are
# cached by the engine's BuildKit, so a rebuild with an unchanged binary takes seconds.
# Prints each image's size at the end.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
binary=""
tag="dev"
while [ $# -gt 0 ]; do
    case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--tag TAG]" >&2; exit 2 ;;
    esac
done

log() { echo "images: $*" >&2; }

eval "$(scripts/docker-engine.sh start)"
export DOCKER_HOST

# A client that builds with BuildKit: a CLI with the buildx plugin, else Debian's docker 20.10
# CLI, which has BuildKit built in (a newer CLI without buildx would fall back to the legacy
# builder, which cannot build this Dockerfile).
if docker buildx version >/dev/null 2>&1; then
    build=(docker buildx build --load)
elif /usr/bin/docker version --format '{{.Client.Version}}' 2>/dev/null | grep -q '^20\.'; then
    build=(env DOCKER_BUILDKIT=1 /usr/bin/docker build)
else
    build=(env DOCKER_BUILDKIT=1 docker build)
fi

scripts/base-image.sh

if [ -z "$binary" ]; then
    log "cargo build --release -p spawner"
    cargo build --release -p spawner --locked
    binary="target/release/spawner"
fi
[ -x "$binary" ] || { log "no executable at $binary"; exit 1; }

# The build context holds the binary alone: the Dockerfile's `prebuilt` stage copies ./spawner.
context="$root/target/image-context"
mkdir -p "$context"
cp -p "$binary" "$context/spawner.tmp"
mv "$context/spawner.tmp" "$context/spawner"

# `spawner 0.1.0 (abcdef123456)`: the labels say what the binary says.
version_line="$("$context/spawner" --version)"
version="$(echo "$version_line" | awk '{print $2}')"
commit="$(echo "$version_line" | sed -n 's/.*(\(.*\))$/\1/p')"

started=$(date +%s)
for target in spawner controller api router sweeper sidecar; do
    name="spawner-$target"
    [ "$target" = spawner ] && name=spawner
    log "building $name:$tag"
    "${build[@]}" -q \
        --file "$root/Dockerfile" \
        --target "$target" \
        --build-arg SPAWNER_BINARY_FROM=prebuilt \
        --build-arg SPAWNER_VERSION="$version" \
        --build-arg SPAWNER_GIT_COMMIT="$commit" \
        --tag "$name:$tag" \
        "$context" >/dev/null
done
log "built in $(($(date +%s) - started)) s ($version_line)"
for name in spawner spawner-controller spawner-api spawner-router spawner-sweeper spawner-sidecar; do
    size=$(docker image inspect --format '{{.Size}}' "$name:$tag")
    awk -v n="$name:$tag" -v s="$size" 'BEGIN { printf "%-28s %6.1f MB\n", n, s / 1e6 }'
done
