#!/usr/bin/env bash
# Builds the test control plane of kubetune (etcd, kube-apiserver,
# kube-controller-manager, kubectl, helm) from pinned Go modules, and fetches the pinned KubeRay CRDs, into a
# cache:
#
#   <root>/controlplane/<key>/bin/{etcd,kube-apiserver,kube-controller-manager,kubectl,helm}
#   <root>/controlplane/crds/kuberay-<version>/ray.io_{rayjobs,rayservices,rayclusters}.yaml
#
# With --sim it builds what turns the control plane into a simulated cluster
# instead, each from a Go module of its own into an entry of its own (so that
# none of them touches the control plane's key):
#
#   <root>/controlplane/kube-scheduler-<k8s version>_<hash>/bin/kube-scheduler
#   <root>/controlplane/kwok-<version>_<hash>/{bin/kwok,stages/*.yaml}
#   <root>/controlplane/kuberay-<version>_<hash>/bin/kuberay-operator
#
# With --node it builds what runs one real node (the node tier, and
# scripts/cluster): kubelet and kube-proxy of the control plane's Kubernetes
# release, and CoreDNS with only the plugins the cluster's DNS needs, into one
# entry:
#
#   <root>/controlplane/node-<k8s version>_coredns-<version>_<hash>/bin/{kubelet,kube-proxy,coredns}
#
# With --kstatus it builds, the same way, the small program of the unit tests
# that runs kstatus (sigs.k8s.io/cli-utils), the status library of Flux, on one
# object:
#
#   <root>/controlplane/kstatus-<cli-utils version>_<hash>/bin/kstatus
#
# <root> is $KUBETUNE_TEST_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/kubetune;
# <key> names the pinned versions plus a hash of everything that shapes the
# build. Each entry is made in a temporary directory and renamed into place
# once complete, so an interrupted build never leaves a half cache, and a later
# run finds the cache and returns at once.
#
# Usage: build.sh          prints the CRD directory, then the bin directory
#                          (last line)
#        build.sh --crds   only the KubeRay CRDs; prints their directory
#        build.sh --sim    kube-scheduler, kwok, KubeRay operator; prints their
#                          three entry directories, in that order
#        build.sh --node   kubelet, kube-proxy, CoreDNS; prints their entry
#                          directory
#        build.sh --kstatus  the kstatus program; prints its entry directory
set -euo pipefail

KUBERAY_MODULE=github.com/ray-project/kuberay/ray-operator
KUBERAY_CRDS=(rayjobs rayservices rayclusters)
# Bump when the build below changes in a way that the hashed inputs (go.mod,
# go.sum, sources, link flags) do not show.
BUILD_REVISION=1
# The same for the --sim entries.
SIM_BUILD_REVISION=1

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="${KUBETUNE_TEST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetune}/controlplane"

mode=all
case "${1:-}" in
  "") ;;
  --crds) mode=crds ;;
  --sim) mode=sim ;;
  --node) mode=node ;;
  --kstatus) mode=kstatus ;;
  *) echo "usage: $0 [--crds | --sim | --node | --kstatus]" >&2; exit 2 ;;
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
# The CRDs come from the KubeRay release that kuberay/go.mod pins for the operator.
KUBERAY_VERSION="$(required "$here/kuberay/go.mod" "$KUBERAY_MODULE")"
kwok_version="$(required "$here/kwok/go.mod" sigs.k8s.io/kwok)"
scheduler_k8s_version="$(required "$here/scheduler/go.mod" k8s.io/kubernetes)"
cli_utils_version="$(required "$here/kstatus/go.mod" sigs.k8s.io/cli-utils)"
node_k8s_version="$(required "$here/node/go.mod" k8s.io/kubernetes)"
coredns_version="$(required "$here/coredns/go.mod" github.com/coredns/coredns)"

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

# Version stamps of kube-scheduler, as for the control plane's binaries.
scheduler_minor="${scheduler_k8s_version#v1.}"
scheduler_minor="${scheduler_minor%%.*}"
scheduler_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  scheduler_ldflags+=" -X $pkg.gitVersion=$scheduler_k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$scheduler_minor"
  scheduler_ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
done

# The key of a --sim entry: its module's go.mod and go.sum and its link flags.
sim_hash() {
  { echo "$SIM_BUILD_REVISION $2"; uname -sm; cat "$here/$1/go.mod" "$here/$1/go.sum"; } | sha256 | cut -c1-12
}
scheduler_entry="$root/kube-scheduler-${scheduler_k8s_version}_$(sim_hash scheduler "$scheduler_ldflags")"
kwok_entry="$root/kwok-${kwok_version}_$(sim_hash kwok "-s -w")"
kuberay_entry="$root/kuberay-${KUBERAY_VERSION}_$(sim_hash kuberay "-s -w")"
# The kstatus program is our own source too: its main.go is part of its key.
kstatus_entry="$root/kstatus-${cli_utils_version}_$(
  { echo "$SIM_BUILD_REVISION -s -w"; uname -sm; cat "$here/kstatus/go.mod" "$here/kstatus/go.sum" "$here/kstatus/main.go"; } |
    sha256 | cut -c1-12
)"

# The node entry: kubelet and kube-proxy stamped like the control plane, and our CoreDNS main package.
node_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  node_ldflags+=" -X $pkg.gitVersion=$node_k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$k8s_minor"
  node_ldflags+=" -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
done
node_entry="$root/node-${node_k8s_version}_coredns-${coredns_version}_$(
  { echo "$SIM_BUILD_REVISION $node_ldflags"; uname -sm
    cat "$here/node/go.mod" "$here/node/go.sum" "$here/coredns/go.mod" "$here/coredns/go.sum" "$here/coredns/main.go"; } |
    sha256 | cut -c1-12
)"

ready() {
  case $mode in
    crds) [[ -d $crd_dir ]] ;;
    all) [[ -d $crd_dir && -d $bin_dir ]] ;;
    sim) [[ -d $scheduler_entry && -d $kwok_entry && -d $kuberay_entry ]] ;;
    node) [[ -d $node_entry ]] ;;
    kstatus) [[ -d $kstatus_entry ]] ;;
  esac
}
report() {
  case $mode in
    crds) echo "$crd_dir" ;;
    all) echo "$crd_dir"; echo "$bin_dir" ;;
    sim) echo "$scheduler_entry"; echo "$kwok_entry"; echo "$kuberay_entry" ;;
    node) echo "$node_entry" ;;
    kstatus) echo "$kstatus_entry" ;;
  esac
}

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

if [[ ($mode == all || $mode == crds) && ! -d $crd_dir ]]; then
  # In kuberay/, so that the download is checked against its go.sum.
  mod_dir="$(cd "$here/kuberay" && go mod download -json "$KUBERAY_MODULE@$KUBERAY_VERSION" |
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

# One --sim entry: build <package> of the module in <module dir> as
# bin/<name>, then rename the whole entry into place.
build_entry() {
  local entry=$1 module_dir=$2 ldflags=$3 name=$4 package=$5
  [[ -d $entry ]] && return
  log "building $entry (one time; takes a few minutes)"
  local start=$SECONDS out="$tmp/$name"
  mkdir -p "$out/bin"
  chmod 0755 "$out"
  (cd "$here/$module_dir" && go build -trimpath -ldflags "$ldflags" -o "$out/bin/$name" "$package")
  if [[ $name == kwok ]]; then
    # kwok v0.8 has no built-in stages: the release's "fast" node and pod
    # stages (node Ready; pod Running; Job pod Succeeded; deleted pod gone).
    local stages
    stages="$(cd "$here/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
    mkdir -m 0755 "$out/stages"
    install -m 0644 "$stages/node/fast/node-initialize.yaml" "$stages/pod/fast/pod-ready.yaml" \
      "$stages/pod/fast/pod-complete.yaml" "$stages/pod/fast/pod-delete.yaml" "$out/stages/"
  fi
  mv "$out" "$entry"
  log "$name built ($((SECONDS - start)) s)"
}

if [[ $mode == sim ]]; then
  k8s_date="$(cd "$here/scheduler" &&
    go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    scheduler_ldflags+=" -X $pkg.buildDate=$k8s_date"
  done
  build_entry "$scheduler_entry" scheduler "$scheduler_ldflags" kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler
  build_entry "$kwok_entry" kwok "-s -w" kwok sigs.k8s.io/kwok/cmd/kwok
  build_entry "$kuberay_entry" kuberay "-s -w" kuberay-operator "$KUBERAY_MODULE"
fi
if [[ $mode == node ]]; then
  log "building $node_entry (one time; takes several minutes)"
  start=$SECONDS
  out="$tmp/node"
  mkdir -p "$out/bin"
  chmod 0755 "$out"
  (cd "$here/node" && go build -trimpath -ldflags "$node_ldflags" -o "$out/bin/" \
    k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  log "kubelet and kube-proxy built ($((SECONDS - start)) s)"
  (cd "$here/coredns" && go build -trimpath -ldflags "-s -w" -o "$out/bin/coredns" .)
  mv "$out" "$node_entry"
  log "coredns built ($((SECONDS - start)) s)"
fi
if [[ $mode == kstatus ]]; then
  build_entry "$kstatus_entry" kstatus "-s -w" kstatus .
fi

report
