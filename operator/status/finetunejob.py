"""FineTuneJob status, assembled from its run records. Pure: no I/O, no clock (time is passed in).

The records are already merged with what was observed (observe/) and kept within the history's
budgets (history.py); the conditions come from conditions.py, the promoted run's verdict from gate.py.
"""

from __future__ import annotations

from datetime import datetime

from kubetune.operator.api.finetunejob import ACTIVE_PHASES, FineTuneJobStatus, JobPhase, RunRecord
from kubetune.operator.conditions import merge_conditions
from kubetune.operator.model.events import Problem

from .conditions import finetunejob_conditions
from .gate import best_metric


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
        previous.conditions if previous else None,
        finetunejob_conditions(records, promoted, suspended, generation, problem),
        now,
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
