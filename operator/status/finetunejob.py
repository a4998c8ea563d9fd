"""FineTuneJob status, computed from what is observed. Pure: no I/O, no clock (time is passed in).

KubeRay's RayJob status maps onto run phases; reports written by the runtime add
progress and results; a pure gate decides which run may be promoted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.operator.api.common import Condition
from kubetune.operator.api.finetunejob import (
    ACTIVE_PHASES,
    FineTuneJob,
    FineTuneJobStatus,
    GateReason,
    GateResult,
    JobPhase,
    RayJobState,
    RunRecord,
)
from kubetune.operator.conditions import ConditionType, Reason, condition, merge_conditions
from kubetune.runtime.contract.report import MESSAGE_MAX_LENGTH, RunProgress, RunReport, Stage
from kubetune.runtime.contract.search import METRIC_MODE, Metric, Mode
from kubetune.runtime.contract.serving import Variant

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


@dataclass(frozen=True)
class RunOutcome:
    phase: JobPhase
    reason: Reason
    message: str


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
        if deployment == "ValidationFailed":
            default = "KubeRay rejected the RayJob"
        return RunOutcome(phase, reason, detail or default)
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


def with_report(record: RunRecord, report: RunReport | None) -> RunRecord:
    """Mirror the runtime's report into the run record."""
    if report is None:
        return record
    fields = report.model_dump(include=set(RunProgress.model_fields))
    if report.stage == Stage.FAILED:  # a failed run's message is its error, cut to what a message holds
        fields["message"] = report.error[:MESSAGE_MAX_LENGTH] if report.error else None
    progress = RunProgress.model_validate(fields)
    update: dict[str, Any] = {"progress": progress}
    if report.metrics_before is not None:
        update["metrics_before"] = report.metrics_before
    if report.metrics_after is not None:
        update["metrics_after"] = report.metrics_after
    if report.variants:
        update["artifacts"] = {name: variant.uri for name, variant in report.variants.items()}
    if report.best_variant:
        update["best_variant"] = report.best_variant
    if report.manifest_uri:
        update["manifest_uri"] = report.manifest_uri
    if report.best_hyperparameters is not None:
        update["best_hyperparameters"] = report.best_hyperparameters
    return record.model_copy(update=update)


def gate(job: FineTuneJob, record: RunRecord, report: RunReport | None = None) -> GateResult:
    """Whether a finished run may be promoted, and why."""
    promotion = job.spec.promotion
    if record.phase != JobPhase.SUCCEEDED:
        return GateResult(
            passed=False, reason=GateReason.RUN_NOT_SUCCEEDED, message=f"run {record.number} did not succeed"
        )
    if not promotion.enabled:
        return GateResult(passed=False, reason=GateReason.PROMOTION_DISABLED, message="promotion is disabled")
    metric: Metric = promotion.metric or job.spec.search_metric
    before = (record.metrics_before or {}).get(metric.value)
    after = (record.metrics_after or {}).get(metric.value)
    measured = {"metric": metric, "value": after, "baseline": before}
    if after is None:
        return GateResult(
            passed=False,
            reason=GateReason.METRIC_MISSING,
            message=f"run {record.number} reported no {metric.value}",
            **measured,
        )
    maximise = METRIC_MODE[metric] == Mode.MAX
    if before is not None:
        improvement = after - before if maximise else before - after
        if improvement < promotion.min_improvement:
            return GateResult(
                passed=False,
                reason=GateReason.IMPROVEMENT_TOO_SMALL,
                message=f"{metric.value} improved by {improvement:.4g}, "
                f"less than promotion.minImprovement {promotion.min_improvement:g}",
                **measured,
            )
    if promotion.min_value is not None and (after < promotion.min_value if maximise else after > promotion.min_value):
        bound = "at least" if maximise else "at most"
        return GateResult(
            passed=False,
            reason=GateReason.OUT_OF_BOUND,
            message=f"{metric.value} {after:.4g} is not {bound} promotion.minValue {promotion.min_value:g}",
            **measured,
        )
    if promotion.require_compressed:
        variants = (report.variants if report else None) or {}
        if not any(v.accepted for name, v in variants.items() if name not in (Variant.FULL, Variant.MERGED)):
            return GateResult(
                passed=False,
                reason=GateReason.NO_COMPRESSED_VARIANT,
                message="no compressed variant within compression.maxAccuracyDrop",
                **measured,
            )
    message = f"{metric.value} {after:.4g}" + (f" (base {before:.4g})" if before is not None else "")
    return GateResult(passed=True, reason=GateReason.PASSED, message=message, **measured)


def best_metric(verdict: GateResult | None) -> str | None:
    """What the printer column Best shows of a promoted run, e.g. `accuracy=0.91`."""
    if verdict is None or verdict.metric is None or verdict.value is None:
        return None
    return f"{verdict.metric.value}={verdict.value:.4g}"


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
    result.append(
        condition(
            ConditionType.DEGRADED,
            failed,
            Reason.RUN_FAILED if failed else Reason.IDLE,
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
                Reason.RUN_FAILED if not succeeded else Reason.RUN_SUCCEEDED,
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
