"""A FineTuneJob's conditions, from its runs, its promoted run and what stops it. Pure."""

from __future__ import annotations

from kubetune.operator.api.common import Condition
from kubetune.operator.api.finetunejob import ACTIVE_PHASES, JobPhase, RunRecord
from kubetune.operator.conditions import ConditionType, Reason, condition
from kubetune.operator.model.events import Problem


def finetunejob_conditions(
    records: list[RunRecord],
    promoted: RunRecord | None,
    suspended: bool,
    generation: int | None,
    problem: Problem | None,
) -> list[Condition]:
    """Ready, Progressing and Degraded, and Succeeded and Failed once a run finished (`problem`: why none can run)."""
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
            JobPhase.PLANNING: Reason.RUN_PLANNING,
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
