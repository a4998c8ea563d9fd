"""The operator's cost per run, and how fast it turns FineTuneJobs into RayJobs against creating RayJobs directly.

    python bench/operator_throughput.py [--sizes 1000] [--repeats 3] [--workers 16]

For each N, on the test control plane (see tests/controlplane/), in repeats that
alternate the two sides:

- baseline: the benchmark creates N RayJobs itself, one after another, with the
  operator's own API client (the same manifests the operator would build);
- operator: the benchmark creates N FineTuneJobs the same way, and `kubetune
  operator` (a separate process, started afresh each repeat) creates every run's
  objects and writes every job's status.

Throughput is timed from the first create until a watch has seen all N RayJobs;
its ratio is the operator's rate over the baseline's (1.0: as fast as creating the
RayJobs directly, although the operator writes eight objects per run). On a
machine where the API server shares a few cores with the operator, the API server
bounds it, whatever the operator does.

The operator's cost per run is measured over the whole of its work, until every
job's status is written and the operator is idle: CPU seconds of the operator and
of the API server (from /proc) per run, their ratio, reconciles per run (the
operator's own counter), and the operator's peak resident memory. The table gives
the median of the repeats and their spread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO_ROOT))  # appended: the repository root must never shadow the standard library

from kubetune.operator.api.finetunejob import FineTuneJob, Trigger  # noqa: E402
from kubetune.operator.builders.finetunejob import build_run  # noqa: E402
from kubetune.operator.kube import ApiError, Kube  # noqa: E402
from kubetune.operator.planning.finetunejob import RunRequest  # noqa: E402
from kubetune.operator.settings import Settings  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from tests.conftest import load_example  # noqa: E402
from tests.controlplane import ControlPlane, kuberay_crds  # noqa: E402
from tests.integration.harness import OperatorProcess  # noqa: E402

CpuSeconds = dict[str, float]


@dataclass
class Repeat:
    """One repeat at one size: both sides."""

    size: int
    baseline_seconds: float
    operator_seconds: float  # until the N-th RayJob was seen
    reconciles: float
    peak_rss_mib: float
    baseline_cpu: CpuSeconds
    operator_cpu: CpuSeconds  # until every status was written and the operator was idle

    @property
    def rate_ratio(self) -> float:
        return self.baseline_seconds / self.operator_seconds

    def per_run_ms(self, process: str) -> float:
        return self.operator_cpu.get(process, 0.0) * 1000 / self.size

    @property
    def cpu_ratio(self) -> float:
        return self.per_run_ms("operator") / self.per_run_ms("kube-apiserver")


@dataclass
class Figures:
    repeats: list[Repeat] = field(default_factory=list)

    def of(self, measure: Any) -> tuple[float, float, float]:
        """Median, minimum and maximum of a measure over the repeats."""
        values = [measure(r) for r in self.repeats]
        return statistics.median(values), min(values), max(values)


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
            try:
                for kind, body in self.kube.watch("ray.io/v1", "RayJob", self.namespace, timeout_seconds=60):
                    if kind == "ADDED":
                        seen.add(body["metadata"]["name"])
                        if len(seen) >= self.expected:
                            self.finished_at = time.perf_counter()
                            self.done.set()
                            return
            except ApiError as error:
                # A loaded API server refuses watches while its watch cache re-initializes (429).
                if error.status != 429 and error.status < 500:
                    raise
                time.sleep(1.0)

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
    """CPU seconds used so far by the control plane's processes and the operator."""
    used = dict(plane.cpu_seconds())
    if operator is not None:
        used["operator"] = operator.cpu_seconds()
    return used


def cpu_since(before: CpuSeconds, after: CpuSeconds) -> CpuSeconds:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def baseline(kube: Kube, plane: ControlPlane, size: int, namespace: str) -> tuple[float, CpuSeconds]:
    new_namespace(kube, namespace)
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


def metric(exposed: str, prefix: str) -> float:
    """The sum of the samples whose line starts with `prefix` in Prometheus text."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in exposed.splitlines() if line.startswith(prefix))


def with_operator(
    kube: Kube, plane: ControlPlane, size: int, workers: int, namespace: str, log: Path
) -> tuple[float, float, float, CpuSeconds]:
    """(seconds to the N-th RayJob, reconciles, peak RSS MiB, CPU until idle)."""
    new_namespace(kube, namespace)
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
        reconciles, peak = wait_idle(operator, size, peak)
        cpu = cpu_since(cpu_before, cpu_now(plane, operator))
    finally:
        operator.stop()
    jobs = kube.list(*JOBS, namespace, {})
    unwritten = [job["metadata"]["name"] for job in jobs if not (job.get("status") or {}).get("runs")]
    if unwritten:
        raise RuntimeError(f"{len(unwritten)} jobs have no status, e.g. {unwritten[:3]}")
    return elapsed, reconciles, peak / 2**20, cpu


JOBS = ("kubetune.io/v1alpha1", "FineTuneJob")


def wait_idle(operator: OperatorProcess, size: int, peak: int) -> tuple[float, int]:
    """Until the operator has reconciled every job and done nothing for a second; (reconciles, peak RSS)."""
    last, quiet_since = -1.0, time.monotonic()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        peak = max(peak, operator.rss_bytes())
        exposed = operator.metrics() or ""
        reconciles = metric(exposed, "kubetune_reconciles_total{")
        busy = metric(exposed, "kubetune_workqueue_depth{") > 0
        if reconciles != last or busy or reconciles < size:
            last, quiet_since = reconciles, time.monotonic()
        elif time.monotonic() - quiet_since >= 1.0:
            return reconciles, peak
        time.sleep(0.25)
    raise TimeoutError("the operator did not go idle within 600 s")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000", help="comma-separated numbers of FineTuneJobs")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of both sides per size, interleaved")
    parser.add_argument("--workers", type=int, default=16, help="the operator's reconcile threads")
    args = parser.parse_args()
    console = Console()
    figures: dict[int, Figures] = {}
    # No controller manager: its garbage collector would compete for this machine's CPUs
    # (on a real cluster it runs on the control plane's nodes), and the baseline's RayJobs
    # name owners that do not exist.
    for size in (int(s) for s in args.sizes.split(",")):
        figures[size] = Figures()
        for repeat in range(args.repeats):
            figures[size].repeats.append(one_repeat(console, size, repeat, args))
    console.print(cost_table(figures))
    console.print(rate_table(figures))


def one_repeat(console: Console, size: int, repeat: int, args: argparse.Namespace) -> Repeat:
    """Both sides on a fresh control plane (a new operator would otherwise find the last repeat's objects)."""
    # No controller manager: its garbage collector would compete for this machine's CPUs
    # (on a real cluster it runs on the control plane's nodes), and the baseline's RayJobs
    # name owners that do not exist.
    with ControlPlane(controllers=False) as plane, tempfile.TemporaryDirectory() as scratch:
        plane.apply_crds([*sorted((REPO_ROOT / "crds").glob("*.yaml")), *kuberay_crds()])
        kube = Kube.connect(str(plane.kubeconfig))
        console.print(f"N = {size}, repeat {repeat + 1}/{args.repeats}: baseline …")
        base, base_cpu = baseline(kube, plane, size, "baseline")
        console.print(f"N = {size}, repeat {repeat + 1}/{args.repeats}: operator …")
        log = Path(scratch) / "operator.log"
        elapsed, reconciles, peak, cpu = with_operator(kube, plane, size, args.workers, "operator", log)
    return Repeat(size, base, elapsed, reconciles, peak, base_cpu, cpu)


def spread(values: tuple[float, float, float], digits: int = 2) -> tuple[str, str]:
    median, low, high = values
    return f"{median:.{digits}f}", f"{low:.{digits}f}-{high:.{digits}f}"


def cost_table(figures: dict[int, Figures]) -> Table:
    table = Table(title="The operator's cost per run (median of the repeats, and their spread)")
    columns = (
        "N", "reconciles / run", "operator CPU ms / run", "API server CPU ms / run",
        "CPU ratio operator / API server", "spread", "peak RSS MiB",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for size, found in figures.items():
        ratio, ratio_spread = spread(found.of(lambda r: r.cpu_ratio))
        table.add_row(
            str(size),
            spread(found.of(lambda r: r.reconciles / r.size))[0],
            spread(found.of(lambda r: r.per_run_ms("operator")), 1)[0],
            spread(found.of(lambda r: r.per_run_ms("kube-apiserver")), 1)[0],
            ratio,
            ratio_spread,
            spread(found.of(lambda r: r.peak_rss_mib), 0)[0],
        )
    return table


def rate_table(figures: dict[int, Figures]) -> Table:
    table = Table(title="FineTuneJob → RayJob throughput (ratio = operator rate / direct-create rate)")
    for column in ("N", "baseline /s", "operator /s", "rate ratio", "spread"):
        table.add_column(column, justify="right")
    for size, found in figures.items():
        ratio, ratio_spread = spread(found.of(lambda r: r.rate_ratio))
        table.add_row(
            str(size),
            spread(found.of(lambda r: r.size / r.baseline_seconds), 0)[0],
            spread(found.of(lambda r: r.size / r.operator_seconds), 0)[0],
            ratio,
            ratio_spread,
        )
    return table


if __name__ == "__main__":
    main()
