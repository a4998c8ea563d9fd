"""What starts a run: the run-relevant spec (by its hash), the retrain annotation, a schedule. Pure."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import datetime

from kubetune.operator.api.finetunejob import FineTuneJob, Trigger
from kubetune.runtime.contract.common import SHORT_TEXT_MAX_LENGTH

# Spec fields that do not change what a run does: editing them starts no run.
NOT_RUN_RELEVANT = frozenset({"schedule", "timeZone", "concurrencyPolicy", "suspend", "historyLimit", "promotion"})


@dataclass(frozen=True)
class Handled:
    """The latest retrain annotation value and scheduled time that started (or were skipped for) a run."""

    retrain: str | None
    last_schedule_time: datetime | None

    def including(self, triggers: list[tuple[Trigger, str]]) -> Handled:
        handled = self
        for trigger, detail in triggers:
            if trigger == Trigger.ANNOTATION:
                handled = replace(handled, retrain=detail)
            elif trigger == Trigger.SCHEDULE:
                handled = replace(handled, last_schedule_time=datetime.fromisoformat(detail))
        return handled


def run_spec_hash(job: FineTuneJob) -> str:
    """Hash of the run-relevant part of the spec (what a run would do differently)."""
    wire = {k: v for k, v in job.spec.to_wire().items() if k not in NOT_RUN_RELEVANT}
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def retrain_token(value: str) -> str:
    """The retrain annotation's value as runs record it: a long value by its digest, so records stay small."""
    value = value.strip()
    if len(value) <= SHORT_TEXT_MAX_LENGTH:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()
