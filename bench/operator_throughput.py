"""How fast the operator turns FineTuneJobs into RayJobs, against creating the RayJobs directly.

    python bench/operator_throughput.py [--sizes 100,1000] [--workers 16]

For each N, on the test control plane (see tests/controlplane/):

- baseline: the benchmark creates N RayJobs itself, one after another, with the
  operator's own API client (the same manifests the operator would build);
- operator: the benchmark creates N FineTuneJobs the same way, and `kubetune
  operator` (a separate process) creates every run's objects and status.

Both are timed from the first create until a watch has seen all N RayJobs. The
ratio is the operator's rate over the baseline's (1.0: as fast as creating the
RayJobs directly, although the operator writes about eight objects per run). The
operator's peak resident memory is sampled throughout.

A second table says where the machine's CPU went in each phase, per job: the API
server, etcd, the operator and the benchmark itself. When everything shares a few
cores, the API server's work for a run's objects bounds the ratio whatever the
operator does.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT))  # appended: the repository root must never shadow the standard library

from kubetune.operator.api.finetunejob import FineTuneJob, Trigger  # noqa: E402
from kubetune.operator.builders.finetunejob import RunRequest, build_run  # noqa: E402
from kubetune.operator.kube import Kube  # noqa: E402
from kubetune.operator.settings import Settings  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.conftest import load_example  # noqa: E402
from tests.controlplane import ControlPlane  # noqa: E402
from tests.integration.harness import OperatorProcess  # noqa: E402

CpuSeconds = dict[str, float]


@dataclass
class Result:
    size: int
    baseline_seconds: float
    operator_seconds: float
    peak_rss_mib: float
    baseline_cpu: CpuSeconds
    operator_cpu: CpuSeconds

    @property
    def ratio(self) -> float:
        return self.baseline_seconds / self.operator_seconds


class RayJobCounter:
    """Watches a namespace and records when the N-th RayJob appears."""

    def __init__(self, kubeconfig: Path, namespace: str, expected: int) -> None:
        self.kube = Kube.connect(str(kubeconfig))
        self.namespace, self.expected = namespace, expected
        self.done = threading.Event()
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(0.5)  # the watch is open before the first create

    def _run(self) -> None:
        seen: set[str] = set()
        while True:  # a watch the server ends is opened again; it starts with every existing RayJob
            for kind, body in self.kube.watch("ray.io/v1", "RayJob", self.namespace, timeout_seconds=60):
                if kind == "ADDED":
                    seen.add(body["metadata"]["name"])
                    if len(seen) >= self.expected:
                        self.finished_at = time.perf_counter()
                        self.done.set()
                        return

    def wait(self, timeout: float) -> float:
        if not self.done.wait(timeout):
            raise TimeoutError(f"not all {self.expected} RayJobs appeared within {timeout} s")
        return self.finished_at


def new_namespace(kube: Kube, name: str) -> str:
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    return name


def job_document(name: str, namespace: str) -> dict[str, Any]:
    document = load_example("finetunejob-minimal.yaml")
    document["metadata"] = {"name": name, "namespace": namespace}
    return document


def cpu_now(plane: ControlPlane, operator: OperatorProcess | None = None) -> CpuSeconds:
    """CPU seconds used so far by the control plane's processes, this benchmark and the operator."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    used = {**plane.cpu_seconds(), "benchmark": own.ru_utime + own.ru_stime}
    if operator is not None:
        used["operator"] = operator.cpu_seconds()
    return used


def cpu_since(before: CpuSeconds, after: CpuSeconds) -> CpuSeconds:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def baseline(kube: Kube, plane: ControlPlane, size: int) -> tuple[float, CpuSeconds]:
    namespace = new_namespace(kube, f"baseline-{size}")
    manifests = []
    for i in range(size):
        document = job_document(f"job-{i:04d}", namespace)
        document["metadata"]["uid"] = f"00000000-0000-0000-0000-{i:012d}"
        job = FineTuneJob.model_validate(document)
        request = RunRequest(1, Trigger.SPEC_CHANGE, "generation 1", 1, "0" * 16)
        manifests.append(build_run(job, request, Settings()).ray_job)
    counter = RayJobCounter(plane.kubeconfig, namespace, size)
    cpu_before = cpu_now(plane)
    started = time.perf_counter()
    for manifest in manifests:
        kube.create(manifest)
    elapsed = counter.wait(600) - started
    return elapsed, cpu_since(cpu_before, cpu_now(plane))


def with_operator(
    kube: Kube, plane: ControlPlane, size: int, workers: int, log: Path
) -> tuple[float, float, CpuSeconds]:
    namespace = new_namespace(kube, f"operator-{size}")
    operator = OperatorProcess(plane.kubeconfig, log, metrics_port=_free_port(), workers=workers)
    operator.start()
    peak = operator.rss_bytes()
    try:
        counter = RayJobCounter(plane.kubeconfig, namespace, size)
        cpu_before = cpu_now(plane, operator)
        started = time.perf_counter()
        for i in range(size):
            kube.create(job_document(f"job-{i:04d}", namespace))
            if i % 50 == 0:
                peak = max(peak, operator.rss_bytes())
        while not counter.done.wait(0.5):
            peak = max(peak, operator.rss_bytes())
        elapsed = counter.wait(0) - started
        cpu = cpu_since(cpu_before, cpu_now(plane, operator))
        exposed = operator.metrics() or ""
        reconciles = _metric_sum(exposed, "kubetune_reconciles_total{")
        seconds = _metric_sum(exposed, "kubetune_reconcile_duration_seconds_sum")
        print(
            f"  {size} jobs: {reconciles:.0f} reconciles ({seconds / max(reconciles, 1) * 1000:.0f} ms each),"
            f" operator CPU {operator.cpu_seconds():.1f} s"
        )
        # Status writes lag the RayJobs a little; memory is sampled until they are done.
        for _ in range(20):
            peak = max(peak, operator.rss_bytes())
            time.sleep(0.25)
    finally:
        operator.stop()
    return elapsed, peak / 2**20, cpu


def _metric_sum(exposed: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix` in Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposed.splitlines() if line.startswith(prefix))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated numbers of FineTuneJobs")
    parser.add_argument("--workers", type=int, default=16, help="the operator's reconcile threads")
    args = parser.parse_args()
    console = Console()
    results = []
    # No controller manager: its garbage collector would compete for this machine's CPUs
    # (on a real cluster it runs on the control plane's nodes), and the baseline's RayJobs
    # name owners that do not exist.
    with ControlPlane(controllers=False) as plane, tempfile.TemporaryDirectory() as scratch:
        plane.apply_crds(sorted((REPO_ROOT / "crds").glob("*.yaml")))
        from tests.controlplane import kuberay_crds

        plane.apply_crds(kuberay_crds())
        kube = Kube.connect(str(plane.kubeconfig))
        for size in (int(s) for s in args.sizes.split(",")):
            console.print(f"N = {size}: baseline …")
            base, base_cpu = baseline(kube, plane, size)
            console.print(f"N = {size}: operator …")
            elapsed, peak, cpu = with_operator(kube, plane, size, args.workers, Path(scratch) / f"op-{size}.log")
            results.append(Result(size, base, elapsed, peak, base_cpu, cpu))
    table = Table(title="FineTuneJob → RayJob throughput (ratio = operator rate / direct-create rate)")
    for column in ("N", "baseline s", "baseline /s", "operator s", "operator /s", "ratio", "operator peak RSS MiB"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            str(r.size),
            f"{r.baseline_seconds:.2f}",
            f"{r.size / r.baseline_seconds:.0f}",
            f"{r.operator_seconds:.2f}",
            f"{r.size / r.operator_seconds:.0f}",
            f"{r.ratio:.2f}",
            f"{r.peak_rss_mib:.0f}",
        )
    console.print(table)
    console.print(cpu_table(results))


def cpu_table(results: list[Result]) -> Table:
    """Milliseconds of CPU per job, by process, in each phase (until all RayJobs existed)."""
    table = Table(title="CPU per job, ms (the machine's cores are shared by all of these)")
    names = sorted({name for r in results for name in (*r.baseline_cpu, *r.operator_cpu)})
    for column in ("N", "phase", *names, "total"):
        table.add_column(column, justify="right")
    for r in results:
        for phase, cpu in (("baseline", r.baseline_cpu), ("operator", r.operator_cpu)):
            per_job = {name: cpu.get(name, 0.0) * 1000 / r.size for name in names}
            table.add_row(
                str(r.size), phase, *(f"{per_job[name]:.1f}" for name in names), f"{sum(per_job.values()):.1f}"
            )
    return table


if __name__ == "__main__":
    main()
