"""A flood of the largest report ConfigMaps anyone may write leaves the operator small and every job reconciled.

Anyone who may create ConfigMaps in a watched namespace can give them the report
labels, and a run's pod may write anything into its own report. Each such object is
close to the API server's 1 MiB limit and holds what costs most once parsed: tens of
thousands of variants or metrics, or one huge hyperparameter object. Some carry no
owner, some a forged one, some the real job's. The operator runs as a process so that
its resident memory can be read, through the burst and through a restart that lists
them all again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.naming import JOB_LABEL, MANAGED_BY_LABEL, MANAGER, REPORT_LABEL, RUN_LABEL
from kubetune.runtime.contract.report import REPORT_KEY

from ..controlplane import ControlPlane
from .harness import InProcessOperator, OperatorProcess, eventually
from .test_finetunejob_operator import create_job, job, status, wait_ray_job
from .test_operator_restarts import free_port

Manifest = dict[str, Any]
MiB = 1024 * 1024
RSS_LIMIT = 150 * MiB
HOSTILE = 12  # as many as OOM-killed an operator under the chart's 512 MiB limit
JOBS = ("alpha", "beta", "gamma")
REPORT_TEXT_BYTES = 1_000_000  # the API server refuses a ConfigMap's data over 1 MiB


def many_variants() -> str:
    """The report with the most variants that fits: each as small as the report model takes."""
    entries = []
    size, index = 40, 0
    while size < REPORT_TEXT_BYTES:
        entry = f'"{index:x}":{{"uri":""}}'
        entries.append(entry)
        size += len(entry) + 1
        index += 1
    return '{"stage":"done","variants":{' + ",".join(entries[:-1]) + "}}"


def many_metrics() -> str:
    count = REPORT_TEXT_BYTES // 12
    metrics = ",".join(f'"{index:x}":0' for index in range(count))
    return '{"stage":"done","metricsAfter":{' + metrics + '},"metricsBefore":{' + metrics[: len(metrics) // 8] + "}}"


def huge_hyperparameters() -> str:
    nested = ",".join(f'"{index:x}":[1,2]' for index in range(REPORT_TEXT_BYTES // 14))
    return '{"stage":"done","bestHyperparameters":{' + nested + "}}"


PAYLOADS = (many_variants, many_metrics, huge_hyperparameters)


def hostile_report(namespace: str, name: str, job_name: str, owner: Manifest | None, text: str) -> Manifest:
    labels = {MANAGED_BY_LABEL: MANAGER, REPORT_LABEL: "true", JOB_LABEL: job_name, RUN_LABEL: "1"}
    metadata: Manifest = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {REPORT_KEY: text}}


def owners(kube: Kube, namespace: str) -> list[tuple[str, Manifest | None]]:
    """Who each hostile ConfigMap claims as its owner: nobody, a forged job, the real job (in turn)."""
    real = job(kube, namespace, JOBS[0])["metadata"]
    reference = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "controller": True}
    forged = {**reference, "name": JOBS[1], "uid": str(uuid.uuid4())}
    genuine = {**reference, "name": real["name"], "uid": real["uid"]}
    return [(JOBS[2], None), (JOBS[1], forged), (JOBS[0], genuine)]


class RssSampler:
    """The operator's resident memory, sampled every 50 ms while it is on; the peak seen."""

    def __init__(self, process: OperatorProcess) -> None:
        self.process, self.peak = process, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(AssertionError, FileNotFoundError, RuntimeError):  # between a kill and a start
                self.peak = max(self.peak, self.process.rss_bytes())
            self._stop.wait(0.05)


@pytest.fixture
def operator_process(
    control_plane: ControlPlane, running_operator: InProcessOperator, kube: Kube, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    # This test owns the namespace: the shared in-process operator (which watches them all) pauses meanwhile.
    running_operator.stop()
    process = OperatorProcess(control_plane.kubeconfig, tmp_path / "operator.log", free_port(), workers=4)
    process.args = [f"--namespace={namespace}"]
    try:
        yield process
    finally:
        process.stop()
        # The namespace is deleted lazily: its floods must not reach the shared operator.
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        kube.request("DELETE", path, query={"labelSelector": f"{REPORT_LABEL}=true"})
        running_operator.start()


def at_step(kube: Kube, namespace: str, name: str, step: int) -> bool:
    runs = status(kube, namespace, name).get("runs") or [{}]
    return bool((runs[-1].get("progress") or {}).get("step") == step)


def every_job_reconciled(kube: Kube, namespace: str, step: int, new_job: str) -> None:
    """Each job mirrors its run's latest (legitimate) report, and a job created now gets its run."""
    for name in JOBS:
        legit = json.dumps({"stage": "train", "step": step, "totalSteps": 100})
        kube.patch(ObjectRef("v1", "ConfigMap", namespace, f"{name}-r1-report"), {"data": {REPORT_KEY: legit}})
    create_job(kube, namespace, new_job)
    for name in JOBS:
        eventually(partial(at_step, kube, namespace, name, step), timeout=60, what=f"{name} at step {step}")
        current = job(kube, namespace, name)
        assert current["status"]["observedGeneration"] == current["metadata"]["generation"]
    wait_ray_job(kube, namespace, f"{new_job}-r1")


def test_a_flood_of_maximal_reports_keeps_the_operator_small_and_every_job_reconciled(
    kube: Kube, namespace: str, operator_process: OperatorProcess
) -> None:
    operator_process.start()
    for name in JOBS:
        create_job(kube, namespace, name)
    for name in JOBS:
        wait_ray_job(kube, namespace, f"{name}-r1")
    idle = operator_process.rss_bytes()
    claims = owners(kube, namespace)
    flood = [
        hostile_report(namespace, f"flood-{index:02d}", claims[index % 3][0], claims[index % 3][1], text)
        for index, text in enumerate(PAYLOADS[index % 3]() for index in range(HOSTILE))
    ]
    # The real job's own report, as its run's pod may overwrite it.
    run_report = ObjectRef("v1", "ConfigMap", namespace, f"{JOBS[0]}-r1-report")

    with RssSampler(operator_process) as burst:
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert all(pool.map(kube.create, flood))
        kube.patch(run_report, {"data": {REPORT_KEY: many_variants()}})
        every_job_reconciled(kube, namespace, step=7, new_job="after-flood")

    # A restart lists every flood object again, at once.
    with RssSampler(operator_process) as restart:
        operator_process.kill()
        operator_process.start()
        every_job_reconciled(kube, namespace, step=8, new_job="after-restart")

    figures = f"idle {idle / MiB:.0f} MiB, burst peak {burst.peak / MiB:.0f} MiB, restart peak {restart.peak / MiB:.0f}"
    print(f"operator RSS with {HOSTILE} maximal reports: {figures}")
    assert burst.peak < RSS_LIMIT and restart.peak < RSS_LIMIT, figures
