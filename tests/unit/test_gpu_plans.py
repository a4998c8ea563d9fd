"""A GPU run is planned on CPU first: launched when its plan fits, refused (with the figures) when not."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJobStatus, JobPhase, RunFailure, RunRecord, WaitReason
from kubetune.operator.builders.finetunejob import PLAN_MODULE, build_run
from kubetune.operator.conditions import Reason
from kubetune.operator.observe.plan_jobs import PlanJobState, observe_plan_job
from kubetune.operator.observe.pods import PodWait
from kubetune.operator.observe.reports import Report, read_report
from kubetune.operator.planning.finetunejob import Plan, name_conflict, plan
from kubetune.operator.planning.gpu_plans import PLANNING_RECHECK_SECONDS, planned
from kubetune.operator.settings import Settings
from kubetune.operator.status.finetunejob import compute_status
from kubetune.runtime.contract.plan import PLAN_KEY, RunPlan
from kubetune.runtime.contract.report import REPORT_KEY

from ..conftest import mutated
from ..plans import DOES_NOT_FIT, FITS
from .test_finetunejob_planning import CREATED, NOW, RUNNING, make_job, observed

GIB = 2**30
TOO_BIG = DOES_NOT_FIT
UNJUDGED = RunPlan(memory_per_device_bytes=12 * GIB, notes=["resources.gpuType X is not in the planner's table"])
BAD_MODEL = RunPlan(invalid_field="model.uri", error="model.uri: no config.json in hf://nobody/none")


def gpu_job(document: dict[str, Any], records: list[RunRecord] | None = None) -> Any:
    return make_job(mutated(document, "spec.resources", {"gpusPerWorker": 1, "gpuType": "NVIDIA-L4"}), records)


def first_pass(minimal_job: dict[str, Any]) -> Plan:
    return plan(gpu_job(minimal_job), generation=1, annotations={}, created=CREATED, observed=[], reports={}, now=NOW)


def later_pass(minimal_job: dict[str, Any], records: list[RunRecord], **seen: Any) -> Plan:
    job = gpu_job(minimal_job, records)
    return plan(job, generation=1, annotations={}, created=CREATED, observed=[], reports={}, now=NOW, **seen)


def test_a_gpu_run_starts_as_its_plan(minimal_job: dict[str, Any]) -> None:
    decision = first_pass(minimal_job)
    [record] = decision.records
    assert decision.create is not None and record.phase == JobPhase.PLANNING and record.ray_job is None
    assert [event.reason for event in decision.events] == [Reason.RUN_CREATED]
    assert decision.requeue_after == PLANNING_RECHECK_SECONDS
    manifests = build_run(gpu_job(minimal_job), decision.create, Settings())
    kinds = [manifest["kind"] for manifest in manifests.in_order()]
    assert kinds[-1] == "Job" and "RayJob" not in kinds
    assert manifests.plan_job is not None
    pod = manifests.plan_job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"][:3] == ["python", "-m", PLAN_MODULE]
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and pod["restartPolicy"] == "Never"
    assert "nvidia.com/gpu.product" not in (pod.get("nodeSelector") or {})  # the head's CPU placement
    assert pod["serviceAccountName"].endswith("-runner") and pod["automountServiceAccountToken"] is True


def test_a_cpu_run_creates_its_rayjob_at_once(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    decision = plan(job, generation=1, annotations={}, created=CREATED, observed=[], reports={}, now=NOW)
    assert decision.create is not None and decision.records[0].phase == JobPhase.PENDING
    manifests = build_run(job, decision.create, Settings())
    assert manifests.plan_job is None and manifests.in_order()[-1]["kind"] == "RayJob"


@pytest.mark.parametrize(
    ("run_plan", "job_state", "phase", "failure", "launched", "message"),
    [
        (FITS, PlanJobState(), JobPhase.PENDING, None, True, "planned: 12 GiB per GPU of 80 on H100-SXM"),
        (UNJUDGED, PlanJobState(), JobPhase.PENDING, None, True, "not in the planner's table: not judged"),
        (TOO_BIG, PlanJobState(), JobPhase.FAILED, RunFailure.INVALID_SPEC, False, "an L4 has 24"),
        (BAD_MODEL, None, JobPhase.FAILED, RunFailure.INVALID_SPEC, False, "spec.model.uri: no config.json"),
        (None, PlanJobState(), JobPhase.PLANNING, None, False, "planning on CPU"),
        (None, PlanJobState("BackoffLimitExceeded"), JobPhase.FAILED, RunFailure.PLAN_FAILED, False, "Backoff"),
        (None, None, JobPhase.FAILED, RunFailure.PLAN_FAILED, False, "plan Job was deleted"),
    ],
)
def test_what_a_planned_run_becomes(
    minimal_job: dict[str, Any],
    run_plan: RunPlan | None,
    job_state: PlanJobState | None,
    phase: JobPhase,
    failure: RunFailure | None,
    launched: bool,
    message: str,
) -> None:
    records = first_pass(minimal_job).records
    plans = {1: run_plan} if run_plan is not None else {}
    decision = later_pass(minimal_job, records, plans=plans, plan_jobs={1: job_state} if job_state else {})
    [record] = decision.records
    assert (record.phase, record.failure) == (phase, failure)
    assert message in (record.message or "")
    assert [request.number for request in decision.launch] == ([1] if launched else [])
    assert record.plan == run_plan
    if phase == JobPhase.FAILED:  # finished and judged at once; the conditions say why
        assert decision.finished == [record] and record.gate is not None and not record.gate.passed
        status = compute_status(decision.records, suspended=False, generation=1, previous=None, now=NOW)
        degraded = next(c for c in status.conditions or [] if c.type == "Degraded")
        assert degraded.reason == failure


def test_a_planned_run_shows_what_its_plan_pod_waits_for(minimal_job: dict[str, Any]) -> None:
    wait = PodWait(WaitReason.IMAGE_PULL_FAILED, "pod x-r1-plan-abcde container plan: ErrImagePull")
    record, launched = planned(first_pass(minimal_job).records[0], None, PlanJobState(), wait)
    assert (record.phase, record.waiting, launched) == (JobPhase.PLANNING, WaitReason.IMAGE_PULL_FAILED, False)


def test_a_launched_run_is_then_followed_through_its_rayjob(minimal_job: dict[str, Any]) -> None:
    launched = later_pass(minimal_job, first_pass(minimal_job).records, plans={1: FITS}, plan_jobs={1: PlanJobState()})
    job = gpu_job(minimal_job, launched.records)
    decision = plan(
        job, generation=1, annotations={}, created=CREATED, observed=[observed(job, 1, RUNNING)], reports={}, now=NOW
    )
    [record] = decision.records
    assert record.phase == JobPhase.RUNNING and record.plan == FITS and decision.launch == []


def test_a_launch_whose_rayjob_name_is_taken_fails_the_run(minimal_job: dict[str, Any]) -> None:
    decision = later_pass(minimal_job, first_pass(minimal_job).records, plans={1: FITS}, plan_jobs={1: PlanJobState()})
    job = gpu_job(minimal_job)
    conflicted = name_conflict(job, decision, "RayJob support-tickets-r1 already exists", NOW, number=1)
    [record] = conflicted.records
    assert (record.phase, record.failure) == (JobPhase.FAILED, RunFailure.NAME_CONFLICT)
    assert conflicted.launch == [] and conflicted.create is None


def test_the_report_configmap_carries_the_plan_before_any_report() -> None:
    config_map = {
        "metadata": {
            "name": "support-tickets-r1-report",
            "labels": {"kubetune.io/finetunejob": "support-tickets", "kubetune.io/run": "1"},
            "ownerReferences": [
                {
                    "apiVersion": "kubetune.io/v1alpha1",
                    "kind": "FineTuneJob",
                    "name": "support-tickets",
                    "uid": "u-1",
                    "controller": True,
                }
            ],
        },
        "data": {REPORT_KEY: "", PLAN_KEY: TOO_BIG.model_dump_json(by_alias=True)},
    }
    seen = read_report(config_map)
    assert isinstance(seen, Report) and seen.report is None and seen.plan == TOO_BIG


def test_a_failed_plan_job_names_its_logs() -> None:
    body = {
        "metadata": {"name": "support-tickets-r1-plan"},
        "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]},
    }
    state = observe_plan_job(body)
    assert state.failure == "BackoffLimitExceeded (kubectl logs job/support-tickets-r1-plan)"
    assert observe_plan_job({"metadata": {"name": "x"}, "status": {"active": 1}}).failure is None


def test_the_status_carries_the_plan(minimal_job: dict[str, Any]) -> None:
    decision = later_pass(minimal_job, first_pass(minimal_job).records, plans={1: TOO_BIG}, plan_jobs={})
    wire = FineTuneJobStatus(runs=decision.records).to_wire()
    assert wire["runs"][0]["plan"]["memoryPerDeviceBytes"] == 38 * GIB
    assert wire["runs"][0]["plan"]["fits"] is False
