"""Restart safety: the operator process is killed at several points while 20 FineTuneJobs are in flight."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.kube import Kube, ObjectRef

from ..conftest import load_example, mutated
from ..controlplane import ControlPlane
from .harness import InProcessOperator, OperatorProcess, eventually, set_ray_job_status

JOBS = 20
JOB = ("kubetune.io/v1alpha1", "FineTuneJob")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def operator_process(
    control_plane: ControlPlane, running_operator: InProcessOperator, tmp_path: Path
) -> Iterator[OperatorProcess]:
    # This test owns the cluster: the shared in-process operator pauses meanwhile.
    running_operator.stop()
    process = OperatorProcess(control_plane.kubeconfig, tmp_path / "operator.log", free_port())
    try:
        yield process
    finally:
        process.stop()
        running_operator.start()


def test_kopf_run_starts_the_same_operator(
    kube: Kube, namespace: str, control_plane: ControlPlane, running_operator: InProcessOperator, tmp_path: Path
) -> None:
    running_operator.stop()
    process = OperatorProcess(control_plane.kubeconfig, tmp_path / "kopf.log", free_port(), kopf_run=True)
    try:
        process.start()
        job = mutated(load_example("finetunejob-minimal.yaml"), "metadata", {"name": "t", "namespace": namespace})
        kube.create(job)
        eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, "t-r1"), timeout=60, what="RayJob t-r1")
        assert 'kubetune_runs_started_total{trigger="SpecChange"} 1.0' in (process.metrics() or "")
    finally:
        process.stop()
        running_operator.start()


def names() -> list[str]:
    return [f"job-{i:02d}" for i in range(JOBS)]


def run_names(kube: Kube, namespace: str) -> list[str]:
    return sorted(item["metadata"]["name"] for item in kube.list("ray.io/v1", "RayJob", namespace, {}))


def statuses(kube: Kube, namespace: str) -> dict[str, dict[str, Any]]:
    items = kube.list(*JOB, namespace, {})
    return {item["metadata"]["name"]: item.get("status") or {} for item in items}


def all_runs_exist(kube: Kube, namespace: str, numbers: list[int]) -> bool:
    expected = sorted(f"{name}-r{n}" for name in names() for n in numbers)
    return run_names(kube, namespace) == expected


def converged(kube: Kube, namespace: str, phases: list[str]) -> bool:
    found = statuses(kube, namespace)
    return len(found) == JOBS and all([run.get("phase") for run in s.get("runs", [])] == phases for s in found.values())


def test_restarts_lose_nothing_and_duplicate_nothing(
    kube: Kube, namespace: str, operator_process: OperatorProcess
) -> None:
    operator_process.start()
    base = load_example("finetunejob-minimal.yaml")
    for index, name in enumerate(names()):
        document = mutated(base, "metadata", {"name": name, "namespace": namespace})
        kube.create(document)
        if index == JOBS // 2:
            operator_process.kill()  # 1: killed while jobs are being created
            operator_process.start()
    eventually(lambda: all_runs_exist(kube, namespace, [1]), timeout=60, what="20 first runs")

    operator_process.kill()  # 2: killed while runs move; KubeRay goes on meanwhile
    for name in names():
        set_ray_job_status(kube, namespace, f"{name}-r1", jobStatus="RUNNING", jobDeploymentStatus="Running")
    operator_process.start()
    eventually(lambda: converged(kube, namespace, ["Running"]), timeout=60, what="all runs Running")

    for index, name in enumerate(names()):
        set_ray_job_status(kube, namespace, f"{name}-r1", jobStatus="SUCCEEDED", jobDeploymentStatus="Complete")
        if index == JOBS // 2:
            operator_process.kill()  # 3: killed while runs finish
            operator_process.start()
    eventually(lambda: converged(kube, namespace, ["Succeeded"]), timeout=60, what="all runs Succeeded")

    for index, name in enumerate(names()):
        patch = {"metadata": {"annotations": {"kubetune.io/retrain": "weekly-1"}}}
        kube.patch(ObjectRef(*JOB, namespace, name), patch)
        if index % 7 == 3:
            operator_process.kill()  # 4: killed several times while retrain triggers arrive
            operator_process.start()
    eventually(lambda: all_runs_exist(kube, namespace, [1, 2]), timeout=60, what="20 second runs")
    eventually(lambda: converged(kube, namespace, ["Succeeded", "Pending"]), timeout=60, what="history kept")

    operator_process.kill()
    operator_process.start()  # 5: a restart with nothing new to do starts nothing
    eventually(lambda: "kubetune_reconciles_total" in (operator_process.metrics() or ""), what="metrics")
    for name, status in statuses(kube, namespace).items():
        runs = status["runs"]
        assert [(r["number"], r["trigger"]) for r in runs] == [(1, "SpecChange"), (2, "Annotation")], name
        assert runs[0]["rayJob"]["jobStatus"] == "SUCCEEDED" and status["handledRetrain"] == "weekly-1"
    assert all_runs_exist(kube, namespace, [1, 2]), run_names(kube, namespace)
