"""FineTuneJob status, computed from what is observed. Pure: no I/O, no clock (time is passed in).

KubeRay's RayJob status maps onto run phases; reports written by the runtime add
progress and results; a pure gate decides which run may be promoted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.operator.api.common import Condition
from kubetune.operator.api.finetunejob import (
    ACTIVE_PHASES,
    MAX_ARTIFACTS,
    MAX_METRICS,
    FineTuneJobStatus,
    JobPhase,
    RayJobState,
    RunFailure,
    RunRecord,
)
from kubetune.operator.conditions import ConditionType, Reason, condition, merge_conditions
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH, SHORT_TEXT_MAX_LENGTH, URI_MAX_LENGTH, Metrics, Uri
from kubetune.runtime.contract.report import RunProgress, RunReport, Stage
from kubetune.runtime.contract.search import Metric
from pydantic import TypeAdapter, ValidationError

from .gate import best_metric
from .gate import gate as gate  # re-exported: the planner and the local run judge runs with it

# The whole status as JSON stays under this many bytes (etcd holds at most 1.5 MiB per object, spec
# included): older runs are summarised, then forgotten, to fit; never the promoted or an active one.
STATUS_MAX_BYTES = 256 * 1024
# What the run history may take of it; conditions and the other fields fit in the rest.
RUNS_MAX_BYTES = STATUS_MAX_BYTES - 32 * 1024
# What a run record keeps of a report's hyperparameters: small ones only.
HYPERPARAMETERS_MAX_BYTES = 4096

# KubeRay's jobDeploymentStatus values that decide the phase by themselves.
_DEPLOYMENT_PHASES: dict[str, tuple[JobPhase, Reason]] = {
    "": (JobPhase.PENDING, Reason.RUN_PENDING),
    "Initializing": (JobPhase.PENDING, Reason.RUN_PENDING),
    "Running": (JobPhase.RUNNING, Reason.RUN_RUNNING),
    "Retrying": (JobPhase.RETRYING, Reason.RUN_RETRYING),
    "Waiting": (JobPhase.WAITING, Reason.RUN_WAITING),
    "Suspending": (JobPhase.SUSPENDED, Reason.RUN_SUSPENDED),
    "Suspended": (JobPhase.SUSPENDED, Reason.RUN_SUSPENDED),
    "Failed": (JobPhase.FAILED, Reason.RUN_FAILED),
    "ValidationFailed": (JobPhase.FAILED, Reason.RUN_FAILED),
}


# KubeRay's RayJob status.reason values that say more than "failed".
_FAILURE_REASONS = {
    "DeadlineExceeded": RunFailure.DEADLINE_EXCEEDED,
    "SubmissionFailed": RunFailure.SUBMISSION_FAILED,
    "ValidationFailed": RunFailure.RAY_JOB_REJECTED,
}


@dataclass(frozen=True)
class RunOutcome:
    phase: JobPhase
    reason: Reason
    message: str
    failure: RunFailure | None = None


def ray_job_outcome(status: Mapping[str, Any] | None) -> RunOutcome:
    """Map a RayJob's status onto a run phase, exactly as KubeRay defines success and failure.

    Success is jobDeploymentStatus Complete with jobStatus SUCCEEDED. Failed, ValidationFailed,
    and Complete with STOPPED (or FAILED) are failures.
    """
    status = status or {}
    deployment = str(status.get("jobDeploymentStatus") or "")
    job_status = str(status.get("jobStatus") or "")
    detail = str(status.get("message") or status.get("reason") or "")
    if deployment == "Complete":
        if job_status == "SUCCEEDED":
            return RunOutcome(JobPhase.SUCCEEDED, Reason.RUN_SUCCEEDED, detail or "the run succeeded")
        if job_status == "STOPPED":
            return RunOutcome(JobPhase.FAILED, Reason.RUN_STOPPED, detail or "the Ray job was stopped")
        if job_status == "FAILED":
            return RunOutcome(JobPhase.FAILED, Reason.RUN_FAILED, detail or "the Ray job failed")
        # Complete before the final job status arrives: still finishing.
        return RunOutcome(JobPhase.RUNNING, Reason.RUN_RUNNING, detail or "the run is finishing")
    if deployment in _DEPLOYMENT_PHASES:
        phase, reason = _DEPLOYMENT_PHASES[deployment]
        default = f"RayJob {deployment or 'created'}" + (f", job {job_status}" if job_status else "")
        failure = None
        if phase == JobPhase.FAILED:
            failure = _FAILURE_REASONS.get(str(status.get("reason") or "")) or _FAILURE_REASONS.get(deployment)
        if failure == RunFailure.RAY_JOB_REJECTED:
            default = "KubeRay rejected the RayJob"
        elif failure == RunFailure.DEADLINE_EXCEEDED:
            default = "the run took longer than its activeDeadlineSeconds"
        return RunOutcome(phase, reason, detail or default, failure)
    return RunOutcome(JobPhase.RUNNING, Reason.RUN_RUNNING, detail or f"RayJob {deployment}")


def ray_job_state(name: str, status: Mapping[str, Any] | None) -> RayJobState:
    """The part of a RayJob's status kept in our status (KubeRay may delete the RayJob)."""
    status = status or {}
    return RayJobState(
        name=name,
        job_status=status.get("jobStatus") or None,
        job_deployment_status=status.get("jobDeploymentStatus") or None,
        reason=status.get("reason") or None,
        message=status.get("message") or None,
        failed=status.get("failed"),
        succeeded=status.get("succeeded"),
    )


# KubeRay's statuses that end a RayJob; any other says it is still going.
_FINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})
_FINAL_JOB_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def finished_ray_job_state(state: RayJobState | None) -> RayJobState | None:
    """What a finished run keeps of its RayJob: never a status that says it is still going.

    A run the operator stopped (its spec cannot work, a newer trigger replaced it), or whose RayJob
    vanished, last showed an active status (Running, job RUNNING) that KubeRay will never update; a
    RayJob that failed on its deadline may keep the job's RUNNING. Such values are dropped, and
    when the RayJob never ended, the message says what was last seen instead of KubeRay's stale one.
    """
    if state is None:
        return None
    deployment, job = state.job_deployment_status, state.job_status
    deployment_going = deployment is not None and deployment not in _FINAL_DEPLOYMENT_STATUSES
    job_going = job is not None and job not in _FINAL_JOB_STATUSES
    if not (deployment_going or job_going):
        return state
    update: dict[str, Any] = {"job_status": None if job_going else job}
    if deployment_going:
        seen = ", ".join(filter(None, [deployment, f"job {job}" if job else None]))
        update |= {"job_deployment_status": None, "message": f"stopped before KubeRay ended it (last seen: {seen})"}
    return state.model_copy(update=update)


def with_report(record: RunRecord, report: RunReport | None, output_uri: str) -> RunRecord:
    """Mirror the runtime's report into the run record.

    `output_uri` is where the run writes (its folder under spec.output.uri): the artifacts and the manifest
    a report names are kept only when they lie there, since an endpoint mounts and loads what they name.
    """
    if report is None:
        return record
    fields = report.model_dump(include=set(RunProgress.model_fields))
    if report.stage == Stage.FAILED:  # a failed run's message is its error, cut to what a message holds
        fields["message"] = report.error[:MESSAGE_MAX_LENGTH] if report.error else None
    progress = RunProgress.model_validate(fields)
    update: dict[str, Any] = {"progress": progress}
    # The report is written by the run's pod: what it holds is bounded before it reaches the status.
    update.update(finite_metrics(report.metrics_before, report.metrics_after))
    if report.variants:
        produced = {
            name: variant.uri for name, variant in report.variants.items() if lies_under(variant.uri, output_uri)
        }
        update["artifacts"] = bounded_artifacts(produced)
    if report.best_variant:
        update["best_variant"] = report.best_variant
    if report.manifest_uri and lies_under(report.manifest_uri, output_uri):
        update["manifest_uri"] = report.manifest_uri
    hyperparameters = bounded_hyperparameters(report.best_hyperparameters)
    if hyperparameters is not None:
        update["best_hyperparameters"] = hyperparameters
    return record.model_copy(update=update)


_URI = TypeAdapter(Uri)


def lies_under(uri: str, folder: str) -> bool:
    """Whether `uri` is a valid URI inside `folder` (same scheme, bucket or claim, and path prefix).

    Its path below the folder may not step out of it: no empty, `.` or `..` segments.
    """
    try:
        _URI.validate_python(uri)
    except ValidationError:
        return False
    base = folder.rstrip("/")
    if not base or not uri.startswith(base + "/"):
        return False
    below = uri[len(base) + 1 :].removesuffix("/")
    return bool(below) and all(part not in ("", ".", "..") for part in below.split("/"))


def bounded_hyperparameters(hyperparameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Reported hyperparameters that a run record keeps: small ones only (None: none, or too large)."""
    if hyperparameters is None or len(json.dumps(hyperparameters)) > HYPERPARAMETERS_MAX_BYTES:
        return None
    return hyperparameters


def bounded_metrics(metrics: Metrics) -> Metrics:
    """At most MAX_METRICS metrics with short names, kubetune's own (accuracy, loss, ...) first."""
    known = {metric.value for metric in Metric}
    names = sorted((n for n in metrics if len(n) <= SHORT_TEXT_MAX_LENGTH), key=lambda n: (n not in known, n))
    return {name: metrics[name] for name in names[:MAX_METRICS]}


def finite_metrics(before: Metrics | None, after: Metrics | None) -> dict[str, Any]:
    """A run record's metrics fields from reported ones: finite values, and which were not (NaN, infinite).

    At most MAX_METRICS metrics per model with short names, kubetune's own (accuracy, loss, ...) first.
    """
    fields: dict[str, Any] = {}
    not_finite: list[str] = []
    for field, wire, metrics in (("metrics_before", "metricsBefore", before), ("metrics_after", "metricsAfter", after)):
        if metrics is None:
            continue
        kept = bounded_metrics(metrics)
        fields[field] = {name: value for name, value in kept.items() if value is not None}
        not_finite += [f"{wire}.{name}" for name, value in kept.items() if value is None]
    if not_finite:
        fields["not_finite"] = not_finite
    return fields


def bounded_artifacts(artifacts: Mapping[str, str]) -> dict[str, str]:
    """At most MAX_ARTIFACTS variants with short names and URIs that fit a URI field, by name."""
    fitting = sorted(
        (name, uri)
        for name, uri in artifacts.items()
        if len(name) <= SHORT_TEXT_MAX_LENGTH and len(uri) <= URI_MAX_LENGTH
    )
    return dict(fitting[:MAX_ARTIFACTS])


def record_bytes(record: RunRecord) -> int:
    """Size of a run record in the status, as JSON."""
    return len(json.dumps(record.to_wire()))  # with json.dumps' spaces: a little over what is sent


def summarised(record: RunRecord) -> RunRecord:
    """What is kept of an older run when the history is over its budget: the outcome, not the details."""
    return record.model_copy(update={"progress": None, "ray_job": None, "best_hyperparameters": None})


def fit_history(records: list[RunRecord], budget: int = RUNS_MAX_BYTES) -> tuple[list[RunRecord], list[RunRecord]]:
    """Keep the run history under `budget` bytes of JSON; return (kept, dropped).

    Oldest first, finished runs are summarised, then forgotten, until it fits. The promoted
    run and active runs are kept whole: what they hold is bounded field by field.
    """
    promoted = next((r.number for r in reversed(records) if r.gate is not None and r.gate.passed), None)
    protected = {r.number for r in records if r.phase in ACTIVE_PHASES or r.number == promoted}
    kept = list(records)
    sizes = [record_bytes(r) for r in kept]
    total = sum(sizes)
    for index, record in enumerate(kept):
        if total <= budget:
            return kept, []
        if record.number not in protected:
            kept[index] = summarised(record)
            size = record_bytes(kept[index])
            total, sizes[index] = total + size - sizes[index], size
    dropped: set[int] = set()
    for index, record in enumerate(kept):
        if total <= budget:
            break
        if record.number not in protected:
            dropped.add(record.number)
            total -= sizes[index]
    return [r for r in kept if r.number not in dropped], [r for r in records if r.number in dropped]


@dataclass(frozen=True)
class Problem:
    """Why the job cannot run at all (an invalid spec, a missing Secret), with the field named."""

    reason: Reason
    message: str


def _conditions(
    records: list[RunRecord],
    promoted: RunRecord | None,
    suspended: bool,
    generation: int | None,
    problem: Problem | None,
) -> list[Condition]:
    if problem is not None:
        return [
            condition(kind, kind == ConditionType.DEGRADED, problem.reason, problem.message, generation)
            for kind in (ConditionType.READY, ConditionType.PROGRESSING, ConditionType.DEGRADED)
        ]
    active = next((r for r in reversed(records) if r.phase in ACTIVE_PHASES), None)
    finished = [r for r in records if r.phase not in ACTIVE_PHASES]
    latest = finished[-1] if finished else None
    result = []
    if promoted is not None:
        result.append(
            condition(
                ConditionType.READY,
                True,
                Reason.PROMOTED,
                f"run {promoted.number} is promoted: {promoted.gate.message if promoted.gate else ''}",
                generation,
            )
        )
    elif latest is not None:
        result.append(
            condition(
                ConditionType.READY,
                False,
                Reason.GATE_NOT_PASSED,
                (latest.gate.message if latest.gate else None) or latest.message or "no run passed the gate",
                generation,
            )
        )
    else:
        result.append(condition(ConditionType.READY, False, Reason.NO_RUN_YET, "no run has finished yet", generation))
    if active is not None:
        reason = {
            JobPhase.PENDING: Reason.RUN_PENDING,
            JobPhase.RETRYING: Reason.RUN_RETRYING,
            JobPhase.WAITING: Reason.RUN_WAITING,
            JobPhase.SUSPENDED: Reason.RUN_SUSPENDED,
        }.get(active.phase, Reason.RUN_RUNNING)
        if active.waiting is not None:  # what holds it up says more than its phase
            reason = Reason(active.waiting.value)
        result.append(
            condition(
                ConditionType.PROGRESSING,
                True,
                reason,
                f"run {active.number}: {active.message or active.phase.value}",
                generation,
            )
        )
    elif suspended:
        result.append(
            condition(
                ConditionType.PROGRESSING,
                False,
                Reason.JOB_SUSPENDED,
                "spec.suspend is true: no new runs start",
                generation,
            )
        )
    else:
        result.append(condition(ConditionType.PROGRESSING, False, Reason.IDLE, "no run is active", generation))
    failed = latest is not None and latest.phase == JobPhase.FAILED
    failure = Reason(latest.failure.value) if latest is not None and latest.failure else Reason.RUN_FAILED
    result.append(
        condition(
            ConditionType.DEGRADED,
            failed,
            failure if failed else Reason.IDLE,
            (latest.message or "") if failed and latest else "",
            generation,
        )
    )
    if latest is not None:
        succeeded = latest.phase == JobPhase.SUCCEEDED
        result.append(
            condition(
                ConditionType.SUCCEEDED,
                succeeded,
                Reason.RUN_SUCCEEDED if succeeded else Reason.RUN_FAILED,
                f"run {latest.number}: {latest.message or latest.phase.value}",
                generation,
            )
        )
        result.append(
            condition(
                ConditionType.FAILED,
                not succeeded,
                failure if not succeeded else Reason.RUN_SUCCEEDED,
                f"run {latest.number}: {latest.message or latest.phase.value}",
                generation,
            )
        )
    return result


def trim_history(records: list[RunRecord], limit: int) -> tuple[list[RunRecord], list[RunRecord]]:
    """Keep every active run and the newest `limit` finished ones; return (kept, dropped)."""
    finished = [r for r in records if r.phase not in ACTIVE_PHASES]
    dropped = {r.number for r in finished[:-limit]} if len(finished) > limit else set()
    return [r for r in records if r.number not in dropped], [r for r in records if r.number in dropped]


def compute_status(
    records: list[RunRecord],
    *,
    suspended: bool,
    generation: int | None,
    previous: FineTuneJobStatus | None,
    now: datetime,
    last_schedule_time: datetime | None = None,
    handled_retrain: str | None = None,
    problem: Problem | None = None,
) -> FineTuneJobStatus:
    """The whole status from the run records (already merged with observations and trimmed)."""
    records = sorted(records, key=lambda r: r.number)
    promoted = next((r for r in reversed(records) if r.gate is not None and r.gate.passed), None)
    active = next((r for r in reversed(records) if r.phase in ACTIVE_PHASES), None)
    if problem is not None:
        phase: JobPhase | None = JobPhase.INVALID
    elif active is not None:
        phase = active.phase
    elif records:
        phase = records[-1].phase
    else:
        phase = JobPhase.PENDING
    conditions = merge_conditions(
        previous.conditions if previous else None, _conditions(records, promoted, suspended, generation, problem), now
    )
    return FineTuneJobStatus(
        observed_generation=generation,
        phase=phase,
        conditions=conditions,
        current_run=active.number if active else None,
        runs=records or None,
        promoted_run=promoted.number if promoted else None,
        best_metric=best_metric(promoted.gate) if promoted else None,
        last_schedule_time=last_schedule_time,
        handled_retrain=handled_retrain,
    )
