"""A one-node Kubernetes with real pods on this machine: the node tier's cluster and `scripts/cluster`.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (the control plane's
binaries), and a node: containerd and runc (Debian's packages) with the CNI bridge
plugin, kubelet and kube-proxy (built from the control plane's Kubernetes release),
CoreDNS (built with the cluster's plugins only) as the cluster DNS, and the real
KubeRay operator. Images come from local archives (no registry) and stay in the node's
image store between runs (the `node/` folder of the cache); everything else lives in the
run folder and is undone by :meth:`RealNode.stop` (or by the next start, after a crash).

How this node differs from a production node, and why, is listed in
`docs/control-plane.md` ("Real node").
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script (scripts/cluster): import the package beside it
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.controlplane"

from . import nodehost
from .controlplane import BUILD_SCRIPT, CommandError
from .debian import MissingPackagesError, ensure_packages
from .nodehost import NodeNetwork
from .pki import ServingCertificate, make_pki, write_kubeconfig

HERE = Path(__file__).resolve().parent
NAMESPACE_SCRIPT = HERE / "node-namespace.sh"
# Debian's packages the node needs: the container runtime, the pod network, kube-proxy's tools.
PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack")
# Controllers of a node that runs pods, on top of the test control plane's: Endpoints (the API
# server's service proxy, which KubeRay uses, resolves them), EndpointSlices (kube-proxy), node
# lifecycle (the not-ready taint), ServiceAccounts and the root CA ConfigMap (projected tokens),
# and the workload controllers.
CONTROLLERS = (
    "garbagecollector", "namespace", "job", "clusterrole-aggregation", "endpoint", "endpointslice",
    "nodelifecycle", "serviceaccount", "root-ca-cert-publisher", "replicaset", "deployment", "podgc",
)  # fmt: skip
# Who started the node: a process (a test session, stopped with it) or KEPT (scripts/cluster, until `down`).
OWNER_FILE = "owner"
KEPT = "kept"


class NodeUnavailableError(RuntimeError):
    """This machine cannot run the node now; the message says why (the node tier skips with it)."""


def cache_root() -> Path:
    return Path(
        os.environ.get("KUBETUNE_TEST_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kubetune"
    )


def _build(*args: str) -> list[Path]:
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), *args], stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise CommandError(f"{BUILD_SCRIPT} {' '.join(args)} exited {proc.returncode}")
    return [Path(line) for line in proc.stdout.splitlines()]


def check_machine() -> None:
    """Raise NodeUnavailableError unless this machine can run the node (root on Linux; Debian's packages installed)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        raise NodeUnavailableError("a real node needs root on Linux (kubelet, containerd, mounts, iptables)")
    try:
        ensure_packages(PACKAGES)
    except MissingPackagesError as error:
        raise NodeUnavailableError(str(error)) from error
    if shutil.which("unshare") is None:
        raise NodeUnavailableError("unshare (util-linux) is missing")


class RealNode:
    """The cluster: start it, use `kubeconfig`/`kubectl`/`helm`, stop it. One per machine at a time."""

    def __init__(self, network: NodeNetwork | None = None, *, ready_timeout: float = 120.0) -> None:
        self.network = network or NodeNetwork()
        self.ready_timeout = ready_timeout
        self.home = cache_root() / "node"
        self.run = self.home / "run"
        self.store = self.home / "containerd"  # the image store, kept between runs
        self.bin: dict[str, Path] = {}
        self.crds: Path | None = None
        self.timings: dict[str, float] = {}
        self.server = f"https://{self.network.node_ip}:{self.network.port(nodehost.API)}"

    # -- life cycle -------------------------------------------------------------------------------------

    def __enter__(self) -> RealNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        return self.run / "admin.kubeconfig"

    def running_owner(self) -> str | None:
        """Who runs the node now on this machine: KEPT, a live process's pid, or None (none, or a crashed one)."""
        try:
            owner = (self.run / OWNER_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        if owner == KEPT:
            return owner if nodehost.recorded_pid(self.run, "kube-apiserver") else None
        return owner if owner.isdigit() and nodehost.alive(int(owner)) else None

    def start(self, images: Mapping[str, Path] | None = None, *, keep: bool = False) -> RealNode:
        """Build (once), sweep leftovers of a crashed run, start everything, import `images`, wait until Ready.

        With `keep`, the node outlives this process (until :meth:`stop`, e.g. `scripts/cluster down`).
        """
        check_machine()
        other = self.running_owner()
        if other == KEPT:
            raise NodeUnavailableError(
                "the node of scripts/cluster is running on this machine: `scripts/cluster down` first"
            )
        if other is not None:
            raise NodeUnavailableError(f"a kubetune node is already running here, started by process {other}")
        began = time.monotonic()
        self._find_binaries()
        self.timings["build"] = time.monotonic() - began
        began = time.monotonic()
        self._sweep()
        self._prepare_run_folder(KEPT if keep else str(os.getpid()))
        if not keep:
            atexit.register(self.stop)
        try:
            self._start_control_plane()
            self._start_node()
            self.timings["containerd"] = time.monotonic() - began
            self.import_images(images or {})
            self.timings["images"] = time.monotonic() - began
            self._start_addons()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.timings["ready"] = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop everything and undo the node's changes to the machine (the image store stays)."""
        atexit.unregister(self.stop)
        self._sweep()
        (self.run / OWNER_FILE).unlink(missing_ok=True)

    def leftovers(self) -> list[str]:
        return nodehost.leftovers(self.run, self.network)

    def _sweep(self) -> None:
        # The run folder links the binaries it ran: a sweep from another process (or after a crash) finds them.
        nodehost.sweep(self.run, self.network, self.run / "bin" / "kube-proxy")

    def _find_binaries(self) -> None:
        control_plane = _build()[-1]
        scheduler, _kwok, kuberay = _build("--sim")[-3:]
        node = _build("--node")[-1] / "bin"
        self.crds = _build("--crds")[-1]
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm"):
            self.bin[name] = control_plane / name
        self.bin["kube-scheduler"] = scheduler / "bin/kube-scheduler"
        self.bin["kuberay-operator"] = kuberay / "bin/kuberay-operator"
        for name in ("kubelet", "kube-proxy", "coredns"):
            self.bin[name] = node / name

    def _prepare_run_folder(self, owner: str) -> None:
        shutil.rmtree(self.run, ignore_errors=True)
        folders = ("pids", "logs", "run", "sysctl", "kubelet", "cni/net.d", "host/log", "host/run-containerd")
        nodehost.ensure_dirs(self.run, (*folders, "host/cni-cache"))
        (self.run / OWNER_FILE).write_text(owner)
        (self.run / "bin").mkdir()
        for name, path in self.bin.items():
            (self.run / "bin" / name).symlink_to(path)
        self.store.mkdir(parents=True, exist_ok=True)
        for mount_point in nodehost.HOST_MOUNT_POINTS:
            mount_point.mkdir(parents=True, exist_ok=True)

    # -- processes ----------------------------------------------------------------------------------------

    def spawn(self, name: str, command: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        """Start a process of the cluster (logs in `logs/<name>.log`); stop() ends it, as it ends the node's own."""
        self._spawn(name, command, env)

    def _spawn(self, name: str, command: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        # Everything talks to the node's addresses only: no proxy of the environment in between.
        base = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        with open(self.run / "logs" / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [str(part) for part in command],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.run,
                env={**base, **(env or {})},
                start_new_session=True,
            )
        nodehost.pid_file(self.run, name).write_text(str(proc.pid))
        # Not waited for here: each has its own session; stop() ends it by its recorded pid.
        proc.returncode = 0  # keep Popen's finaliser from warning about a running child

    def _start_control_plane(self) -> None:
        net, run = self.network, self.run
        ip = net.node_ip
        host = nodehost.make_cgroup_root
        subprocess.run(["ip", "address", "add", f"{ip}/32", "dev", "lo"], check=False, capture_output=True)
        host(net)
        pki = make_pki(
            run / "pki",
            {
                "server": ServingCertificate(
                    "/CN=kube-apiserver",
                    (ip, "127.0.0.1", net.service_ip),
                    (
                        "localhost",
                        "kubernetes",
                        "kubernetes.default",
                        "kubernetes.default.svc",
                        "kubernetes.default.svc.cluster.local",
                    ),
                ),
                "kubelet": ServingCertificate(f"/CN={net.node_name}", (ip,), (net.node_name,)),
            },
            {
                "admin": "/O=system:masters/CN=kubetune-admin",
                "kubelet-client": f"/O=system:nodes/CN=system:node:{net.node_name}",
                "kube-proxy": "/CN=system:kube-proxy",
            },
        )
        write_kubeconfig(self.kubeconfig, self.server, pki, "admin")
        (run / "kubelet-client.kubeconfig").unlink(missing_ok=True)
        write_kubeconfig(run / "kubelet.kubeconfig", self.server, pki, "kubelet-client")
        write_kubeconfig(run / "kube-proxy.kubeconfig", self.server, pki, "kube-proxy")
        etcd = f"http://127.0.0.1:{net.port(nodehost.ETCD)}"
        peer = f"http://127.0.0.1:{net.port(nodehost.ETCD_PEER)}"
        self._spawn(
            "etcd",
            [self.bin["etcd"], "--name=node", f"--data-dir={run / 'etcd'}", f"--listen-client-urls={etcd}",
             f"--advertise-client-urls={etcd}", f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
             f"--initial-cluster=node={peer}", "--unsafe-no-fsync", "--listen-metrics-urls="],
        )  # fmt: skip
        self._wait_url(f"{etcd}/health", None, "etcd")
        self._spawn(
            "kube-apiserver",
            [
                self.bin["kube-apiserver"], f"--etcd-servers={etcd}", f"--bind-address={ip}",
                f"--advertise-address={ip}", f"--secure-port={net.port(nodehost.API)}",
                f"--tls-cert-file={pki / 'server.crt'}", f"--tls-private-key-file={pki / 'server.key'}",
                f"--client-ca-file={pki / 'ca.crt'}", "--authorization-mode=Node,RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.key'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={net.service_cidr}", "--endpoint-reconciler-type=lease",
                "--allow-privileged=true", "--enable-admission-plugins=NodeRestriction,PodSecurity",
                f"--kubelet-client-certificate={pki / 'admin.crt'}", f"--kubelet-client-key={pki / 'admin.key'}",
                "--kubelet-preferred-address-types=InternalIP",
            ],
        )  # fmt: skip
        self._wait_url(f"{self.server}/readyz", self._admin_tls(), "kube-apiserver")
        self._spawn(
            "kube-controller-manager",
            [self.bin["kube-controller-manager"], f"--kubeconfig={self.kubeconfig}", "--leader-elect=false",
             "--secure-port=0", f"--controllers={','.join(CONTROLLERS)}", f"--root-ca-file={pki / 'ca.crt'}",
             f"--service-cluster-ip-range={net.service_cidr}", "--concurrent-gc-syncs=5"],
        )  # fmt: skip
        scheduler_config = run / "kube-scheduler.yaml"
        scheduler_config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self.kubeconfig}\nleaderElection:\n  leaderElect: false\n"
        )
        self._spawn(
            "kube-scheduler",
            [self.bin["kube-scheduler"], f"--config={scheduler_config}", "--bind-address=127.0.0.1",
             f"--secure-port={net.port(nodehost.SCHEDULER)}", f"--cert-dir={run / 'kube-scheduler-certs'}"],
        )  # fmt: skip

    def _start_node(self) -> None:
        from .images import build_images

        net, run = self.network, self.run
        pause = build_images(["pause"])["pause"]
        (run / "containerd.toml").write_text(nodehost.containerd_config(run, self.store, pause.name))
        (run / "cni/net.d/10-kubetune.conflist").write_text(nodehost.cni_config(run, net))
        (run / "kubelet.yaml").write_text(nodehost.kubelet_config(run, net))
        self._spawn(
            "kubelet",
            ["unshare", "--mount", "--propagation", "private", "bash", NAMESPACE_SCRIPT],
            {
                "NODE_DIR": str(run),
                "NODE_NAME": net.node_name,
                "NODE_IP": net.node_ip,
                "KUBELET": str(self.bin["kubelet"]),
            },
        )
        socket = run / "run/containerd.sock"
        deadline = time.monotonic() + 30
        while not socket.exists():
            if nodehost.recorded_pid(run, "kubelet") is None or time.monotonic() > deadline:
                raise CommandError(f"containerd did not start\n{self.logs()}")
            time.sleep(0.05)
        self.import_images({pause.name: pause.archive})

    def import_images(self, archives: Mapping[str, Path]) -> None:
        """Import image archives (by reference) into the node's store, unless it holds the reference already.

        References name their content (the tag carries a digest), and the store outlives the node: an image
        is imported once, and only a new build is read again (its unchanged layers are not written twice).
        """
        held = set(self.ctr("images", "list", "--quiet").split())
        for reference, archive in archives.items():
            if reference not in held:
                self.ctr("images", "import", str(archive), timeout=1800)

    def prune_images(self, keep: Iterable[str], prefix: str = "localhost/kubetune-") -> None:
        """Remove the store's images of `prefix` other than `keep` (older builds), and with them their layers."""
        # The pod sandbox image the running containerd was configured with (maybe of an older checkout).
        sandbox = re.search(r'sandbox_image = "([^"]+)"', (self.run / "containerd.toml").read_text())
        kept = {*keep, *(sandbox.groups() if sandbox else ())}
        old = [name for name in self.ctr("images", "list", "--quiet").split() if name.startswith(prefix)]
        if stale := [name for name in old if name not in kept]:
            self.ctr("images", "remove", *stale)

    def ctr(self, *args: str, timeout: float = 120) -> str:
        command = ["ctr", "--address", str(self.run / "run/containerd.sock"), "--namespace", "k8s.io", *args]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise CommandError(f"{' '.join(command)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def _start_addons(self) -> None:
        net, run = self.network, self.run
        (run / "kube-proxy.yaml").write_text(nodehost.kube_proxy_config(run, net))
        self._spawn("kube-proxy", [self.bin["kube-proxy"], f"--config={run / 'kube-proxy.yaml'}"])
        (run / "Corefile").write_text(nodehost.corefile(run, net))
        self._spawn("coredns", [self.bin["coredns"], "-conf", run / "Corefile"])
        assert self.crds is not None
        self.kubectl("apply", "--server-side", "-f", str(self.crds))
        self._spawn(
            "kuberay-operator",
            [
                self.bin["kuberay-operator"], f"-kubeconfig={self.kubeconfig}", "-enable-leader-election=false",
                f"-metrics-addr=127.0.0.1:{net.port(nodehost.KUBERAY_METRICS)}",
                f"-health-probe-bind-address=127.0.0.1:{net.port(nodehost.KUBERAY_PROBE)}",
                "-log-stdout-encoder=console",
                # The dashboard of a head pod through the API server's service proxy: the machine's
                # resolver does not know the cluster's Service names.
                "-use-kubernetes-proxy",
            ],
        )  # fmt: skip

    def _wait_ready(self) -> None:
        net = self.network
        checks = {
            "kube-proxy": f"http://127.0.0.1:{net.port(nodehost.PROXY_HEALTHZ)}/healthz",
            "coredns": f"http://127.0.0.1:{net.port(nodehost.DNS_READY)}/ready",
            "kuberay-operator": f"http://127.0.0.1:{net.port(nodehost.KUBERAY_PROBE)}/readyz",
        }
        for name, url in checks.items():
            self._wait_url(url, None, name)
        self.kubectl("wait", "--for=condition=Ready", f"node/{net.node_name}", f"--timeout={int(self.ready_timeout)}s")

    def _admin_tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.run / "pki/ca.crt"))
        context.load_cert_chain(self.run / "pki/admin.crt", self.run / "pki/admin.key")
        return context

    def _wait_url(self, url: str, context: ssl.SSLContext | None, name: str) -> None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, http.client.HTTPException):
                pass
            if nodehost.recorded_pid(self.run, name) is None:
                raise CommandError(f"{name} exited\n{self.logs()}")
            if time.monotonic() > deadline:
                raise CommandError(f"{name} not ready after {self.ready_timeout} s ({url})\n{self.logs()}")
            time.sleep(0.1)

    # -- tools ---------------------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """kubectl against the node's cluster; raises CommandError when it fails, unless `check` is false."""
        return self._tool("kubectl", args, input, timeout, check)

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self._tool("helm", args, None, timeout, True)

    def _tool(
        self, name: str, args: Iterable[str], input: str | None, timeout: float, check: bool
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin[name]), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise CommandError(f"{name} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def logs(self, lines: int = 30) -> str:
        logs = sorted((self.run / "logs").glob("*.log")) if (self.run / "logs").exists() else []
        return "\n".join(f"===== {log.stem} =====\n{_tail(log, lines)}" for log in logs)


def _tail(path: Path, lines: int) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""
