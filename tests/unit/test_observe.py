"""Reading what the cluster shows: KubeRay's RayJob status, a run's report, why a pod waits."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.finetunejob import JobPhase, RunRecord, Trigger, WaitReason
from kubetune.operator.conditions import Reason
from kubetune.operator.observe.kuberay import ray_job_outcome, ray_job_state
from kubetune.operator.observe.pods import pod_wait
from kubetune.operator.observe.reports import with_report
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport


def record(number: int, phase: JobPhase) -> RunRecord:
    return RunRecord(
        number=number, ray_job_name=f"job-r{number}", trigger=Trigger.SPEC_CHANGE, spec_generation=1, phase=phase
    )


JOB_STATUSES = ["", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]


DEPLOYMENT_STATUSES = [
    "",
    "Initializing",
    "Running",
    "Complete",
    "Failed",
    "ValidationFailed",
    "Suspending",
    "Suspended",
    "Retrying",
    "Waiting",
]


def expected_phase(deployment: str, job_status: str) -> JobPhase:
    """The mapping, stated once more independently of the implementation."""
    if deployment == "Complete":
        return {"SUCCEEDED": JobPhase.SUCCEEDED, "STOPPED": JobPhase.FAILED, "FAILED": JobPhase.FAILED}.get(
            job_status, JobPhase.RUNNING
        )
    if deployment in ("Failed", "ValidationFailed"):
        return JobPhase.FAILED
    if deployment in ("Suspending", "Suspended"):
        return JobPhase.SUSPENDED
    return {
        "": JobPhase.PENDING,
        "Initializing": JobPhase.PENDING,
        "Running": JobPhase.RUNNING,
        "Retrying": JobPhase.RETRYING,
        "Waiting": JobPhase.WAITING,
    }[deployment]


@pytest.mark.parametrize("deployment", DEPLOYMENT_STATUSES)
@pytest.mark.parametrize("job_status", JOB_STATUSES)
def test_every_kuberay_combination(deployment: str, job_status: str) -> None:
    outcome = ray_job_outcome({"jobDeploymentStatus": deployment, "jobStatus": job_status})
    assert outcome.phase == expected_phase(deployment, job_status)
    assert outcome.message


def test_only_complete_and_succeeded_is_success() -> None:
    successes = [
        (d, j)
        for d in DEPLOYMENT_STATUSES
        for j in JOB_STATUSES
        if ray_job_outcome({"jobDeploymentStatus": d, "jobStatus": j}).phase == JobPhase.SUCCEEDED
    ]
    assert successes == [("Complete", "SUCCEEDED")]


def test_stopped_is_a_failure_with_its_own_reason() -> None:
    outcome = ray_job_outcome({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"})
    assert (outcome.phase, outcome.reason) == (JobPhase.FAILED, Reason.RUN_STOPPED)


def test_kuberay_message_is_kept() -> None:
    status = {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "reason": "DeadlineExceeded",
        "message": "the RayJob exceeded its activeDeadlineSeconds",
        "failed": 2,
    }
    assert ray_job_outcome(status).message == "the RayJob exceeded its activeDeadlineSeconds"
    state = ray_job_state("job-r1", status)
    assert (state.reason, state.failed, state.job_status) == ("DeadlineExceeded", 2, "FAILED")
    assert ray_job_outcome(None).phase == JobPhase.PENDING


def test_report_is_mirrored_into_the_record() -> None:
    report = RunReport(
        stage=Stage.TRAIN,
        step=30,
        total_steps=100,
        epoch=0.3,
        loss=0.7,
        message="training",
        metrics_before={"accuracy": 0.25},
        variants={"full": VariantReport(uri="s3://bucket/run/full")},
        manifest_uri="s3://bucket/run/kubetune.json",
    )
    updated = with_report(record(1, JobPhase.RUNNING), report, "s3://bucket/run")
    assert updated.progress is not None and (updated.progress.step, updated.progress.total_steps) == (30, 100)
    assert updated.metrics_before == {"accuracy": 0.25}
    assert updated.artifacts == {"full": "s3://bucket/run/full"}
    assert updated.manifest_uri == "s3://bucket/run/kubetune.json"
    assert with_report(record(1, JobPhase.RUNNING), None, "s3://bucket/run") == record(1, JobPhase.RUNNING)


# (artifact URI a report names, the run's output folder, kept in the status)
ARTIFACT_PLACES = [
    ("s3://bucket/out/runs/1/full", "s3://bucket/out/runs/1", True),
    ("s3://bucket/out/runs/1/variants/int8/", "s3://bucket/out/runs/1/", True),
    ("pvc://models/out/runs/1/full", "pvc://models/out/runs/1", True),
    ("/data/out/runs/1/full", "/data/out/runs/1", True),
    ("pvc://hr-payroll/full", "pvc://models/out/runs/1", False),  # another claim
    ("pvc://models/out/runs/2/full", "pvc://models/out/runs/1", False),  # another run's folder
    ("pvc://models/out/runs/10/full", "pvc://models/out/runs/1", False),  # a prefix, not a folder
    ("s3://other/out/runs/1/full", "s3://bucket/out/runs/1", False),  # another bucket
    ("s3://bucket/out/runs/1/full", "s3://bucket-2/out/runs/1", False),
    ("s3://bucket/out/runs/1/full", "pvc://bucket/out/runs/1", False),  # another scheme
    ("s3://b/out/runs/1/full", "s3://b/out/runs/1", False),  # not a valid bucket name
    ("s3://bucket/out/runs/1", "s3://bucket/out/runs/1", False),  # the folder itself holds no variant
    ("pvc://models/out/runs/1/../../../secrets", "pvc://models/out/runs/1", False),
    ("pvc://models/out/runs/1//etc", "pvc://models/out/runs/1", False),
    ("pvc://models/out/runs/1/./full", "pvc://models/out/runs/1", False),
    ("pvc://Not_A_Claim/out/runs/1/full", "pvc://Not_A_Claim/out/runs/1", False),  # not a valid URI
    ("ftp://b/out/runs/1/full", "ftp://b/out/runs/1", False),
]


@pytest.mark.parametrize(("uri", "folder", "kept"), ARTIFACT_PLACES)
def test_only_artifacts_inside_the_runs_output_reach_the_status(uri: str, folder: str, kept: bool) -> None:
    report = RunReport(
        stage=Stage.DONE, variants={"full": VariantReport(uri=uri)}, manifest_uri=f"{uri.rstrip('/')}/kubetune.json"
    )
    updated = with_report(record(1, JobPhase.SUCCEEDED), report, folder)
    assert updated.artifacts == ({"full": uri} if kept else {})
    inside = kept or uri.rstrip("/") == folder.rstrip("/")  # the folder's own manifest lies inside it
    assert updated.manifest_uri == (report.manifest_uri if inside else None)


def pod(conditions: tuple[dict[str, str], ...] = (), waiting: dict[str, str] | None = None) -> dict[str, Any]:
    statuses = [{"name": "ray-worker", "state": {"waiting": waiting}}] if waiting else []
    return {"metadata": {"name": "p-1"}, "status": {"conditions": list(conditions), "containerStatuses": statuses}}


UNSCHEDULABLE = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/4 nodes fit"}


POD_WAITS = [
    (pod((UNSCHEDULABLE,)), WaitReason.UNSCHEDULABLE, "pod p-1 cannot be scheduled: 0/4 nodes fit"),
    (pod(waiting={"reason": "ImagePullBackOff", "message": "back-off"}), WaitReason.IMAGE_PULL_FAILED, "back-off"),
    (pod(waiting={"reason": "ErrImagePull", "message": "not found"}), WaitReason.IMAGE_PULL_FAILED, "ErrImagePull"),
    (
        pod(waiting={"reason": "CreateContainerConfigError", "message": 'secret "s3" not found'}),
        WaitReason.POD_CONFIG_ERROR,
        'secret "s3" not found',
    ),
    (pod(waiting={"reason": "ContainerCreating"}), None, ""),
    (pod(({"type": "PodScheduled", "status": "True"},)), None, ""),
]


@pytest.mark.parametrize(("body", "reason", "words"), POD_WAITS)
def test_why_a_pod_waits(body: dict[str, Any], reason: WaitReason | None, words: str) -> None:
    wait = pod_wait(body)
    assert (wait.reason if wait else None) == reason
    assert wait is None or words in wait.message
