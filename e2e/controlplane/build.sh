#!/usr/bin/env bash
# Builds the pinned Kubernetes control plane (kube-apiserver, kube-controller-manager, etcd)
# from the Go modules pinned in go.mod, into a cache directory outside the repository.
#
# Usage: build.sh [--print-dir]
#   --print-dir  print the binary directory and exit (no build)
#
# Environment:
#   SPAWNER_CONTROLPLANE_BIN_DIR  where the binaries live (default:
#       ${XDG_CACHE_HOME:-$HOME/.cache}/spawner/controlplane/<kubernetes version>/bin)
#   SPAWNER_CONTROLPLANE_REBUILD=1  rebuild even when the binaries are present
#   SPAWNER_CONTROLPLANE_JOBS       parallel compile jobs (go build -p; default 2)
#
# The build is atomic: binaries are compiled into a temporary directory next to the target
# and renamed into place, so an interrupted build never leaves a half-written binary that a
# later run would mistake for a finished one. Concurrent runs serialise on a lock file.
set -euo pipefail

module_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
kube_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' "$module_dir/go.mod")"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' "$module_dir/go.mod")"
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
    echo "build.sh: cannot read the pinned versions from $module_dir/go.mod" >&2
    exit 2
fi

bin_dir="${SPAWNER_CONTROLPLANE_BIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/spawner/controlplane/$kube_version/bin}"
if [[ "${1:-}" == "--print-dir" ]]; then
    echo "$bin_dir"
    exit 0
fi

binaries=(etcd kube-apiserver kube-controller-manager)
all_present() {
    local b
    for b in "${binaries[@]}"; do
        [[ -x "$bin_dir/$b" ]] || return 1
    done
}

if ! command -v go >/dev/null 2>&1; then
    echo "build.sh: Go is not installed; cannot build the control plane" >&2
    exit 3
fi

mkdir -p "$(dirname "$bin_dir")"
# Serialise concurrent builds (parallel test binaries, several worktrees). flock is util-linux;
# where it is missing (macOS) builds are simply not serialised.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$(dirname "$bin_dir")/.build.lock"
    flock 9
fi

if [[ "${SPAWNER_CONTROLPLANE_REBUILD:-}" != "1" ]] && all_present; then
    echo "build.sh: control plane $kube_version (etcd $etcd_version) already built in $bin_dir"
    exit 0
fi

jobs="${SPAWNER_CONTROLPLANE_JOBS:-2}"
staging="$(mktemp -d "$(dirname "$bin_dir")/.bin.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

# Static, stripped, path-independent binaries; version stamped the way Kubernetes' own
# hack/lib/version.sh does, so /version reports the real release instead of v0.0.0-master.
export CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:-} -trimpath -mod=readonly"
export GOMAXPROCS="${GOMAXPROCS:-$jobs}"
minor="${kube_version#v1.}"
minor="${minor%%.*}"
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean"
done

cd "$module_dir"
start=$(date +%s)
echo "build.sh: building kubernetes $kube_version and etcd $etcd_version into $bin_dir (go build -p $jobs; this takes a while on a cold cache)"
echo "build.sh: [1/3] downloading modules"
go mod download
echo "build.sh: [2/3] etcd $etcd_version"
go build -p "$jobs" -ldflags="-s -w" -o "$staging/etcd" go.etcd.io/etcd/server/v3
echo "build.sh: [3/3] kube-apiserver, kube-controller-manager $kube_version"
go build -p "$jobs" -ldflags="$kube_ldflags" -o "$staging/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager

mkdir -p "$bin_dir"
for b in "${binaries[@]}"; do
    mv -f "$staging/$b" "$bin_dir/$b"
done
echo "$kube_version etcd-$etcd_version" >"$bin_dir/VERSION"
echo "build.sh: done in $(($(date +%s) - start))s: $bin_dir"
