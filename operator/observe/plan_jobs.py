"""A GPU run's plan Job as the operator reads it: whether it failed, and why. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PlanJobState:
    """The observed plan Job of a run: why it failed, when it did (None: running, or done)."""

    failure: str | None = None


def observe_plan_job(job: Mapping[str, Any]) -> PlanJobState:
    """The Job's failure from its Failed condition (backoffLimit spent, deadline passed), with the Job's words."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            reason = condition.get("reason") or "Failed"
            name = (job.get("metadata") or {}).get("name")
            detail = f": {condition['message']}" if condition.get("message") else ""
            return PlanJobState(failure=f"{reason}{detail} (kubectl logs job/{name})")
    return PlanJobState()
