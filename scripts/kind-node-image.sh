#!/usr/bin/env bash
# Builds kind and a kind node image from source, offline except for the Go module proxy and
# Debian's packages, the way `kind build node-image` does but without its image pulls:
#   1. kind itself (go install sigs.k8s.io/kind@$KIND_VERSION),
#   2. the Kubernetes binaries of the version e2e/controlplane/go.mod pins: kube-apiserver,
#      kube-controller-manager and etcd by e2e/controlplane/build.sh; kubelet, kubeadm,
#      kube-proxy, kube-scheduler and kubectl from e2e/kind/go.mod (same versions, same build
#      cache); CoreDNS from its Go module; pause from the Kubernetes module's C source,
#   3. a base root file system made with debootstrap (Debian's systemd, containerd, runc, CNI
#      plugins, iptables: what kind's images/base installs) plus kind's own files for it (its
#      entrypoint, systemd units, containerd config, taken from the kind module),
#   4. the images kubeadm and kind's manifests need, under the exact names they use, imported
#      into the node's containerd (ctr images import), then `docker commit`.
# Everything is cached under ${XDG_CACHE_HOME:-$HOME/.cache}/spawner/kind keyed by version, and
# the node image is tagged with a hash of its inputs, so a warm run only checks that it exists.
#
# Usage: scripts/kind-node-image.sh [build | --print-image | --print-kind | --dry-run]
#   build          (default) build what is missing; prints the node image name on stdout
#   --print-image  print the node image name and exit
#   --print-kind   print the path of the kind binary and exit
#   --dry-run      print the commands a cold build runs, run nothing
#
# Needs: go, cc (static libc), debootstrap, docker (DOCKER_HOST from scripts/docker-engine.sh).
# Environment: SPAWNER_KIND_JOBS (go build -p, default 2), SPAWNER_KIND_DEBIAN_MIRROR.
set -euo pipefail

KIND_VERSION=v0.33.0
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR="${SPAWNER_KIND_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What kind's images/base Dockerfile installs, with Debian's containerd, runc and CNI plugins
# in place of its own builds (bookworm's systemd still boots on a cgroup v1 host; trixie's
# does not).
PACKAGES=systemd,systemd-sysv,dbus,containerd,runc,containernetworking-plugins,conntrack,iptables,nftables,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps,socat,ebtables

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/spawner/kind"
jobs="${SPAWNER_KIND_JOBS:-2}"
kube_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$root/e2e/kind/go.mod")"
cp_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$root/e2e/controlplane/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$root/e2e/controlplane/go.mod")"
# CoreDNS: the version kubeadm of the pinned Kubernetes deploys (constants.CoreDNSVersion), with
# only the plugins of kubeadm's Corefile (e2e/kind/coredns/main.go).
coredns_version="$(awk '$1 == "require" && $2 == "github.com/coredns/coredns" { print $3; exit }' "$root/e2e/kind/coredns/go.mod")"
if [[ -z "$kube_version" || "$kube_version" != "$cp_version" || -z "$etcd_version" || -z "$coredns_version" ]]; then
    echo "kind-node-image: e2e/kind/go.mod and e2e/controlplane/go.mod must pin one Kubernetes version" >&2
    exit 2
fi
kind_bin="$cache/kind-$KIND_VERSION/kind"
# The node image's name changes with every input: this script, the CNI manifest, the versions.
inputs_hash="$(cat "${BASH_SOURCE[0]}" "$root/e2e/kind/default-cni.yaml" "$root/e2e/kind/go.sum" \
    "$root/e2e/controlplane/go.sum" "$root/e2e/kind/coredns/main.go" "$root/e2e/kind/coredns/go.sum" \
    | sha256sum | cut -c1-12)"
coredns_hash="$(cat "$root/e2e/kind/coredns/main.go" "$root/e2e/kind/coredns/go.sum" | sha256sum | cut -c1-12)"
node_image="spawner.dev/kind-node:$kube_version-$inputs_hash"

case "${1:-build}" in
    --print-image) echo "$node_image"; exit 0 ;;
    --print-kind) echo "$kind_bin"; exit 0 ;;
    --dry-run) dry_run=1 ;;
    build) dry_run=0 ;;
    *) echo "usage: $0 [build | --print-image | --print-kind | --dry-run]" >&2; exit 2 ;;
esac

# Only the image name goes to stdout (callers capture it); every tool's output goes to stderr.
exec 3>&1 1>&2
log() { echo "kind-node-image: $*" >&2; }
# Runs a command, or prints it in a dry run.
run() {
    if [[ $dry_run -eq 1 ]]; then
        { printf '+'; printf ' %q' "$@"; printf '\n'; } >&3
    else
        "$@"
    fi
}
step_start=0
step() { step_start=$(date +%s); log "$*"; }
step_done() { log "  done in $(($(date +%s) - step_start))s"; }

mkdir -p "$cache"
if command -v flock >/dev/null 2>&1 && [[ $dry_run -eq 0 ]]; then
    exec 8>"$cache/.build.lock"
    flock 8
fi

if [[ $dry_run -eq 0 ]] && docker image inspect "$node_image" >/dev/null 2>&1 && [[ -x "$kind_bin" ]]; then
    log "$node_image and kind $KIND_VERSION are already built"
    echo "$node_image" >&3
    exit 0
fi

for tool in go cc debootstrap docker; do
    command -v "$tool" >/dev/null || { log "$tool is required"; exit 3; }
done
export CGO_ENABLED=0 GOMAXPROCS="${GOMAXPROCS:-$jobs}"
gomodcache="$(go env GOMODCACHE)"

# --- 1. kind -------------------------------------------------------------------------------
if [[ ! -x "$kind_bin" ]]; then
    step "[1/6] kind $KIND_VERSION (go install)"
    staging="$cache/.kind-$KIND_VERSION.tmp"
    run rm -rf "$staging"
    run env GOBIN="$staging" go install -trimpath -ldflags=-s\ -w "sigs.k8s.io/kind@$KIND_VERSION"
    run mv -T "$staging" "$(dirname "$kind_bin")"
    step_done
fi
kind_files="$gomodcache/sigs.k8s.io/kind@$KIND_VERSION/images/base/files"
run go mod download "sigs.k8s.io/kind@$KIND_VERSION"

# --- 2. Kubernetes, CoreDNS, pause ----------------------------------------------------------
step "[2/6] control plane binaries (e2e/controlplane/build.sh)"
run "$root/e2e/controlplane/build.sh"
cp_bin="$("$root/e2e/controlplane/build.sh" --print-dir)"
step_done

node_bin="$cache/node-$kube_version/bin"
# The sandbox image: the Kubernetes module's pause, tagged as its build/pause/Makefile tags it.
pause_src="$gomodcache/k8s.io/kubernetes@$kube_version/build/pause"
run go mod download "k8s.io/kubernetes@$kube_version"
pause_version="$(awk '$1 == "TAG" && $2 == "?=" { print $3; exit }' "$pause_src/Makefile" 2>/dev/null || true)"
[[ -n "$pause_version" || $dry_run -eq 1 ]] || { log "no pause version in $pause_src/Makefile"; exit 2; }
node_binaries=(kubelet kubeadm kube-proxy kube-scheduler kubectl)
missing=0
for b in "${node_binaries[@]}" pause; do [[ -x "$node_bin/$b" ]] || missing=1; done
if [[ $missing -eq 1 ]]; then
    step "[3/6] kubelet, kubeadm, kube-proxy, kube-scheduler, kubectl $kube_version; pause"
    minor="${kube_version#v1.}"
    minor="${minor%%.*}"
    # The same flags as e2e/controlplane/build.sh, so shared packages come from the build cache.
    ldflags="-s -w"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
        ldflags+=" -X $pkg.gitTreeState=clean"
    done
    staging="$cache/.node-$kube_version.tmp"
    run rm -rf "$staging"
    run mkdir -p "$staging"
    (
        cd "$root/e2e/kind"
        run env GOFLAGS="-trimpath -mod=readonly" go build -p "$jobs" -ldflags="$ldflags" -o "$staging/" \
            k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kubeadm k8s.io/kubernetes/cmd/kube-proxy \
            k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
    )
    # pause: the Kubernetes module's own C source, built as its build/pause/Makefile does.
    run cc -Os -Wall -Werror -static "-DVERSION=v$pause_version-$kube_version" \
        -o "$staging/pause" "$pause_src/linux/pause.c"
    run mkdir -p "$(dirname "$node_bin")"
    run rm -rf "$node_bin"
    run mv -T "$staging" "$node_bin"
    step_done
fi

coredns_bin="$cache/coredns-$coredns_version-$coredns_hash/coredns"
if [[ ! -x "$coredns_bin" ]]; then
    step "[4/6] CoreDNS $coredns_version with kubeadm's plugins (e2e/kind/coredns)"
    staging="$cache/.coredns.tmp"
    run rm -rf "$staging"
    run mkdir -p "$staging"
    (
        cd "$root/e2e/kind/coredns"
        run env GOFLAGS="-trimpath -mod=readonly" go build -p "$jobs" -ldflags="-s -w" -o "$staging/coredns" .
    )
    run mv -T "$staging" "$(dirname "$coredns_bin")"
    step_done
fi

# --- 3. the base root file system ------------------------------------------------------------
packages_hash="$(echo "$DEBIAN_SUITE $PACKAGES" | sha256sum | cut -c1-12)"
rootfs_tar="$cache/rootfs-$DEBIAN_SUITE-$packages_hash.tar"
if [[ ! -f "$rootfs_tar" ]]; then
    step "[5/6] debootstrap $DEBIAN_SUITE with kind's packages"
    staging="$cache/.rootfs.tmp"
    run rm -rf "$staging"
    run debootstrap --variant=minbase "--include=$PACKAGES" "$DEBIAN_SUITE" "$staging" "$DEBIAN_MIRROR"
    run rm -rf "$staging/var/cache/apt/archives"/*.deb "$staging/var/lib/apt/lists"/*
    run tar -C "$staging" --numeric-owner -cf "$rootfs_tar.tmp" .
    run mv "$rootfs_tar.tmp" "$rootfs_tar"
    run rm -rf "$staging"
    step_done
fi

# --- 4. the node image -------------------------------------------------------------------------
step "[6/6] node image $node_image"
work="$(mktemp -d)"
build_container=""
cleanup() {
    [[ -n "$build_container" ]] && docker rm -f -v "$build_container" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

# The node's file system: the base plus what kind's Dockerfile adds, and the binaries in the
# places `kind build node-image` puts them (/usr/bin).
rootfs="$work/rootfs"
run mkdir -p "$rootfs"
run tar -C "$rootfs" --numeric-owner -xf "$rootfs_tar"
run cp -r "$kind_files/usr/local/bin/." "$rootfs/usr/local/bin/"
run mkdir -p "$rootfs/kind/bin" "$rootfs/etc/kubernetes/manifests" "$rootfs/kind/manifests" "$rootfs/opt/cni/bin"
run cp -r "$kind_files/kind/bin/." "$rootfs/kind/bin/"
run cp "$kind_files/etc/crictl.yaml" "$rootfs/etc/"
run cp -r "$kind_files/etc/containerd" "$kind_files/etc/default" "$kind_files/etc/sysctl.d" "$rootfs/etc/"
run cp -r "$kind_files/etc/systemd/system/." "$rootfs/etc/systemd/system/"
run chmod -R u+w,go-w "$rootfs/usr/local/bin" "$rootfs/kind" "$rootfs/etc/systemd/system" "$rootfs/etc/containerd"
run chmod 0755 "$rootfs/usr/local/bin/"* "$rootfs/kind/bin/"*
# Debian installs containerd in /usr/bin and the CNI plugins in /usr/lib/cni; kind's units and
# containerd's defaults look in /usr/local/bin and /opt/cni/bin. No fuse-overlayfs here (it is
# only for rootless hosts): drop its proxy plugin and unit.
run ln -sf /usr/bin/containerd "$rootfs/usr/local/bin/containerd"
run cp -a "$rootfs/usr/lib/cni/." "$rootfs/opt/cni/bin/"
run rm -f "$rootfs/etc/systemd/system/containerd-fuse-overlayfs.service"
# restrict_oom_score_adj: where root lacks CAP_SYS_RESOURCE (our machines), systemd cannot give
# containerd its -999 and runc cannot lower a container's score (every pod sandbox failed with
# "can't get final child's PID from pipe"); restricted, containerd never asks for a score below
# its own, which changes nothing where it does run at -999.
run sed -i -e '/^\[proxy_plugins\]/,/^$/d' -e "s#registry.k8s.io/pause:[0-9.]*#registry.k8s.io/pause:$pause_version#" \
    -e 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$rootfs/etc/containerd/config.toml"
# As `kind build node-image`: kubeadm, kubelet and kubectl on the node; the rest run as images.
for b in kubeadm kubelet kubectl; do run install -m 0755 "$node_bin/$b" "$rootfs/usr/bin/$b"; done
if [[ $dry_run -eq 0 ]]; then echo "$kube_version" >"$rootfs/kind/version"; fi
if [[ $dry_run -eq 0 ]]; then
    sed "s#KUBE_VERSION#$kube_version#" "$root/e2e/kind/default-cni.yaml" >"$rootfs/kind/manifests/default-cni.yaml"
fi
# What kind's Dockerfile runs in the base image.
run chroot "$rootfs" /bin/bash -euc '
    find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete
    rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \
        /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \
        /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/*
    echo "ReadKMsg=no" >> /etc/systemd/journald.conf
    ln -sf /usr/lib/systemd/systemd /sbin/init
    systemctl enable kubelet.service containerd.service undo-mount-hacks.service
    systemctl mask systemd-binfmt.service
    ctr oci spec \
        | jq ".hooks.createContainer[.hooks.createContainer| length] |= . + {\"path\": \"/kind/bin/mount-product-files.sh\"}" \
        | jq "del(.process.rlimits)" > /etc/containerd/cri-base.json'
base_image="spawner.dev/kind-node-base:$kube_version-$inputs_hash"
run sh -c "tar -C '$rootfs' --numeric-owner -c . | docker import - '$base_image'"

# The images the node runs, each a docker image saved as an archive for `ctr images import`.
# Static binaries on an empty image, as the official ones are on distroless; kube-proxy needs
# iptables, so it (and the CNI DaemonSet, which needs ip and kubectl) runs on the node's base.
images_dir="$work/images"
run mkdir -p "$images_dir"
component_images=()
static_image() { # name binary-path entrypoint-or-empty
    local name="$1" binary="$2" entrypoint="$3" ctx
    ctx="$work/ctx-$(basename "$binary")"
    run mkdir -p "$ctx/usr/local/bin" "$ctx/tmp" "$ctx/etc/ssl/certs"
    run cp "$binary" "$ctx/usr/local/bin/"
    component_images+=("$name")
    local changes=(--change 'ENV PATH=/usr/local/bin:/usr/bin:/bin')
    [[ -n "$entrypoint" ]] && changes+=(--change "ENTRYPOINT [\"$entrypoint\"]")
    run sh -c "tar -C '$ctx' --owner=0 --group=0 -c . | docker import $(printf '%q ' "${changes[@]}") - '$name'"
    run sh -c "docker save '$name' >'$images_dir/$(basename "$binary").tar'"
}
static_image "registry.k8s.io/kube-apiserver:$kube_version" "$cp_bin/kube-apiserver" ""
static_image "registry.k8s.io/kube-controller-manager:$kube_version" "$cp_bin/kube-controller-manager" ""
static_image "registry.k8s.io/kube-scheduler:$kube_version" "$node_bin/kube-scheduler" ""
static_image "registry.k8s.io/etcd:${etcd_version#v}-0" "$cp_bin/etcd" ""
static_image "registry.k8s.io/coredns/coredns:$coredns_version" "$coredns_bin" /usr/local/bin/coredns
static_image "registry.k8s.io/pause:$pause_version" "$node_bin/pause" /usr/local/bin/pause
# kube-proxy and the CNI DaemonSet (default-cni.yaml) run on the Debian base less what only a
# node needs (containerd, runc, CNI plugins, systemd, perl, docs): they need bash, iptables,
# conntrack and ip. kube-proxy starts through a wrapper that picks the iptables mode with more
# rules on the node, as kind's entrypoint does for the node itself.
tools_root="$work/tools-rootfs"
run mkdir -p "$tools_root"
run tar -C "$tools_root" --numeric-owner -xf "$rootfs_tar"
run sh -c "cd '$tools_root' && rm -rf usr/bin/containerd* usr/bin/ctr usr/sbin/runc usr/lib/cni \
    usr/share/doc usr/share/man usr/share/info usr/share/locale usr/bin/perl* usr/share/perl* \
    usr/lib/x86_64-linux-gnu/perl* lib/systemd usr/lib/systemd usr/bin/systemd* \
    usr/lib/x86_64-linux-gnu/systemd var/lib/apt var/cache/*"
run install -m 0755 "$node_bin/kube-proxy" "$tools_root/usr/local/bin/kube-proxy.bin"
run install -m 0755 "$node_bin/kubectl" "$tools_root/usr/local/bin/kubectl"
if [[ $dry_run -eq 0 ]]; then
    cat >"$tools_root/usr/local/bin/kube-proxy" <<'WRAPPER'
#!/bin/sh
# kube-proxy in the node's iptables mode: the one with more rules (kind's entrypoint's choice).
legacy=$( (iptables-legacy-save; ip6tables-legacy-save) 2>/dev/null | grep -c '^-')
nft=$( (timeout 5 sh -c 'iptables-nft-save; ip6tables-nft-save') 2>/dev/null | grep -c '^-')
mode=nft
[ "$legacy" -ge "$nft" ] && mode=legacy
update-alternatives --set iptables "/usr/sbin/iptables-$mode" >/dev/null
update-alternatives --set ip6tables "/usr/sbin/ip6tables-$mode" >/dev/null
exec /usr/local/bin/kube-proxy.bin "$@"
WRAPPER
    chmod 0755 "$tools_root/usr/local/bin/kube-proxy"
fi
run sh -c "tar -C '$tools_root' --numeric-owner -c . | docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - 'registry.k8s.io/kube-proxy:$kube_version'"
run docker tag "registry.k8s.io/kube-proxy:$kube_version" "spawner.dev/kind-node-tools:$kube_version"
run sh -c "docker save 'registry.k8s.io/kube-proxy:$kube_version' 'spawner.dev/kind-node-tools:$kube_version' >'$images_dir/node-tools.tar'"

# Import them into the node's containerd as `kind build node-image` does, then commit.
build_container="spawner-kind-build-$$"
run docker run -d --name "$build_container" --entrypoint=sleep --security-opt seccomp=unconfined \
    -v "$images_dir:/images:ro" "$base_image" infinity
run docker exec "$build_container" bash -c 'nohup containerd >/var/log/containerd-build.log 2>&1 &
    echo $! >/run/containerd-build.pid
    for i in $(seq 1 50); do [ -S /run/containerd/containerd.sock ] && ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done
    cat /var/log/containerd-build.log; exit 1'
run docker exec "$build_container" bash -euc 'for f in /images/*.tar; do
    ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned --all-platforms --no-unpack --digests "$f"
done
ctr --namespace=k8s.io images list -q
# The container has no init to reap it: wait until containerd is a zombie (or gone).
pid="$(cat /run/containerd-build.pid)"; kill "$pid"
while [ -e "/proc/$pid" ] && [ "$(cut -d" " -f3 "/proc/$pid/stat")" != Z ]; do sleep 0.2; done
rm -f /var/log/containerd-build.log /run/containerd-build.pid'
run docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' \
    --change 'ENV container=docker' \
    --change "LABEL spawner.dev/etcd-image-tag=${etcd_version#v}-0" "$build_container" "$node_image"
run docker rm -f -v "$build_container"
build_container=""
# The node image holds them now; the engine's copies would only take disk space.
run docker rmi "$base_image" "${component_images[@]}" "registry.k8s.io/kube-proxy:$kube_version" \
    "spawner.dev/kind-node-tools:$kube_version" >/dev/null
step_done
echo "$node_image" >&3
