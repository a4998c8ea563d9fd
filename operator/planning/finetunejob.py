"""Decide what a FineTuneJob needs next: which runs to start, stop or forget. Pure (time is passed in).

Triggers are derived from the object and its runs each time, never remembered in
memory, so a restarted operator reaches the same decisions: the spec changed since
the latest run, the retrain annotation has a value no run has handled, or a
scheduled time passed that no run has handled. A run records its trigger on its
RayJob, so a run that was created just before a crash is still seen as handled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from kubetune.operator.api.finetunejob import (
    ACTIVE_PHASES,
    FINISHED_PHASES,
    RETRAIN_ANNOTATION,
    ConcurrencyPolicy,
    FineTuneJob,
    JobPhase,
    RunFailure,
    RunRecord,
    Trigger,
    WaitReason,
)
from kubetune.operator.conditions import Reason
from kubetune.operator.model.events import Event
from kubetune.operator.naming import run_name, run_output_uri
from kubetune.operator.observe.kuberay import ObservedRun, finished_ray_job_state, ray_job_outcome, ray_job_state
from kubetune.operator.observe.plan_jobs import PlanJobState
from kubetune.operator.observe.pods import PodWait
from kubetune.operator.observe.reports import with_report
from kubetune.operator.status.gate import gate
from kubetune.operator.status.history import fit_history, trim_history
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH
from kubetune.runtime.contract.plan import RunPlan
from kubetune.runtime.contract.report import RunReport, Stage, Unavailable

from .gpu_plans import PLANNING_MESSAGE, PLANNING_RECHECK_SECONDS, planned, plans_first
from .schedule import ScheduleError as ScheduleError  # re-exported: the reconciler reports it
from .schedule import latest_due, next_due
from .triggers import Handled
from .triggers import retrain_token as retrain_token  # re-exported: what the tests and the reconciler read here
from .triggers import run_spec_hash as run_spec_hash

REPLACED = "replaced by a newer trigger (concurrencyPolicy Replace)"
# A safety net only: RayJob and report changes reach the operator as watch events.
RECHECK_SECONDS = 300.0
# How a run that could not reach what it needs ends once KubeRay's retries (backoffLimit) are spent.
UNAVAILABLE_FAILURES = {
    Unavailable.MODEL_HUB: RunFailure.MODEL_UNAVAILABLE,
    Unavailable.STORAGE: RunFailure.STORAGE_UNAVAILABLE,
}


@dataclass(frozen=True)
class RunRequest:
    """A run the operator decided to start."""

    number: int
    trigger: Trigger
    trigger_detail: str
    spec_generation: int
    trigger_hash: str


@dataclass(frozen=True)
class Plan:
    """What to do now: the run to create, the RayJobs to stop, the runs to forget, and the new records."""

    records: list[RunRecord]
    create: RunRequest | None = None
    # Planned runs that fit: their RayJobs are created now.
    launch: list[RunRequest] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    forget: list[RunRecord] = field(default_factory=list)
    handled_retrain: str | None = None
    last_schedule_time: datetime | None = None
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    # Runs that finished in this pass (their gate verdict included): what the run metrics count.
    finished: list[RunRecord] = field(default_factory=list)


@dataclass(frozen=True)
class _Decision:
    """What the concurrency policy makes of the pending triggers."""

    records: list[RunRecord]
    handled: Handled
    create: RunRequest | None = None
    stop: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


def _finish(job: FineTuneJob, record: RunRecord, now: datetime, report: RunReport | None) -> RunRecord:
    update = {"completion_time": record.completion_time or now, "ray_job": finished_ray_job_state(record.ray_job)}
    finished = record.model_copy(update=update)
    return finished.judged(gate(job, finished, report))


def queued_message(queue: str) -> str:
    return (
        f"suspended until Kueue admits it through LocalQueue {queue!r} "
        "(Kueue must be installed and the queue defined in this namespace)"
    )


def merge_observations(
    job: FineTuneJob,
    observed: list[ObservedRun],
    reports: Mapping[int, RunReport],
    now: datetime,
    waits: Mapping[int, PodWait] | None = None,
    plans: Mapping[int, RunPlan] | None = None,
    plan_jobs: Mapping[int, PlanJobState] | None = None,
) -> tuple[list[RunRecord], list[Event], list[int]]:
    """Run records from the last status updated with the RayJobs, reports, plans and waiting pods seen now,
    and the planned runs whose RayJobs are to be created (`plan_jobs`: the plan Jobs that exist)."""
    waits, plans, plan_jobs = waits or {}, plans or {}, plan_jobs or {}
    launch: list[int] = []
    previous = {r.number: r for r in (job.status.runs if job.status and job.status.runs else [])}
    records = dict(previous)
    events: list[Event] = []
    seen = set()
    for run in observed:
        seen.add(run.number)
        record = records.get(run.number) or RunRecord(
            number=run.number,
            ray_job_name=run.name,
            trigger=run.trigger,
            trigger_detail=run.trigger_detail,
            spec_generation=run.spec_generation,
            trigger_hash=run.trigger_hash,
            phase=JobPhase.PENDING,
            start_time=run.created,
        )
        if record.phase in FINISHED_PHASES:  # final: KubeRay's later changes do not reopen it
            output = run_output_uri(job.spec.output.uri, run.number)
            records[run.number] = (
                with_report(record, reports.get(run.number), output) if not record.progress else record
            )
            continue
        outcome = ray_job_outcome(run.status)
        update: dict[str, Any] = {
            "phase": outcome.phase,
            "message": outcome.message,
            "failure": outcome.failure,
            "waiting": None,
            "ray_job": ray_job_state(run.name, run.status),
        }
        report = reports.get(run.number)
        if report is not None and report.stage == Stage.FAILED and report.invalid_field:
            # The run checked its spec and found it cannot work: stopped, not retried by KubeRay.
            detail = (report.error or "the run cannot work as specified").removeprefix(f"{report.invalid_field}: ")
            message = f"spec.{report.invalid_field}: {detail}"
            update.update(phase=JobPhase.FAILED, failure=RunFailure.INVALID_SPEC, message=message)
        elif outcome.phase == JobPhase.SUSPENDED and run.queue:
            update.update(waiting=WaitReason.QUEUED, message=queued_message(run.queue))
        elif outcome.phase in ACTIVE_PHASES and run.number in waits:
            wait = waits[run.number]
            update.update(waiting=wait.reason, message=wait.message)
        elif report is not None and report.stage == Stage.FAILED and report.unavailable is not None:
            # Not the spec: KubeRay retries the run within backoffLimit; until then, and after, it says why.
            update["message"] = (report.error or f"{report.unavailable.value} unavailable")[:MESSAGE_MAX_LENGTH]
            if outcome.phase == JobPhase.FAILED and outcome.failure is None:
                update["failure"] = UNAVAILABLE_FAILURES.get(report.unavailable)
        record = with_report(record.model_copy(update=update), report, run_output_uri(job.spec.output.uri, run.number))
        if outcome.phase in FINISHED_PHASES or record.phase in FINISHED_PHASES:
            record = _finish(job, record, now, reports.get(run.number))
        records[run.number] = record
    for number, record in previous.items():
        if number in seen or record.phase not in ACTIVE_PHASES:
            continue
        if record.phase == JobPhase.PLANNING:
            record, fits = planned(record, plans.get(number), plan_jobs.get(number), waits.get(number))
            records[number] = _finish(job, record, now, None) if record.phase in FINISHED_PHASES else record
            if fits:
                launch.append(number)
            continue
        report = reports.get(number)
        done = report is not None and report.stage == Stage.DONE
        lost = record.model_copy(
            update={
                "phase": JobPhase.SUCCEEDED if done else JobPhase.FAILED,
                "message": "the RayJob is gone; the run reported success"
                if done
                else "the RayJob was deleted before the run finished",
            }
        )
        records[number] = _finish(
            job, with_report(lost, report, run_output_uri(job.spec.output.uri, number)), now, report
        )
    for number, record in sorted(records.items()):
        before = previous.get(number)
        if before is None or before.phase != record.phase:
            events.append(_transition_event(record))
    return [records[n] for n in sorted(records)], events, launch


def _transition_event(record: RunRecord) -> Event:
    reasons = {
        JobPhase.PLANNING: Reason.RUN_PLANNING,
        JobPhase.SUCCEEDED: Reason.RUN_SUCCEEDED,
        JobPhase.FAILED: Reason.RUN_FAILED,
        JobPhase.RUNNING: Reason.RUN_RUNNING,
        JobPhase.RETRYING: Reason.RUN_RETRYING,
        JobPhase.SUSPENDED: Reason.RUN_SUSPENDED,
        JobPhase.WAITING: Reason.RUN_WAITING,
    }
    reason = reasons.get(record.phase, Reason.RUN_PENDING)
    kind = "Warning" if record.phase in (JobPhase.FAILED, JobPhase.RETRYING) else "Normal"
    message = f"run {record.number} ({record.ray_job_name}) is {record.phase.value}"
    if record.message:
        message += f": {record.message}"
    if record.phase == JobPhase.SUCCEEDED and record.gate is not None:
        message += f"; gate: {'passed' if record.gate.passed else 'not passed'} ({record.gate.message})"
    return Event(kind, reason, message)


def plan(
    job: FineTuneJob,
    *,
    generation: int,
    annotations: Mapping[str, str],
    created: datetime,
    observed: list[ObservedRun],
    reports: Mapping[int, RunReport],
    now: datetime,
    recheck_seconds: float = RECHECK_SECONDS,
    pod_waits: Mapping[int, PodWait] | None = None,
    plans: Mapping[int, RunPlan] | None = None,
    plan_jobs: Mapping[int, PlanJobState] | None = None,
) -> Plan:
    """What to do now, given everything observed (`pod_waits`: why a run's pods cannot run, by run number;
    `plans`: the plans written, `plan_jobs`: the plan Jobs that exist, by run number)."""
    records, events, launch = merge_observations(job, observed, reports, now, pod_waits, plans, plan_jobs)
    # A run that failed its own checks is stopped now: KubeRay would retry it backoffLimit times.
    invalid = {r.number for r in records if r.failure == RunFailure.INVALID_SPEC}
    stop_invalid = [run.name for run in observed if run.number in invalid]
    status = job.status
    handled = Handled(status.handled_retrain if status else None, status.last_schedule_time if status else None)
    trigger_hash = run_spec_hash(job)

    pending: list[tuple[Trigger, str]] = []
    latest = records[-1] if records else None
    if latest is None or latest.trigger_hash != trigger_hash:
        pending.append((Trigger.SPEC_CHANGE, f"generation {generation}"))
    triggers: list[tuple[Trigger, str]] = []
    retrain = retrain_token(annotations.get(RETRAIN_ANNOTATION, ""))
    if retrain and retrain != handled.retrain:
        triggers.append((Trigger.ANNOTATION, retrain))
    due = latest_due(job, max(filter(None, [handled.last_schedule_time, created])), now)
    if due is not None:
        triggers.append((Trigger.SCHEDULE, due.isoformat()))
    ran = {(r.trigger, r.trigger_detail) for r in records}
    pending += [trigger for trigger in triggers if trigger not in ran]
    # A trigger whose run exists was handled: the run was created just before a crash.
    decision = _Decision(records, handled.including([trigger for trigger in triggers if trigger in ran]))
    if pending and not job.spec.suspend:
        active = [r for r in records if r.phase in ACTIVE_PHASES]
        decision = _decide(job, decision, pending, active, generation, trigger_hash, now)
    kept, dropped = trim_history(decision.records, job.spec.history_limit)
    kept, over_budget = fit_history(kept)
    waits = [recheck_seconds] if any(r.phase in ACTIVE_PHASES for r in kept) else []
    if any(r.phase == JobPhase.PLANNING for r in kept):
        waits.append(PLANNING_RECHECK_SECONDS)
    upcoming = next_due(job, now)
    if upcoming is not None:
        waits.append(max(1.0, (upcoming - now).total_seconds()))
    before = {r.number: r.phase for r in (status.runs if status and status.runs else [])}
    return Plan(
        records=kept,
        create=decision.create,
        # Not a run that the same pass replaced (concurrencyPolicy Replace) or forgot.
        launch=[_request(r) for r in kept if r.number in launch and r.phase == JobPhase.PENDING],
        stop=[*stop_invalid, *(name for name in decision.stop if name not in stop_invalid)],
        forget=dropped + over_budget,
        handled_retrain=decision.handled.retrain,
        last_schedule_time=decision.handled.last_schedule_time,
        events=events + decision.events,
        requeue_after=min(waits) if waits else None,
        finished=[
            r for r in decision.records if r.phase in FINISHED_PHASES and before.get(r.number) not in FINISHED_PHASES
        ],
    )


def _request(record: RunRecord) -> RunRequest:
    """The request a run was created with, from its record: what its RayJob is built from."""
    return RunRequest(
        number=record.number,
        trigger=record.trigger,
        trigger_detail=record.trigger_detail or "",
        spec_generation=record.spec_generation,
        trigger_hash=record.trigger_hash or "",
    )


def name_conflict(job: FineTuneJob, decision: Plan, message: str, now: datetime, number: int | None = None) -> Plan:
    """The plan after the run it creates (or run `number`, one it launches after its plan) found one of its
    names taken by an object that is not the job's.

    The run fails (nothing of the other object is read, so nothing is promoted) and says why.
    """
    if number is None:
        if decision.create is None:
            return decision
        number = decision.create.number
    created = decision.create is not None and decision.create.number == number
    records = [
        _finish(
            job,
            r.model_copy(update={"phase": JobPhase.FAILED, "failure": RunFailure.NAME_CONFLICT, "message": message}),
            now,
            None,
        )
        if r.number == number
        else r
        for r in decision.records
    ]
    events = [e for e in decision.events if e.reason != Reason.RUN_CREATED] if created else decision.events
    warning = Event("Warning", Reason.NAME_CONFLICT, f"run {number} not started: {message}")
    return replace(
        decision,
        records=records,
        create=None if created else decision.create,
        launch=[request for request in decision.launch if request.number != number],
        events=[*events, warning],
        finished=[*decision.finished, *(r for r in records if r.number == number)],
    )


def _decide(
    job: FineTuneJob,
    decision: _Decision,
    pending: list[tuple[Trigger, str]],
    active: list[RunRecord],
    generation: int,
    trigger_hash: str,
    now: datetime,
) -> _Decision:
    policy = job.spec.concurrency_policy
    if active and policy == ConcurrencyPolicy.FORBID:
        # A spec change waits (the spec is desired state); other triggers are dropped.
        dropped: list[tuple[Trigger, str]] = [(t, d) for t, d in pending if t != Trigger.SPEC_CHANGE]
        skipped = [
            Event(
                "Normal",
                Reason.TRIGGER_SKIPPED,
                f"{trigger.value} trigger {detail} skipped: run {active[-1].number} is active "
                "and concurrencyPolicy is Forbid",
            )
            for trigger, detail in dropped
        ]
        return replace(decision, handled=decision.handled.including(dropped), events=skipped)
    if active and policy == ConcurrencyPolicy.QUEUE:
        return decision  # the triggers stay pending until the active run finishes
    stopped = {r.number for r in active}  # Replace stops the active runs
    records = [
        _finish(job, r.model_copy(update={"phase": JobPhase.FAILED, "message": REPLACED}), now, None)
        if r.number in stopped
        else r
        for r in decision.records
    ]
    events = [Event("Normal", Reason.RUN_REPLACED, f"run {r.number} stopped: replaced") for r in active]
    trigger, detail = pending[0]
    number = max((r.number for r in records), default=0) + 1
    name = run_name(job.metadata["name"], number)
    first = plans_first(job)
    record = RunRecord(
        number=number,
        ray_job_name=name,
        trigger=trigger,
        trigger_detail=detail,
        spec_generation=generation,
        trigger_hash=trigger_hash,
        phase=JobPhase.PLANNING if first else JobPhase.PENDING,
        message=PLANNING_MESSAGE if first else "RayJob created",
        start_time=now,
        # What observing the new RayJob gives (no status yet); a planned run has none yet.
        ray_job=None if first else ray_job_state(name, None),
    )
    return _Decision(
        records=[*records, record],
        handled=decision.handled.including(pending),
        create=RunRequest(
            number=number, trigger=trigger, trigger_detail=detail, spec_generation=generation, trigger_hash=trigger_hash
        ),
        stop=[r.ray_job_name for r in active],
        events=[
            *events,
            Event("Normal", Reason.RUN_CREATED, f"run {number} ({name}) started: {trigger.value} {detail}"),
        ],
    )
