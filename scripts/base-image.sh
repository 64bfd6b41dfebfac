#!/usr/bin/env bash
# Makes the Dockerfile's runtime base image, debian:bookworm-slim, without a registry:
# `debootstrap --variant=minbase` into a directory, trimmed like Debian's slim images
# (no docs, man pages or locales), packed into a tarball and `docker import`ed under the tag
# the Dockerfile expects. An engine that already has that tag (pulled from a registry on a
# user's machine) keeps its own.
#
# The tarball is cached under ${XDG_CACHE_HOME:-$HOME/.cache}/spawner/images, keyed by the
# suite and a hash of this recipe, so later runs (and a new engine) only import it again.
# SPAWNER_BASE_REFRESH=1 makes a new one (newer Debian packages).
#
# Needs: docker (DOCKER_HOST set, see scripts/docker-engine.sh), and to make a new tarball
# root and debootstrap (installed with apt-get when missing).
set -euo pipefail

SUITE=bookworm
TAG="debian:${SUITE}-slim"
MIRROR="${SPAWNER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/spawner/images"
# The recipe's hash: a change to this file makes a new tarball.
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)"
TARBALL="$CACHE_DIR/debian-$SUITE-minbase-$RECIPE.tar"

log() { echo "base-image: $*" >&2; }
docker_cli() { command -v docker >/dev/null 2>&1 && echo docker || echo /usr/bin/docker; }
DOCKER="$(docker_cli)"

if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1 && [ "${SPAWNER_BASE_REFRESH:-0}" != 1 ]; then
    log "$TAG is present in the engine"
    exit 0
fi

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/lock"
flock 9

if [ ! -s "$TARBALL" ] || [ "${SPAWNER_BASE_REFRESH:-0}" = 1 ]; then
    [ "$(id -u)" = 0 ] || { log "making $TAG needs root (debootstrap)"; exit 1; }
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >&2
    fi
    root="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    trap 'rm -rf "$root"' EXIT
    log "debootstrap --variant=minbase $SUITE (a few minutes)"
    started=$(date +%s)
    nice -n 10 debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$CACHE_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE_DIR/debootstrap.log" >&2; log "debootstrap failed (log: $CACHE_DIR/debootstrap.log)"; exit 1; }
    # Trim as Debian's slim images do, and keep it so for packages installed later.
    cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
CFG
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/* "$root"/tmp/* "$root"/root/.bash_history
    # apt in a container: no package caches left in a layer (each is tens of MB).
    cat >"$root/etc/apt/apt.conf.d/docker-slim" <<'CFG'
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Keep-Downloaded-Packages "false";
CFG
    # The image's apt reads the mirror debootstrap used.
    echo "deb $MIRROR $SUITE main" >"$root/etc/apt/sources.list"
    tar --numeric-owner --xattrs -C "$root" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
    log "made $TARBALL ($(du -m "$TARBALL" | cut -f1) MB) in $(($(date +%s) - started)) s"
fi

"$DOCKER" import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL org.opencontainers.image.description=\"debootstrap --variant=minbase $SUITE, made by spawner's scripts/base-image.sh\"" \
    "$TARBALL" "$TAG" >/dev/null
log "imported $TARBALL as $TAG"
