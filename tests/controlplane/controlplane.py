"""A real Kubernetes API server (etcd + kube-apiserver) for the kubetune tests.

No container runtime is needed: the binaries come from ``build.sh`` (built once
from pinned Go modules and cached), or from ``KUBEBUILDER_ASSETS`` (the envtest
convention), and an existing cluster can be used instead through
``KUBETUNE_TEST_KUBECONFIG``. There are no nodes; of the controllers only the
garbage collector, the namespace controller, the Job controller and ClusterRole
aggregation run (when a kube-controller-manager binary is there): objects are
stored, validated and collected, nothing runs them (``cluster_sim.py`` adds a
scheduler, simulated nodes and KubeRay).

Certificates and the service-account key come from the ``openssl`` command:
a throwaway CA signs the API server's serving certificate and an admin client
certificate (group ``system:masters``); authorization is RBAC.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from .pki import ServingCertificate, make_pki, write_kubeconfig

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build.sh"
# What kube-controller-manager runs by default: the garbage collector (owner
# references) and the namespace controller (namespace deletion), which kubetune
# relies on, and the Job controller, which makes the pods of KubeRay's submitter
# Jobs when the real KubeRay runs (cluster_sim.py); without Jobs it is idle. The
# ClusterRole aggregation controller fills the built-in view/edit/admin roles with
# the chart's user roles, so that the tests can check what those roles grant.
DEFAULT_CONTROLLERS = ("garbagecollector", "namespace", "job", "clusterrole-aggregation")


class CommandError(RuntimeError):
    """A command of the control plane failed; the message holds its output."""


def _run(args: list[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise CommandError(f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}".rstrip())
    return proc.stdout


def _build_sh(*args: str) -> Path:
    # build.sh reports progress on stderr, left on the terminal: a cold build
    # takes minutes. Its last line of output is the directory asked for.
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), *args], stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise CommandError(f"{BUILD_SCRIPT} {' '.join(args)} exited {proc.returncode}")
    return Path(proc.stdout.splitlines()[-1])


def build() -> Path:
    """Run build.sh (instant once cached) and return the directory of the binaries."""
    return _build_sh()


def kuberay_crds() -> list[Path]:
    """The pinned KubeRay CRDs (RayJob, RayService, RayCluster of ray.io/v1)."""
    return sorted(_build_sh("--crds").glob("ray.io_*.yaml"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM the process's group, SIGKILL it after `timeout` s, and reap the process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


class ControlPlane:
    """etcd and kube-apiserver on 127.0.0.1, or an existing cluster.

    Use as a context manager, or call :meth:`start` and :meth:`stop`; ``stop``
    also runs at interpreter exit.
    """

    def __init__(
        self, *, ready_timeout: float = 60.0, controllers: bool | Sequence[str] = True, audit: bool = False
    ) -> None:
        self.ready_timeout = ready_timeout
        # Whether kube-apiserver logs every request (Metadata level) to `audit_log`, for the
        # tests that compare what a client calls with what it is granted.
        self.audit = audit
        # The controllers kube-controller-manager runs: True for DEFAULT_CONTROLLERS, False
        # (or none) for no controller manager at all.
        if isinstance(controllers, bool):
            controllers = DEFAULT_CONTROLLERS if controllers else ()
        self.controllers: tuple[str, ...] = tuple(controllers)
        self.startup_seconds: float = 0.0
        self.external = bool(os.environ.get("KUBETUNE_TEST_KUBECONFIG"))
        self.bin_dir: Path | None = None
        self.workdir: Path | None = None
        self.server: str = ""
        self._kubeconfig: Path | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._final_logs: str = ""
        # Whether owner references and namespace deletion are acted on (a controller
        # manager runs, or the external cluster has one).
        self.garbage_collection = self.external
        # Whether ClusterRoles with an aggregationRule (view, edit, admin) are filled in.
        self.role_aggregation = self.external

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def kubeconfig(self) -> Path:
        if self._kubeconfig is None:
            raise RuntimeError("the control plane is not started")
        return self._kubeconfig

    def binary(self, name: str) -> Path:
        """The path of one of etcd, kube-apiserver, kube-controller-manager, kubectl, helm (built if need be)."""
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        for directory in (self.bin_dir, Path(assets) if assets else None):
            if directory is not None and (directory / name).exists():
                return directory / name
        if self.external and (found := shutil.which(name)):
            return Path(found)
        self.bin_dir = build()
        return self.bin_dir / name

    def start(self) -> ControlPlane:
        """Start etcd and kube-apiserver and wait until /readyz answers ok."""
        if self._kubeconfig is not None:
            return self
        began = time.monotonic()
        if self.external:
            self._kubeconfig = Path(os.environ["KUBETUNE_TEST_KUBECONFIG"])
            self.startup_seconds = time.monotonic() - began
            return self
        assets = os.environ.get("KUBEBUILDER_ASSETS")
        self.bin_dir = Path(assets) if assets else build()
        began = time.monotonic()  # the one-time build is not startup time
        self.workdir = work = Path(tempfile.mkdtemp(prefix="kubetune-controlplane-"))
        atexit.register(self.stop)
        try:
            etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
            etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
            self._spawn(
                "etcd",
                [
                    "--name=kubetune",
                    f"--data-dir={work / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
                    f"--listen-peer-urls={peer_url}",
                    f"--initial-advertise-peer-urls={peer_url}",
                    f"--initial-cluster=kubetune={peer_url}",
                    "--unsafe-no-fsync",
                ],
            )
            pki = make_pki(
                work / "pki",
                {"server": ServingCertificate("/CN=kube-apiserver")},
                {"admin": "/O=system:masters/CN=kubetune-admin"},
            )
            self._wait_ok(f"{etcd_url}/health", None)
            self.server = f"https://127.0.0.1:{api_port}"
            self._spawn(
                "kube-apiserver",
                [
                    f"--etcd-servers={etcd_url}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    f"--tls-cert-file={pki / 'server.crt'}",
                    f"--tls-private-key-file={pki / 'server.key'}",
                    f"--client-ca-file={pki / 'ca.crt'}",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={self.server}",
                    f"--service-account-key-file={pki / 'sa.key'}",
                    f"--service-account-signing-key-file={pki / 'sa.key'}",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--endpoint-reconciler-type=none",
                    "--allow-privileged=true",
                    "--disable-admission-plugins=ServiceAccount",
                    *self._audit_flags(work),
                ],
            )
            self._kubeconfig = write_kubeconfig(work / "kubeconfig", self.server, pki, "admin")
            context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
            context.load_cert_chain(pki / "admin.crt", pki / "admin.key")
            self._wait_ok(f"{self.server}/readyz", context)
            self._start_controller_manager()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _start_controller_manager(self) -> None:
        # Only the controllers asked for (see DEFAULT_CONTROLLERS): there are no nodes to
        # manage. envtest's assets have no controller manager; without one nothing is collected.
        if not self.controllers or not self._has_binary("kube-controller-manager"):
            return
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--controllers={','.join(self.controllers)}",
                "--leader-elect=false",
                "--secure-port=0",
                "--concurrent-gc-syncs=5",
            ],
        )
        self.garbage_collection = "garbagecollector" in self.controllers
        self.role_aggregation = "clusterrole-aggregation" in self.controllers

    @property
    def audit_log(self) -> Path:
        """kube-apiserver's audit log (JSON lines), when started with ``audit=True``."""
        if not self.audit or self.workdir is None:
            raise RuntimeError("the control plane is not started with audit=True")
        return self.workdir / "audit.log"

    def _audit_flags(self, work: Path) -> list[str]:
        if not self.audit:
            return []
        # Metadata: who did what to which resource, without request or response bodies.
        policy = work / "audit-policy.yaml"
        policy.write_text("apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")
        return [f"--audit-policy-file={policy}", f"--audit-log-path={work / 'audit.log'}"]

    def cpu_seconds(self) -> dict[str, float]:
        """User plus system CPU time each local process (etcd, kube-apiserver, …) has used; empty when external."""
        used = {}
        for name, proc in self._procs.items():
            with contextlib.suppress(OSError):  # a process that has exited
                used[name] = process_cpu_seconds(proc.pid)
        return used

    def _has_binary(self, name: str) -> bool:
        return any(d is not None and (d / name).exists() for d in (self.bin_dir,))

    def _spawn(self, name: str, args: list[str]) -> None:
        assert self.workdir is not None
        with open(self.workdir / f"{name}.log", "wb") as log:
            self._procs[name] = subprocess.Popen(
                [str(self.binary(name)), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )

    def _wait_ok(self, url: str, context: ssl.SSLContext | None) -> None:
        deadline = time.monotonic() + self.ready_timeout
        # Straight to 127.0.0.1, whatever proxy the environment names.
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        while True:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise CommandError(f"{name} exited {proc.returncode}\n{self.logs()}")
            try:
                with opener.open(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, http.client.HTTPException):
                pass  # not up yet
            if time.monotonic() > deadline:
                raise CommandError(f"{url} not ready after {self.ready_timeout} s\n{self.logs()}")
            time.sleep(0.1)

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster; raises CommandError when it fails."""
        return self._tool("kubectl", args, input, timeout)

    def helm(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster; raises CommandError when it fails."""
        return self._tool("helm", args, None, timeout)

    def _tool(
        self, name: str, args: Iterable[str], input: str | None, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        command = [str(self.binary(name)), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise CommandError(f"{name} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def apply_crds(self, paths: Iterable[Path | str], timeout: float = 60) -> list[str]:
        """Server-side apply CRD files and wait until each is Established.

        Returns the names of the CRDs (``crd/<plural>.<group>``).
        """
        files = [arg for path in paths for arg in ("-f", str(path))]
        if not files:
            return []
        applied = self.kubectl("apply", "--server-side", "--force-conflicts", "-o", "name", *files, timeout=timeout)
        names = [f"crd/{line.split('/', 1)[1]}" for line in applied.stdout.split()]
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.kubectl("wait", "--for=condition=Established", f"--timeout={timeout}s", *names)
                return names
            except CommandError as error:
                # kubectl wait fails, rather than waits, on a CRD whose status has no conditions yet.
                if "accessor error" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def logs(self, lines: int = 50) -> str:
        """The last lines of the logs of etcd, kube-apiserver and kube-controller-manager."""
        if self.workdir is None:
            return self._final_logs
        return "\n".join(
            f"===== {name} =====\n{_tail(self.workdir / f'{name}.log', lines)}"
            for name in ("etcd", "kube-apiserver", "kube-controller-manager")
            if (self.workdir / f"{name}.log").exists()
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the controller manager, kube-apiserver, then etcd (whole process groups), and clean up."""
        atexit.unregister(self.stop)
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                stop_process_group(proc, timeout)
        if self.workdir is not None:
            self._final_logs = self.logs()
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
        if not self.external:
            self._kubeconfig = None
