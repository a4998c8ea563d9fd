"""A simulated cluster on a test control plane: kube-scheduler, kwok nodes, the real KubeRay operator.

The control plane alone stores objects and nothing runs them. :class:`ClusterSim`
adds, as local processes built by ``build.sh --sim``:

- kube-scheduler, which binds pods to nodes by their requests, node selectors,
  affinities, taints and tolerations, as in a real cluster;
- kwok, which plays the kubelet of the simulated nodes: it marks them Ready and
  the pods bound to them Running and Ready (no containers run), and removes
  deleted pods;
- the KubeRay operator, watching only the namespaces it is given, so that the
  tests which play KubeRay themselves elsewhere on the same control plane are
  left alone.

It creates a CPU pool and a GPU pool of nodes (see :data:`CPU_NODES` and
:data:`GPU_NODES`), and deletes them again on :meth:`ClusterSim.stop`.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from .controlplane import BUILD_SCRIPT, CommandError, ControlPlane, stop_process_group

# kwok manages the nodes that carry this annotation, and only those.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_ANNOTATION_VALUE = "fake"
# Every simulated node has this label (the pools are told apart by POOL_LABEL).
SIMULATED_LABEL = "kubetune.io/simulated-node"

POOL_LABEL = "node-pool"  # as examples/finetunejob-complete.yaml selects them
CPU_POOL = "cpu"
GPU_POOL = "gpu"
# The node label and extended resource that NVIDIA's GPU operator sets on GPU nodes.
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_RESOURCE = "nvidia.com/gpu"
# GPU nodes are tainted so that only pods that tolerate it land there.
GPU_TAINT: dict[str, str] = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION: dict[str, str] = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class NodePool:
    """Identical simulated nodes: ``<prefix>-<pool>-<i>`` with the given capacity, labels and taints."""

    name: str
    count: int
    capacity: dict[str, str]
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()
    prefix: str = "sim"

    def node_names(self) -> list[str]:
        return [f"{self.prefix}-{self.name}-{i}" for i in range(self.count)]

    def manifests(self) -> list[dict[str, Any]]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "annotations": {KWOK_NODE_ANNOTATION: KWOK_NODE_ANNOTATION_VALUE},
                    "labels": {
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        SIMULATED_LABEL: "true",
                        POOL_LABEL: self.name,
                        **self.labels,
                    },
                },
                "spec": {"taints": list(self.taints)},
                # A node may be created with its status (as a kubelet registers); kwok keeps
                # the capacity it finds and adds the conditions and addresses.
                "status": {"capacity": self.capacity, "allocatable": self.capacity},
            }
            for name in self.node_names()
        ]


CPU_NODES = NodePool(
    CPU_POOL,
    2,
    {"cpu": "16", "memory": "64Gi", "ephemeral-storage": "200Gi", "pods": "110"},
)
# Shaped like a machine with 8 H100s (e.g. p5.48xlarge: 192 vCPU, 2 TiB).
GPU_NODES = NodePool(
    GPU_POOL,
    2,
    {"cpu": "192", "memory": "2048Gi", "ephemeral-storage": "1Ti", "pods": "110", GPU_RESOURCE: "8"},
    labels={GPU_PRODUCT_LABEL: GPU_PRODUCT},
    taints=(GPU_TAINT,),
)

# kwok v0.8 has no built-in behaviour: these stages (from the release, copied by
# build.sh) make nodes Ready, pods Running and Ready, and deleted pods go away.
_STAGES = ("node-initialize.yaml", "pod-ready.yaml", "pod-delete.yaml")
# Ends pods owned by a Job as Succeeded right after they run.
_JOB_POD_STAGE = "pod-complete.yaml"
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}


@dataclass(frozen=True)
class SimBinaries:
    kube_scheduler: Path
    kwok: Path
    kwok_stages: Path
    kuberay_operator: Path


def build_sim() -> SimBinaries:
    """Run ``build.sh --sim`` (instant once cached; minutes the first time) and return what it built."""
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), "--sim"], stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise CommandError(f"{BUILD_SCRIPT} --sim exited {proc.returncode}")
    scheduler, kwok, kuberay = (Path(line) for line in proc.stdout.splitlines()[-3:])
    return SimBinaries(
        kube_scheduler=scheduler / "bin" / "kube-scheduler",
        kwok=kwok / "bin" / "kwok",
        kwok_stages=kwok / "stages",
        kuberay_operator=kuberay / "bin" / "kuberay-operator",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


class ClusterSim:
    """kube-scheduler, kwok and the KubeRay operator on a running local :class:`ControlPlane`.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. The logs go to
    ``<control plane workdir>/sim/``; :meth:`logs` gives their tails.
    """

    PROCESSES = ("kuberay-operator", "kube-scheduler", "kwok")

    def __init__(
        self,
        plane: ControlPlane,
        *,
        kuberay_namespaces: Sequence[str],
        pools: Sequence[NodePool] = (CPU_NODES, GPU_NODES),
        complete_job_pods: bool = False,
        kuberay_args: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> None:
        if plane.external:
            raise RuntimeError("the simulated cluster needs the local control plane, not an existing cluster")
        if not kuberay_namespaces:
            # An empty -watch-namespace means every namespace.
            raise ValueError("KubeRay needs the namespaces it may act in")
        self.plane = plane
        self.kuberay_namespaces = list(kuberay_namespaces)
        self.pools = list(pools)
        # Whether kwok ends Job pods (KubeRay's submitters) as Succeeded; otherwise they keep running.
        self.complete_job_pods = complete_job_pods
        # More flags of the KubeRay operator, e.g. -feature-gates=RayJobDeletionPolicy=true.
        self.kuberay_args = list(kuberay_args)
        self.ready_timeout = ready_timeout
        self.binaries: SimBinaries | None = None
        self.workdir: Path | None = None
        self.startup_seconds = 0.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._health: dict[str, str] = {}
        self._nodes_created = False

    def __enter__(self) -> ClusterSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def node_pools(self) -> dict[str, str]:
        """Node name → pool name, for every simulated node."""
        return {name: pool.name for pool in self.pools for name in pool.node_names()}

    def start(self) -> ClusterSim:
        """Build (once), create the nodes, start the processes, and wait until all of them are ready."""
        if self._procs:
            return self
        if self.plane.workdir is None:
            raise RuntimeError("the control plane is not started")
        self.binaries = build_sim()
        began = time.monotonic()  # the one-time build is not startup time
        self.workdir = self.plane.workdir / "sim"
        self.workdir.mkdir(exist_ok=True)
        atexit.register(self.stop)  # registered after the control plane's, so run before it
        try:
            self._create_nodes()
            self._start_kwok()
            self._start_scheduler()
            self._start_kuberay()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _create_nodes(self) -> None:
        manifests = [manifest for pool in self.pools for manifest in pool.manifests()]
        self.plane.kubectl(
            "create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests})
        )
        self._nodes_created = True
        # The API server's TaintNodesByCondition admission adds node.kubernetes.io/not-ready
        # to every new node, and only the node lifecycle controller (not run: it would also
        # evict pods of nodes without a heartbeat) takes it off again; set the pool's own.
        for pool in self.pools:
            taints = json.dumps({"spec": {"taints": list(pool.taints) or None}})
            self.plane.kubectl("patch", "nodes", *pool.node_names(), "--type=merge", "-p", taints)

    def _start_kwok(self) -> None:
        assert self.binaries is not None and self.workdir is not None
        stages = [*_STAGES, *([_JOB_POD_STAGE] if self.complete_job_pods else [])]
        home = self.workdir / "kwok-home"  # kwok also reads ~/.kwok/kwok.yaml: not the user's
        home.mkdir(exist_ok=True)
        self._spawn(
            "kwok",
            self.binaries.kwok,
            [
                f"--kubeconfig={self.plane.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}={KWOK_NODE_ANNOTATION_VALUE}",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.240.0.1",
                f"--config={','.join(str(self.binaries.kwok_stages / name) for name in stages)}",
            ],
            {"HOME": str(home)},
        )

    def _start_scheduler(self) -> None:
        assert self.binaries is not None and self.workdir is not None
        config = self.workdir / "kube-scheduler.yaml"
        config.write_text(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n"
            f"clientConnection:\n  kubeconfig: {self.plane.kubeconfig}\n"
            "leaderElection:\n  leaderElect: false\n"
        )
        port = _free_port()
        self._spawn(
            "kube-scheduler",
            self.binaries.kube_scheduler,
            [
                f"--config={config}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                # A self-signed serving certificate; /readyz needs no client authentication.
                f"--cert-dir={self.workdir / 'kube-scheduler-certs'}",
            ],
        )
        self._health["kube-scheduler"] = f"https://127.0.0.1:{port}/readyz"

    def _start_kuberay(self) -> None:
        assert self.binaries is not None
        probe_port = _free_port()
        self._spawn(
            "kuberay-operator",
            self.binaries.kuberay_operator,
            [
                f"-kubeconfig={self.plane.kubeconfig}",
                "-enable-leader-election=false",
                f"-watch-namespace={','.join(self.kuberay_namespaces)}",
                f"-metrics-addr=127.0.0.1:{_free_port()}",
                f"-health-probe-bind-address=127.0.0.1:{probe_port}",
                "-log-stdout-encoder=console",
                # Its calls to the Ray dashboard of a head pod go through the API server's
                # service proxy (and fail there: no endpoints) rather than to DNS off the machine.
                "-use-kubernetes-proxy",
                *self.kuberay_args,
            ],
        )
        self._health["kuberay-operator"] = f"http://127.0.0.1:{probe_port}/readyz"

    def _spawn(self, name: str, binary: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        assert self.workdir is not None
        # They talk only to the API server on 127.0.0.1: no proxy of the environment in between.
        base = {key: value for key, value in os.environ.items() if key.lower() not in _PROXY_VARIABLES}
        with open(self.workdir / f"{name}.log", "wb") as log:
            self._procs[name] = subprocess.Popen(
                [str(binary), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**base, **(env or {})},
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the scheduler's self-signed certificate
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

        def serving(url: str) -> bool:
            try:
                with opener.open(url, timeout=2) as response:
                    return bool(response.status == 200)
            except (OSError, http.client.HTTPException):
                return False

        def nodes_ready() -> bool:
            answer = self.plane.kubectl("get", "nodes", "-l", f"{SIMULATED_LABEL}=true", "-o", "json")
            ready = {
                node["metadata"]["name"]
                for node in json.loads(answer.stdout)["items"]
                for condition in (node.get("status") or {}).get("conditions") or []
                if condition["type"] == "Ready" and condition["status"] == "True"
            }
            return ready >= set(self.node_pools)

        pending: dict[str, Callable[[], bool]] = {name: partial(serving, url) for name, url in self._health.items()}
        pending["nodes"] = nodes_ready
        deadline = time.monotonic() + self.ready_timeout
        while pending:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise CommandError(f"{name} exited {proc.returncode}\n{self.logs()}")
            pending = {name: check for name, check in pending.items() if not check()}
            if not pending:
                return
            if time.monotonic() > deadline:
                raise CommandError(f"not ready after {self.ready_timeout} s: {', '.join(pending)}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, lines: int = 40) -> str:
        """The last lines of the logs of kube-scheduler, kwok and the KubeRay operator."""
        if self.workdir is None:
            return ""
        return "\n".join(
            f"===== {name} =====\n{_tail(self.workdir / f'{name}.log', lines)}"
            for name in self.PROCESSES
            if (self.workdir / f"{name}.log").exists()
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop KubeRay, the scheduler and kwok (whole process groups), then delete the nodes.

        Delete the namespaces KubeRay acts in before this: its RayJobs carry a finalizer
        that only KubeRay removes, and only kwok removes deleted pods of the nodes.
        """
        atexit.unregister(self.stop)
        for name in self.PROCESSES:
            proc = self._procs.pop(name, None)
            if proc is not None:
                stop_process_group(proc, timeout)
        if self._nodes_created and self.plane.workdir is not None:
            with contextlib.suppress(CommandError):  # the control plane may be gone already
                self.plane.kubectl("delete", "nodes", *self.node_pools, "--ignore-not-found", "--wait=false")
            self._nodes_created = False
