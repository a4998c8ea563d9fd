#!/usr/bin/env bash
# containerd and kubelet of the real node, in a mount namespace of their own. Started by
# realnode.py as `unshare --mount --propagation private node-namespace.sh`, with
#   NODE_DIR    the node's run folder (configs, sockets, logs, kubelet's root)
#   NODE_NAME, NODE_IP, KUBELET  the node's name and address, the kubelet binary
# Everything mounted here lives only in this namespace and goes with its last process.
set -euo pipefail
: "${NODE_DIR:?}" "${NODE_NAME:?}" "${NODE_IP:?}" "${KUBELET:?}"

# kubelet sets vm.overcommit_memory=1, kernel.panic=10 and kernel.panic_on_oops=1 at start
# (or, with protectKernelDefaults, refuses to start on other values). These are settings of
# the whole machine: show kubelet the values it wants in this namespace, and leave the host's.
for setting in vm/overcommit_memory=1 kernel/panic=10 kernel/panic_on_oops=1; do
  key=${setting%=*}
  file="$NODE_DIR/sysctl/${key//\//.}"
  echo "${setting#*=}" > "$file"
  mount --bind "$file" "/proc/sys/$key"
done
# Host paths that kubelet, containerd and the CNI plugins write to, kept in the run folder:
# pod logs, the shims' sockets (containerd 1.6 puts them under /run/containerd whatever its
# state directory), and libcni's cache.
mount --bind "$NODE_DIR/host/log" /var/log
mount --bind "$NODE_DIR/host/run-containerd" /run/containerd
mount --bind "$NODE_DIR/host/cni-cache" /var/lib/cni

# containerd in a process group of its own, so that stopping kubelet leaves it running
# until the pods' containers are stopped through it.
setsid containerd --config "$NODE_DIR/containerd.toml" > "$NODE_DIR/logs/containerd.log" 2>&1 &
echo $! > "$NODE_DIR/pids/containerd"
for _ in $(seq 200); do [[ -S $NODE_DIR/run/containerd.sock ]] && break; sleep 0.05; done
[[ -S $NODE_DIR/run/containerd.sock ]] || { echo "containerd did not start" >&2; exit 1; }

exec "$KUBELET" --config="$NODE_DIR/kubelet.yaml" --kubeconfig="$NODE_DIR/kubelet.kubeconfig" \
  --root-dir="$NODE_DIR/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
  > "$NODE_DIR/logs/kubelet.log" 2>&1
