#!/usr/bin/env bash
# Builds the test control plane of kubetune (etcd, kube-apiserver,
# kube-controller-manager, kubectl, helm) from pinned Go modules, and fetches the pinned KubeRay CRDs, into a
# cache:
#
#   <root>/controlplane/<key>/bin/{etcd,kube-apiserver,kube-controller-manager,kubectl,helm}
#   <root>/controlplane/crds/kuberay-<version>/ray.io_{rayjobs,rayservices,rayclusters}.yaml
#
# <root> is $KUBETUNE_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune;
# <key> names the pinned versions plus a hash of everything that shapes the
# build. Each entry is made in a temporary directory and renamed into place
# once complete, so an interrupted build never leaves a half cache, and a later
# run finds the cache and returns at once.
#
# Usage: build.sh          prints the CRD directory, then the bin directory
#                          (last line)
#        build.sh --crds   only the KubeRay CRDs; prints their directory
set -euo pipefail

KUBERAY_MODULE=github.com/ray-project/kuberay/ray-operator
KUBERAY_VERSION=v1.5.0
KUBERAY_CRDS=(rayjobs rayservices rayclusters)
# Bump when the build below changes in a way that the hashed inputs (go.mod,
# go.sum, sources, link flags) do not show.
BUILD_REVISION=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${KUBETUNE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}/controlplane"

mode=all
case "${1:-}" in
  "") ;;
  --crds) mode=crds ;;
  *) echo "usage: $0 [--crds]" >&2; exit 2 ;;
esac

log() { echo "build.sh: $*" >&2; }

# The version at which a go.mod requires a module.
required() {
  awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' "$1"
}

sha256() {
  if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi
}

k8s_version="$(required "$here/kube/go.mod" k8s.io/kubernetes)"
helm_version="$(required "$here/kube/go.mod" helm.sh/helm/v3)"
etcd_version="$(required "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)"

# Version stamps as the upstream release builds set them, so that
# `kubectl version` and `helm version` report the pinned releases.
k8s_minor="${k8s_version#v1.}"
k8s_minor="${k8s_minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
done
ldflags+=" -X helm.sh/helm/v3/internal/version.version=$helm_version"
ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done

hash="$(
  cd "$here"
  { echo "$BUILD_REVISION $ldflags"; uname -sm
    cat etcd/go.mod etcd/go.sum kube/go.mod kube/go.sum
    find etcd/cmd -name '*.go' | LC_ALL=C sort | xargs cat; } | sha256 | cut -c1-12
)"
bin_dir="$root/k8s-${k8s_version}_etcd-${etcd_version}_helm-${helm_version}_${hash}/bin"
crd_dir="$root/crds/kuberay-$KUBERAY_VERSION"

ready() { [[ -d $crd_dir ]] && { [[ $mode == crds ]] || [[ -d $bin_dir ]]; }; }
report() { echo "$crd_dir"; if [[ $mode == all ]]; then echo "$bin_dir"; fi; }

if ready; then report; exit 0; fi

mkdir -p "$root/crds"
# Serialise concurrent builds where flock(1) exists (Linux); elsewhere a
# concurrent build only costs time.
if command -v flock >/dev/null; then
  exec 9>"$root/.lock"
  flock 9
  if ready; then report; exit 0; fi
  rm -rf "$root"/.build.* # left by builds that were killed
fi

tmp="$(mktemp -d "$root/.build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
export GOWORK=off GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0

if [[ ! -d $crd_dir ]]; then
  mod_dir="$(cd "$tmp" && go mod download -json "$KUBERAY_MODULE@$KUBERAY_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
  [[ -n $mod_dir ]] || { log "could not download $KUBERAY_MODULE@$KUBERAY_VERSION"; exit 1; }
  mkdir -m 0755 "$tmp/crds"
  for name in "${KUBERAY_CRDS[@]}"; do
    install -m 0644 "$mod_dir/config/crd/bases/ray.io_$name.yaml" "$tmp/crds/"
  done
  mv "$tmp/crds" "$crd_dir"
fi

if [[ $mode == all && ! -d $bin_dir ]]; then
  log "building $(dirname "$bin_dir") (one time; takes several minutes)"
  start=$SECONDS
  out="$tmp/out"
  mkdir -p "$out/bin"
  chmod 0755 "$out"

  # The release date of the pinned Kubernetes, as its build date.
  k8s_date="$(cd "$here/kube" &&
    go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.buildDate=$k8s_date"
  done

  (cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out/bin/etcd" ./cmd/etcd)
  log "etcd built ($((SECONDS - start)) s)"
  # The upstream main packages, declared as tools in kube/go.mod.
  (cd "$here/kube" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl helm.sh/helm/v3/cmd/helm)
  log "kube-apiserver, kube-controller-manager, kubectl and helm built ($((SECONDS - start)) s)"
  mv "$out" "$(dirname "$bin_dir")"
fi

report
