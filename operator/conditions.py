"""Condition types, reasons and event reasons: named constants, and a pure condition merger."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from kubetune.operator.api.common import Condition, ConditionStatus


class ConditionType(StrEnum):
    READY = "Ready"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Reason(StrEnum):
    """Reasons of conditions and events."""

    INVALID_SPEC = "InvalidSpec"
    RECONCILE_FAILED = "ReconcileFailed"  # a pass failed unexpectedly; it is retried with backoff
    RUN_CREATED = "RunCreated"
    RUN_PLANNING = "RunPlanning"
    RUN_PENDING = "RunPending"
    RUN_RUNNING = "RunRunning"
    RUN_RETRYING = "RunRetrying"
    RUN_WAITING = "RunWaiting"
    RUN_SUSPENDED = "RunSuspended"
    RUN_SUCCEEDED = "RunSucceeded"
    RUN_FAILED = "RunFailed"
    RUN_STOPPED = "RunStopped"
    RUN_REPLACED = "RunReplaced"
    NAME_CONFLICT = "NameConflict"
    # Ray token authentication is on, but the installed KubeRay cannot give it (operator/kuberay.py).
    RAY_AUTH_UNAVAILABLE = "RayAuthUnavailable"
    # Why a run failed (RunFailure) or waits (WaitReason): the same words in conditions and events.
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SUBMISSION_FAILED = "SubmissionFailed"
    RAY_JOB_REJECTED = "RayJobRejected"
    MODEL_UNAVAILABLE = "ModelUnavailable"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    PLAN_FAILED = "PlanFailed"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    POD_CONFIG_ERROR = "PodConfigError"
    QUEUED = "Queued"
    TRIGGER_SKIPPED = "TriggerSkipped"
    PROMOTED = "Promoted"
    GATE_NOT_PASSED = "GateNotPassed"
    NO_RUN_YET = "NoRunYet"
    IDLE = "Idle"
    JOB_SUSPENDED = "JobSuspended"
    # ModelDeployment
    NO_MODEL_YET = "NoModelYet"
    FINE_TUNE_JOB_NOT_FOUND = "FineTuneJobNotFound"
    RUN_NOT_SERVABLE = "RunNotServable"
    ROLLOUT_STARTED = "RolloutStarted"
    DEPLOYING = "Deploying"
    SERVING = "Serving"
    ROLLOUT_SUCCEEDED = "RolloutSucceeded"
    ROLLED_BACK = "RolledBack"
    ROLLOUT_FAILED = "RolloutFailed"
    APPLICATION_UNHEALTHY = "ApplicationUnhealthy"


def condition(kind: ConditionType, status: bool, reason: Reason, message: str, generation: int | None) -> Condition:
    return Condition(
        type=kind.value,
        status=ConditionStatus.TRUE if status else ConditionStatus.FALSE,
        reason=reason.value,
        message=message,
        observed_generation=generation,
    )


def merge_conditions(previous: list[Condition] | None, current: list[Condition], now: datetime) -> list[Condition]:
    """Stamp lastTransitionTime: kept from before when the status did not change, `now` when it did."""
    before = {c.type: c for c in previous or []}
    merged = []
    for item in current:
        old = before.get(item.type)
        changed = old is None or old.status != item.status or old.last_transition_time is None
        stamp = now if changed else old.last_transition_time  # type: ignore[union-attr]
        merged.append(item.model_copy(update={"last_transition_time": stamp}))
    return merged
