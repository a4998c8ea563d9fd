"""The host side of the real node: its configuration files, and undoing what it did to the machine.

Everything the node changes outside its run folder is listed here, with why, so that
:func:`sweep` can undo all of it, also after a crash (it works from the run folder
alone): an address on `lo`, a bridge, kube-proxy's iptables chains, a cgroup subtree,
two empty mount points, and the processes (recorded by pid, plus whatever still runs
in the node's cgroups or as a shim of its containerd).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 hierarchies (and the hybrid unified one) kubelet makes its tree in.
CGROUP_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd", "unified")
# Mount points node-namespace.sh binds run-folder directories over (inside its namespace only).
HOST_MOUNT_POINTS = (Path("/run/containerd"), Path("/var/lib/cni"))
# The node's own processes, stopped in this order: the cluster's add-ons, kubelet (so that it
# starts nothing more), then containerd once the containers are gone, then the control plane.
ADDONS = ("kuberay-operator", "coredns", "kube-proxy")
CONTROL_PLANE = ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd")


@dataclass(frozen=True)
class NodeNetwork:
    """Names and addresses of the node; none of them collides with anything of the machine or the suite."""

    node_name: str = "kubetune-node"
    # Kubelet refuses a loopback node IP; an address on `lo` outside 127/8 serves, and pods reach
    # it through their bridge's gateway. The API server, CoreDNS and the tests' S3 server bind it.
    node_ip: str = "10.244.255.1"
    pod_cidr: str = "10.244.7.0/24"
    service_cidr: str = "10.96.0.0/24"
    bridge: str = "kubetune0"
    cgroup_root: str = "kubetune-node"
    # Fixed ports below the kernel's ephemeral range, where the suite's free ports come from.
    port_base: int = 12300

    def port(self, offset: int) -> int:
        return self.port_base + offset

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the Service range."""
        prefix = self.service_cidr.split("/")[0].rsplit(".", 1)[0]
        return f"{prefix}.1"


# Port offsets from NodeNetwork.port_base.
ETCD, ETCD_PEER, API, KUBELET, KUBELET_HEALTHZ = 1, 2, 3, 4, 5
PROXY_HEALTHZ, PROXY_METRICS, DNS_READY, DNS_HEALTH = 6, 7, 8, 9
KUBERAY_METRICS, KUBERAY_PROBE, SCHEDULER = 10, 11, 12
FREE_FOR_TESTS = 20  # the first of the ports the tests may use (S3 server, ...)


def containerd_config(run: Path, store: Path, pause_image: str) -> str:
    return f"""\
version = 2
root = "{store}"
state = "{run / "run/containerd-state"}"
# Plugins that write outside root/state or need kernel features this node does not use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{run / "run/containerd.sock"}"
[ttrpc]
  address = "{run / "run/containerd.sock.ttrpc"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_image}"
  # Without CAP_SYS_RESOURCE no process may lower its OOM score: kubelet asks for negative scores
  # for sandboxes and Guaranteed pods, which runc then fails to set. Clamp to containerd's own.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{run / "run/runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{run / "cni/net.d"}"
"""


def cni_config(run: Path, network: NodeNetwork) -> str:
    return (
        '{"cniVersion": "1.0.0", "name": "kubetune", "plugins": [{"type": "bridge", '
        f'"bridge": "{network.bridge}", "isGateway": true, "ipMasq": false, "hairpinMode": true, '
        f'"ipam": {{"type": "host-local", "dataDir": "{run / "cni/ipam"}", '
        f'"ranges": [[{{"subnet": "{network.pod_cidr}"}}]], "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}\n'
    )


def kubelet_config(run: Path, network: NodeNetwork) -> str:
    pki = run / "pki"
    return f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {network.node_ip}
port: {network.port(KUBELET)}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {network.port(KUBELET_HEALTHZ)}
tlsCertFile: {pki / "kubelet.crt"}
tlsPrivateKeyFile: {pki / "kubelet.key"}
authentication: {{anonymous: {{enabled: false}}, webhook: {{enabled: true}}, x509: {{clientCAFile: {pki / "ca.crt"}}}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{run / "run/containerd.sock"}
cgroupDriver: cgroupfs
cgroupRoot: /{network.cgroup_root}
# The machine mounts cgroup v1 hierarchies only; Kubernetes 1.35 turns this default to true.
failCgroupV1: false
failSwapOn: false
# The machine's hard limit on open files is below kubelet's default 1000000.
maxOpenFiles: 20000
# No CAP_SYS_RESOURCE: kubelet cannot give itself the default -999.
oomScoreAdj: 0
makeIPTablesUtilChains: false
serializeImagePulls: false
# Pods get the cluster's DNS only: the machine's resolver knows nothing of the cluster.
resolvConf: ""
clusterDomain: cluster.local
clusterDNS: [{network.node_ip}]
# The node shares its disk with the machine, often well above kubelet's image-GC threshold (85 %)
# before anything runs: never collect images (the pause image included), and evict only when the
# disk is really full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}}
"""


def kube_proxy_config(run: Path, network: NodeNetwork) -> str:
    return f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {run / "kube-proxy.kubeconfig"}}}
hostnameOverride: {network.node_name}
bindAddress: {network.node_ip}
healthzBindAddress: 127.0.0.1:{network.port(PROXY_HEALTHZ)}
metricsBindAddress: 127.0.0.1:{network.port(PROXY_METRICS)}
mode: iptables
clusterCIDR: {network.pod_cidr}
oomScoreAdj: 0
nodePortAddresses: ["{network.node_ip}/32"]
iptables: {{localhostNodePorts: false}}
# Leave the machine's conntrack settings alone.
conntrack:
  {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s, udpTimeout: 0s, udpStreamTimeout: 0s}}
"""


def corefile(run: Path, network: NodeNetwork) -> str:
    return f"""\
.:53 {{
    bind {network.node_ip}
    errors
    health 127.0.0.1:{network.port(DNS_HEALTH)}
    ready 127.0.0.1:{network.port(DNS_READY)}
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {run / "admin.kubeconfig"} kubetune
        pods insecure
    }}
    cache 30
}}
"""


def pid_file(run: Path, name: str) -> Path:
    return run / "pids" / name


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def recorded_pid(run: Path, name: str) -> int | None:
    """The pid recorded for `name` when that process still runs."""
    try:
        pid = int(pid_file(run, name).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return pid if alive(pid) else None


def stop_pid(pid: int, timeout: float, *, group: bool = True) -> None:
    """SIGTERM the process (and its group), SIGKILL it after `timeout` s."""
    kill = os.killpg if group else os.kill
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def stop_recorded(run: Path, name: str, timeout: float = 10.0) -> None:
    pid = recorded_pid(run, name)
    if pid is not None:
        stop_pid(pid, timeout)
    pid_file(run, name).unlink(missing_ok=True)


def _cgroup_dirs(network: NodeNetwork) -> list[Path]:
    return [CGROUP_ROOT / c / network.cgroup_root for c in CGROUP_CONTROLLERS if (CGROUP_ROOT / c).is_dir()]


def make_cgroup_root(network: NodeNetwork) -> None:
    """kubelet's cgroupRoot must exist; cpuset needs its CPUs and memory nodes before tasks can join."""
    for directory in _cgroup_dirs(network):
        directory.mkdir(exist_ok=True)
    cpuset = CGROUP_ROOT / "cpuset"
    for key in ("cpuset.cpus", "cpuset.mems"):
        target = cpuset / network.cgroup_root / key
        if target.exists():
            target.write_text((cpuset / key).read_text())


def _cgroup_processes(network: NodeNetwork) -> set[int]:
    pids: set[int] = set()
    for directory in _cgroup_dirs(network):
        for procs in directory.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(line) for line in procs.read_text().split())
    return pids


def _shims(run: Path) -> set[int]:
    """containerd-shim processes of this node's containerd (they outlive it when it is killed)."""
    address = str(run / "run/containerd.sock")
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                command = proc.joinpath("cmdline").read_bytes().split(b"\0")
                if command and b"containerd-shim" in command[0] and address.encode() in command:
                    found.add(int(proc.name))
    return found


def _quiet(*command: str) -> None:
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False, timeout=60)


def stop_containers(run: Path) -> None:
    """Kill every container of the node through its containerd and delete them (the images stay)."""
    socket = run / "run/containerd.sock"
    if not socket.exists() or recorded_pid(run, "containerd") is None:
        return
    ctr = ["ctr", "--address", str(socket), "--namespace", "k8s.io"]

    def listed(*what: str) -> list[str]:
        proc = subprocess.run([*ctr, *what, "-q"], capture_output=True, text=True, timeout=60, check=False)
        return proc.stdout.split()

    for task in listed("tasks", "ls"):
        _quiet(*ctr, "tasks", "kill", "--signal", "SIGKILL", task)
    deadline = time.monotonic() + 15
    while listed("tasks", "ls") and time.monotonic() < deadline:
        for task in listed("tasks", "ls"):
            _quiet(*ctr, "tasks", "delete", "--force", task)
        time.sleep(0.2)
    containers = listed("containers", "ls")
    if containers:
        _quiet(*ctr, "containers", "delete", *containers)


def sweep(run: Path, network: NodeNetwork, kube_proxy: Path | None) -> None:
    """Stop whatever the node in `run` left running and undo its changes to the machine. Idempotent."""
    own = {*ADDONS, "kubelet", "containerd", *CONTROL_PLANE}
    others = sorted(p.name for p in (run / "pids").glob("*") if p.name not in own) if (run / "pids").is_dir() else []
    for name in (*others, *ADDONS):  # processes started beside the node (e.g. a storage server), then its add-ons
        stop_recorded(run, name)
    if kube_proxy is not None and kube_proxy.exists():
        _quiet(str(kube_proxy), "--cleanup")  # removes kube-proxy's KUBE-* chains
    for iptables in ("iptables", "ip6tables"):  # --cleanup leaves this one, hooked into INPUT and OUTPUT
        _quiet(iptables, "-D", "INPUT", "-j", "KUBE-FIREWALL")
        _quiet(iptables, "-D", "OUTPUT", "-j", "KUBE-FIREWALL")
        _quiet(iptables, "-X", "KUBE-FIREWALL")
    stop_recorded(run, "kubelet")
    stop_containers(run)
    stop_recorded(run, "containerd")
    for pid in _shims(run) | _cgroup_processes(network):
        stop_pid(pid, 2.0, group=False)
    for name in CONTROL_PLANE:
        stop_recorded(run, name)
    _quiet("ip", "link", "delete", network.bridge)
    _quiet("ip", "address", "delete", f"{network.node_ip}/32", "dev", "lo")
    for directory in _cgroup_dirs(network):
        if directory.exists():  # deepest first; the kernel removes each empty cgroup's files with it
            for child in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                directory.rmdir()
    for mount_point in HOST_MOUNT_POINTS:
        with contextlib.suppress(OSError):  # only when empty: made by the node, not by the machine
            mount_point.rmdir()


def leftovers(run: Path, network: NodeNetwork) -> list[str]:
    """What of the node is still on the machine (empty after a complete sweep)."""
    names = (*ADDONS, "kubelet", "containerd", *CONTROL_PLANE)
    found = [f"process {name}" for name in names if recorded_pid(run, name)]
    found += [f"shim {pid}" for pid in _shims(run)]
    found += [f"process {pid} in the node's cgroups" for pid in _cgroup_processes(network)]
    found += [f"cgroup {d}" for d in _cgroup_dirs(network) if d.exists()]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=False).stdout
    found += [f"link {network.bridge}" for line in links.splitlines() if line.split(" ")[0] == network.bridge]
    addresses = subprocess.run(["ip", "-br", "address", "show", "lo"], capture_output=True, text=True, check=False)
    if f"{network.node_ip}/32" in addresses.stdout:
        found.append(f"address {network.node_ip} on lo")
    chains = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False).stdout
    found += sorted(
        {f"iptables chain {line.split()[0][1:]}" for line in chains.splitlines() if line.startswith(":KUBE-")}
    )
    return found


def ensure_dirs(run: Path, names: Iterable[str]) -> None:
    for name in names:
        (run / name).mkdir(parents=True, exist_ok=True)
