"""Run triggers and concurrency: what the operator decides from what it observes."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import (
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
    RunFailure,
    RunRecord,
    Trigger,
    WaitReason,
)
from kubetune.operator.api.manifests import parse
from kubetune.operator.conditions import Reason
from kubetune.operator.observe.kuberay import ObservedRun
from kubetune.operator.observe.pods import PodWait
from kubetune.operator.planning.finetunejob import Plan, plan, run_spec_hash
from kubetune.operator.status.finetunejob import compute_status
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport

from ..conftest import mutated

CREATED = datetime(2026, 11, 28, 10, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
RUNNING = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}


def make_job(document: dict[str, Any], records: list[RunRecord] | None = None, **status: Any) -> FineTuneJob:
    document = mutated(document, "metadata.namespace", "ml")
    job = parse(mutated(document, "metadata.uid", "u-1"))
    assert isinstance(job, FineTuneJob)
    job.status = FineTuneJobStatus(runs=records, **status)
    return job


def observed(
    job: FineTuneJob,
    number: int,
    status: dict[str, Any] | None,
    *,
    trigger: Trigger = Trigger.SPEC_CHANGE,
    detail: str = "generation 1",
    trigger_hash: str | None = None,
) -> ObservedRun:
    return ObservedRun(
        number=number,
        name=f"support-tickets-r{number}",
        trigger=trigger,
        trigger_detail=detail,
        spec_generation=1,
        trigger_hash=trigger_hash or run_spec_hash(job),
        created=CREATED,
        status=status,
    )


def decide(
    job: FineTuneJob,
    runs: list[ObservedRun],
    *,
    generation: int = 1,
    annotations: dict[str, str] | None = None,
    now: datetime = NOW,
    reports: dict[int, RunReport] | None = None,
) -> Plan:
    return plan(
        job,
        generation=generation,
        annotations=annotations or {},
        created=CREATED,
        observed=runs,
        reports=reports or {},
        now=now,
    )


def finished(job: FineTuneJob, number: int = 1) -> tuple[FineTuneJob, list[ObservedRun]]:
    """The job after run `number` completed and the status recorded it."""
    first = decide(job, [observed(job, number, SUCCEEDED)], now=CREATED + timedelta(minutes=1))
    assert first.create is None
    job.status = FineTuneJobStatus(runs=first.records)
    return job, [observed(job, number, SUCCEEDED)]


def test_a_new_job_starts_run_1(minimal_job: dict[str, Any]) -> None:
    result = decide(make_job(minimal_job), [])
    assert result.create is not None
    assert (result.create.number, result.create.trigger) == (1, Trigger.SPEC_CHANGE)
    assert [r.number for r in result.records] == [1]
    assert result.events[-1].reason == Reason.RUN_CREATED


def test_nothing_to_do_when_the_latest_run_used_this_spec(minimal_job: dict[str, Any]) -> None:
    job, runs = finished(make_job(minimal_job))
    assert decide(job, runs).create is None


def test_a_status_written_before_the_trigger_hash_rename_starts_no_run(minimal_job: dict[str, Any]) -> None:
    """An older operator wrote the hash as runs[].specHash: read back, it is the triggerHash, so no run starts."""
    job, runs = finished(make_job(minimal_job))
    assert job.status is not None
    older = job.status.to_wire()
    for run in older["runs"]:
        run["specHash"] = run.pop("triggerHash")
    job.status = FineTuneJobStatus.model_validate(older)
    assert job.status.runs is not None and job.status.runs[0].trigger_hash == run_spec_hash(job)
    assert decide(job, runs).create is None
    assert all("specHash" not in run for run in job.status.to_wire()["runs"])  # written back as triggerHash


def test_spec_change_starts_a_run(minimal_job: dict[str, Any]) -> None:
    job, runs = finished(make_job(minimal_job))
    job.spec.hyperparameters.epochs = 5
    result = decide(job, runs, generation=2)
    assert result.create is not None and (result.create.number, result.create.trigger_detail) == (2, "generation 2")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.suspend", False),
        ("spec.historyLimit", 3),
        ("spec.promotion", {"minImprovement": 0.5}),
        ("spec.concurrencyPolicy", "Queue"),
    ],
)
def test_edits_that_do_not_change_the_run_start_none(minimal_job: dict[str, Any], path: str, value: Any) -> None:
    job, runs = finished(make_job(minimal_job))
    edited = make_job(mutated(minimal_job, path, value), job.status.runs if job.status else None)
    assert decide(edited, runs, generation=2).create is None


def test_retrain_annotation_starts_one_run_per_value(minimal_job: dict[str, Any]) -> None:
    job, runs = finished(make_job(minimal_job))
    result = decide(job, runs, annotations={"kubetune.io/retrain": "2026-11-28"})
    assert result.create is not None and result.create.trigger == Trigger.ANNOTATION
    assert result.handled_retrain == "2026-11-28"
    # Handled, whether the status was written (handledRetrain) or only the RayJob exists.
    job.status = FineTuneJobStatus(runs=result.records, handled_retrain="2026-11-28")
    again = [*runs, observed(job, 2, RUNNING, trigger=Trigger.ANNOTATION, detail="2026-11-28")]
    assert decide(job, again, annotations={"kubetune.io/retrain": "2026-11-28"}).create is None
    job.status = FineTuneJobStatus(runs=[r for r in result.records if r.number == 1])
    assert decide(job, again, annotations={"kubetune.io/retrain": "2026-11-28"}).create is None


def test_schedule_starts_a_run_at_the_due_time(minimal_job: dict[str, Any]) -> None:
    job, runs = finished(make_job(mutated(minimal_job, "spec.schedule", "0 * * * *")))
    before = decide(job, runs, now=CREATED + timedelta(minutes=30))
    assert before.create is None and before.requeue_after == pytest.approx(30 * 60)
    due = decide(job, runs, now=CREATED + timedelta(hours=1, seconds=5))
    assert due.create is not None and due.create.trigger == Trigger.SCHEDULE
    assert due.last_schedule_time == CREATED + timedelta(hours=1)
    job.status = FineTuneJobStatus(runs=due.records, last_schedule_time=due.last_schedule_time)
    runs.append(observed(job, 2, SUCCEEDED, trigger=Trigger.SCHEDULE, detail=due.create.trigger_detail))
    assert decide(job, runs, now=CREATED + timedelta(hours=1, minutes=1)).create is None


def test_schedule_honours_the_time_zone(minimal_job: dict[str, Any]) -> None:
    document = mutated(mutated(minimal_job, "spec.schedule", "0 13 * * *"), "spec.timeZone", "Europe/Berlin")
    job, runs = finished(make_job(document))
    result = decide(job, runs, now=datetime(2026, 11, 28, 12, 0, 1, tzinfo=UTC))  # 13:00:01 in Berlin
    assert result.create is not None and result.create.trigger_detail == "2026-11-28T12:00:00+00:00"


def active_job(document: dict[str, Any], policy: str) -> tuple[FineTuneJob, list[ObservedRun]]:
    job = make_job(mutated(document, "spec.concurrencyPolicy", policy))
    first = decide(job, [observed(job, 1, RUNNING)])
    job.status = FineTuneJobStatus(runs=first.records)
    return job, [observed(job, 1, RUNNING)]


def test_forbid_skips_an_annotation_while_a_run_is_active(minimal_job: dict[str, Any]) -> None:
    job, runs = active_job(minimal_job, "Forbid")
    result = decide(job, runs, annotations={"kubetune.io/retrain": "now"})
    assert result.create is None and result.handled_retrain == "now"
    assert any(e.reason == Reason.TRIGGER_SKIPPED for e in result.events)


def test_forbid_lets_a_spec_change_wait_for_the_active_run(minimal_job: dict[str, Any]) -> None:
    job, runs = active_job(minimal_job, "Forbid")
    job.spec.hyperparameters.epochs = 9
    assert decide(job, runs, generation=2).create is None
    runs = [observed(job, 1, SUCCEEDED, trigger_hash=runs[0].trigger_hash)]
    result = decide(job, runs, generation=2)
    assert result.create is not None and result.create.number == 2


def test_queue_waits_then_runs(minimal_job: dict[str, Any]) -> None:
    job, runs = active_job(minimal_job, "Queue")
    waiting = decide(job, runs, annotations={"kubetune.io/retrain": "x"})
    assert waiting.create is None and waiting.handled_retrain is None
    done = [observed(job, 1, SUCCEEDED)]
    result = decide(job, done, annotations={"kubetune.io/retrain": "x"})
    assert result.create is not None and result.create.trigger == Trigger.ANNOTATION


def test_replace_stops_the_active_run(minimal_job: dict[str, Any]) -> None:
    job, runs = active_job(minimal_job, "Replace")
    result = decide(job, runs, annotations={"kubetune.io/retrain": "x"})
    assert result.stop == ["support-tickets-r1"]
    assert result.create is not None and result.create.number == 2
    assert result.records[0].phase == JobPhase.FAILED and "replaced" in (result.records[0].message or "")


def test_a_run_created_before_a_crash_is_not_created_again(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)  # the status was never written
    result = decide(job, [observed(job, 1, None)])
    assert result.create is None
    assert [(r.number, r.phase) for r in result.records] == [(1, JobPhase.PENDING)]


def test_a_retrain_run_created_before_a_crash_counts_as_handled(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    runs = [observed(job, 1, SUCCEEDED), observed(job, 2, None, trigger=Trigger.ANNOTATION, detail="weekly")]
    result = decide(job, runs, annotations={"kubetune.io/retrain": "weekly"})
    assert result.create is None and result.handled_retrain == "weekly"
    assert [r.trigger for r in result.records] == [Trigger.SPEC_CHANGE, Trigger.ANNOTATION]


def test_a_vanished_rayjob_fails_the_run_unless_it_reported_success(minimal_job: dict[str, Any]) -> None:
    job, _ = active_job(minimal_job, "Forbid")
    lost = decide(job, [])
    assert lost.records[0].phase == JobPhase.FAILED
    done = decide(job, [], reports={1: RunReport(stage=Stage.DONE, metrics_after={"accuracy": 0.9})})
    assert done.records[0].phase == JobPhase.SUCCEEDED


def test_suspend_starts_nothing(minimal_job: dict[str, Any]) -> None:
    assert decide(make_job(mutated(minimal_job, "spec.suspend", True)), []).create is None


def test_success_evaluates_the_gate_once(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    report = RunReport(stage=Stage.DONE, metrics_before={"accuracy": 0.25}, metrics_after={"accuracy": 0.75})
    result = decide(job, [observed(job, 1, SUCCEEDED)], reports={1: report})
    record = result.records[0]
    assert record.promotable is True and record.completion_time == NOW
    assert any(e.reason == Reason.RUN_SUCCEEDED and "gate: passed" in e.message for e in result.events)


def test_history_is_bounded_and_old_runs_are_forgotten(minimal_job: dict[str, Any]) -> None:
    job = make_job(mutated(minimal_job, "spec.historyLimit", 2))
    runs = [observed(job, n, SUCCEEDED) for n in range(1, 5)]
    result = decide(job, runs)
    assert [r.number for r in result.records] == [3, 4]
    assert [r.number for r in result.forget] == [1, 2]


def status_of(job: FineTuneJob, decision: Plan) -> dict[str, tuple[str, str, str]]:
    result = compute_status(decision.records, suspended=False, generation=1, previous=None, now=NOW)
    return {c.type: (c.status.value, c.reason, c.message) for c in result.conditions or []}


FAILURES = [
    ({"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}, RunFailure.DEADLINE_EXCEEDED, "Deadline"),
    ({"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed"}, RunFailure.SUBMISSION_FAILED, "Submission"),
    (
        {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed"},
        RunFailure.RAY_JOB_REJECTED,
        "Rejected",
    ),
    ({"jobDeploymentStatus": "Failed", "reason": "AppFailed"}, None, "RunFailed"),
]


@pytest.mark.parametrize(("status", "failure", "reason"), FAILURES)
def test_kuberays_failure_reasons_stay_apart(
    minimal_job: dict[str, Any], status: dict[str, str], failure: RunFailure | None, reason: str
) -> None:
    job = make_job(minimal_job)
    decision = decide(job, [observed(job, 1, status)])
    (run,) = decision.records
    assert run.phase == JobPhase.FAILED and run.failure == failure
    degraded = status_of(job, decision)["Degraded"]
    assert degraded[0] == "True" and reason in degraded[1]


def test_a_run_that_fails_its_own_checks_is_stopped_not_retried(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    report = RunReport(
        stage=Stage.FAILED,
        error="GPUs were requested but this node has no CUDA GPU",
        invalid_field="resources.gpusPerWorker",
    )
    retrying = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}
    decision = decide(job, [observed(job, 1, retrying)], reports={1: report})
    (run,) = decision.records
    assert (run.phase, run.failure) == (JobPhase.FAILED, RunFailure.INVALID_SPEC)
    assert run.message == "spec.resources.gpusPerWorker: GPUs were requested but this node has no CUDA GPU"
    assert decision.stop == ["support-tickets-r1"]  # KubeRay would start it again
    assert status_of(job, decision)["Degraded"][:2] == ("True", "InvalidSpec")
    assert decision.create is None  # the same spec would fail the same way


def test_a_suspended_run_names_its_kueue_queue(minimal_job: dict[str, Any]) -> None:
    job = make_job(mutated(minimal_job, "spec.queueName", "team-a"))
    run = replace(observed(job, 1, {"jobDeploymentStatus": "Suspended"}), queue="team-a")
    decision = decide(job, [run])
    assert decision.records[0].waiting == WaitReason.QUEUED
    progressing = status_of(job, decision)["Progressing"]
    assert progressing[:2] == ("True", "Queued") and "LocalQueue 'team-a'" in progressing[2]


def test_a_run_waiting_for_its_pods_says_which_and_why(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    wait = PodWait(WaitReason.UNSCHEDULABLE, "pod support-tickets-r1-workers-x cannot be scheduled: 0/4 nodes ...")
    initializing = {"jobDeploymentStatus": "Initializing"}
    decision = plan(
        job, generation=1, annotations={}, created=CREATED, observed=[observed(job, 1, initializing)],
        reports={}, now=NOW, pod_waits={1: wait},
    )  # fmt: skip
    (run,) = decision.records
    assert (run.phase, run.waiting, run.message) == (JobPhase.PENDING, WaitReason.UNSCHEDULABLE, wait.message)
    assert status_of(job, decision)["Progressing"][:2] == ("True", "Unschedulable")
    later = decide(job, [observed(job, 1, RUNNING)])  # nothing holds it up any more
    assert later.records[0].waiting is None and later.records[0].message != wait.message


HUB_DOWN = (
    "model.uri: cannot reach the model hub at http://hf-mirror.models.svc:8080 for "
    "hf://sentence-transformers/all-MiniLM-L6-v2 (Connection refused), and the Hugging Face cache does not hold it"
)
STORE_DOWN = (
    "data.train: cannot download: the store at http://minio.storage.svc:9000 is unreachable or busy "
    "(Could not connect to the endpoint URL)"
)
RETRYING = {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}
RETRIES_SPENT = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "failed": 3}
# (what the run reported, the RayJob's status) -> (phase, failure, stopped by the operator, message)
REPORTED_FAILURES = [
    pytest.param(
        {"error": "resources.gpusPerWorker: no CUDA GPU", "invalidField": "resources.gpusPerWorker"},
        RETRYING,
        (JobPhase.FAILED, RunFailure.INVALID_SPEC, True, "spec.resources.gpusPerWorker: no CUDA GPU"),
        id="invalid spec: stopped at once",
    ),
    pytest.param(
        {"error": HUB_DOWN, "unavailable": "ModelHub"},
        RUNNING,  # the driver has exited; KubeRay has not noticed yet
        (JobPhase.RUNNING, None, False, HUB_DOWN),
        id="hub down: KubeRay decides",
    ),
    pytest.param(
        {"error": HUB_DOWN, "unavailable": "ModelHub"},
        RETRYING,
        (JobPhase.RETRYING, None, False, HUB_DOWN),
        id="hub down: retried within backoffLimit",
    ),
    pytest.param(
        {"error": HUB_DOWN, "unavailable": "ModelHub"},
        RETRIES_SPENT,
        (JobPhase.FAILED, RunFailure.MODEL_UNAVAILABLE, False, HUB_DOWN),
        id="hub down: retries spent",
    ),
    pytest.param(
        {"error": HUB_DOWN, "unavailable": "ModelHub"},
        {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded", "message": "deadline passed"},
        (JobPhase.FAILED, RunFailure.DEADLINE_EXCEEDED, False, HUB_DOWN),
        id="hub down: KubeRay's reason wins",
    ),
    pytest.param(
        {"error": STORE_DOWN, "unavailable": "Storage"},
        RETRYING,
        (JobPhase.RETRYING, None, False, STORE_DOWN),
        id="storage down: retried within backoffLimit",
    ),
    pytest.param(
        {"error": STORE_DOWN, "unavailable": "Storage"},
        RETRIES_SPENT,
        (JobPhase.FAILED, RunFailure.STORAGE_UNAVAILABLE, False, STORE_DOWN),
        id="storage down: retries spent",
    ),
    pytest.param(
        {"error": HUB_DOWN, "unavailable": "SomethingNewer"},  # a newer runtime's kind: an ordinary failure
        RETRIES_SPENT,
        (JobPhase.FAILED, None, False, "AppFailed"),
        id="unknown kind: an ordinary failure",
    ),
    pytest.param(
        {"error": "RuntimeError: CUDA out of memory"},
        RETRYING,
        (JobPhase.RETRYING, None, False, "RayJob Retrying, job FAILED"),
        id="ordinary failure: retried",
    ),
]


@pytest.mark.parametrize(("fields", "ray_job", "expected"), REPORTED_FAILURES)
def test_a_reported_failure_is_stopped_or_retried_by_its_kind(
    minimal_job: dict[str, Any], fields: dict[str, Any], ray_job: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    phase, failure, stopped, message = expected
    job = make_job(minimal_job)
    report = RunReport.model_validate({"stage": "failed", **fields})
    decision = decide(job, [observed(job, 1, ray_job)], reports={1: report})
    (run,) = decision.records
    assert (run.phase, run.failure) == (phase, failure)
    assert run.message == message
    assert decision.stop == (["support-tickets-r1"] if stopped else [])
    conditions = status_of(job, decision)
    if phase == JobPhase.FAILED:
        assert conditions["Degraded"][:2] == ("True", failure.value if failure else "RunFailed")
    else:
        assert conditions["Progressing"][0] == "True" and message in conditions["Progressing"][2]


def test_the_last_try_of_an_unreachable_hub_names_it_in_the_events(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    report = RunReport(stage=Stage.FAILED, error=HUB_DOWN, unavailable="ModelHub")
    first = decide(job, [observed(job, 1, RETRYING)], reports={1: report})
    assert [(e.reason, e.type) for e in first.events] == [(Reason.RUN_RETRYING, "Warning")]
    assert "cannot reach the model hub at http://hf-mirror.models.svc:8080" in first.events[0].message
    job.status = FineTuneJobStatus(runs=first.records)
    last = decide(job, [observed(job, 1, RETRIES_SPENT)], reports={1: report})
    assert [(e.reason, e.type) for e in last.events] == [(Reason.RUN_FAILED, "Warning")]
    assert "ModelUnavailable" not in last.events[0].message and HUB_DOWN in last.events[0].message
    failed = status_of(job, last)["Failed"]
    assert failed[:2] == ("True", "ModelUnavailable") and HUB_DOWN in failed[2]


# A finished run's record keeps what it last saw of its RayJob, but never a status that says it is going.
STOPPED_MESSAGE = "stopped before KubeRay ended it (last seen: Running, job RUNNING)"


def _final_ray_job(minimal_job: dict[str, Any], how: str) -> dict[str, Any]:
    if how == "invalid spec":
        job = make_job(minimal_job)
        report = RunReport(stage=Stage.FAILED, error="no CUDA", invalid_field="resources.gpusPerWorker")
        records = decide(job, [observed(job, 1, RUNNING)], reports={1: report}).records
        job.status = FineTuneJobStatus(runs=records)
        # The next pass, as the RayJob is being deleted: the record is final.
        records = decide(job, [observed(job, 1, RUNNING)], reports={1: report}).records
    elif how == "replaced":
        job, runs = active_job(minimal_job, "Replace")
        records = decide(job, runs, annotations={"kubetune.io/retrain": "x"}).records
    elif how == "RayJob deleted":
        job, _ = active_job(minimal_job, "Forbid")
        records = decide(job, []).records
    else:
        job = make_job(minimal_job)
        status = {
            "deadline exceeded": {
                "jobDeploymentStatus": "Failed", "jobStatus": "RUNNING", "reason": "DeadlineExceeded",
                "message": "the RayJob has passed its activeDeadlineSeconds",
            },
            "succeeded": {**SUCCEEDED, "message": "Job finished successfully."},
        }[how]  # fmt: skip
        records = decide(job, [observed(job, 1, status)]).records
    assert records[0].phase in (JobPhase.FAILED, JobPhase.SUCCEEDED) and records[0].ray_job is not None
    return records[0].ray_job.to_wire()


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("invalid spec", {"name": "support-tickets-r1", "message": STOPPED_MESSAGE}),
        ("replaced", {"name": "support-tickets-r1", "message": STOPPED_MESSAGE}),
        ("RayJob deleted", {"name": "support-tickets-r1", "message": STOPPED_MESSAGE}),
        (
            "deadline exceeded",
            {
                "name": "support-tickets-r1",
                "jobDeploymentStatus": "Failed",
                "reason": "DeadlineExceeded",
                "message": "the RayJob has passed its activeDeadlineSeconds",
            },
        ),
        (
            "succeeded",
            {
                "name": "support-tickets-r1",
                "jobDeploymentStatus": "Complete",
                "jobStatus": "SUCCEEDED",
                "message": "Job finished successfully.",
            },
        ),
    ],
)
def test_a_finished_runs_record_never_says_its_rayjob_is_running(
    minimal_job: dict[str, Any], how: str, expected: dict[str, Any]
) -> None:
    assert _final_ray_job(minimal_job, how) == expected


def test_a_report_cannot_point_a_following_endpoint_at_another_claim(minimal_job: dict[str, Any]) -> None:
    job = make_job(minimal_job)
    output = f"{job.spec.output.uri.rstrip('/')}/runs/1"
    report = RunReport(
        stage=Stage.DONE,
        variants={"full": VariantReport(uri=f"{output}/full"), "int8": VariantReport(uri="pvc://hr-payroll/int8")},
        manifest_uri="pvc://hr-payroll/kubetune.json",
    )
    (record,) = decide(job, [observed(job, 1, SUCCEEDED)], reports={1: report}).records
    assert record.artifacts == {"full": f"{output}/full"}
    assert record.manifest_uri is None
