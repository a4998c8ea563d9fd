"""ModelDeployment status, computed from the rollout state and the RayService as KubeRay reports it. Pure.

KubeRay's semantics: the RayService's `Ready` condition (serve endpoints exist), its
application status (DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, ...) on the active
cluster and, while it brings up a new one, on the pending cluster, and its
observedGeneration (whether those describe the latest spec). A pod of the endpoint that
cannot run (unschedulable, its image not pulled, its configuration broken) is why a
rollout, or an endpoint that does not run, makes no progress.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kubetune.operator.api.modeldeployment import DeploymentPhase, ModelDeploymentStatus, RejectedModel, ServedModel
from kubetune.operator.conditions import ConditionType, Reason, condition, merge_conditions
from kubetune.operator.model.events import Event, Problem
from kubetune.operator.observe.kuberay import RUNNING, ObservedService
from kubetune.operator.observe.pods import PodWait


@dataclass(frozen=True)
class Rollout:
    """The next state of what is served, and what to tell about it."""

    serving: ServedModel | None
    previous: ServedModel | None
    rejected: RejectedModel | None
    rollout_start_time: datetime | None
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    @property
    def failed(self) -> bool:
        """What is served is what failed to roll out, with nothing to return to."""
        serving, rejected = self.serving, self.rejected
        if serving is None or rejected is None:
            return False
        if rejected.uri is not None:
            return rejected.uri == serving.uri
        return rejected.generation is not None and rejected.generation == serving.generation


def compute_status(
    rollout: Rollout,
    service: ObservedService | None,
    *,
    generation: int,
    previous: ModelDeploymentStatus | None,
    now: datetime,
    endpoint: str | None,
    problem: Problem | None = None,
    waiting: PodWait | None = None,
) -> ModelDeploymentStatus:
    """The whole status. `problem` is why the spec cannot be served as asked (what is served stays);
    `waiting` why a pod of the endpoint cannot run."""
    serving = rollout.serving
    failed = rollout.failed
    running = service is not None and service.ready and service.serving_status == RUNNING
    wait = (Reason(waiting.reason.value), waiting.message) if waiting is not None else None
    if problem is not None and (serving is None or problem.reason == Reason.INVALID_SPEC):
        phase = DeploymentPhase.INVALID if problem.reason == Reason.INVALID_SPEC else DeploymentPhase.PENDING
        ready = (False, problem.reason, problem.message)
    elif serving is None:
        phase, ready = DeploymentPhase.PENDING, (False, Reason.NO_MODEL_YET, "nothing to serve yet")
    elif failed:
        reason = rollout.rejected.reason if rollout.rejected else ""
        phase, ready = DeploymentPhase.FAILED, (False, Reason.ROLLOUT_FAILED, reason)
    elif rollout.rollout_start_time is not None:
        phase = DeploymentPhase.DEPLOYING
        ready = (False, *wait) if wait else (False, Reason.DEPLOYING, f"rolling out {serving.uri}")
    elif running:
        phase = DeploymentPhase.DEGRADED if rollout.rejected or problem else DeploymentPhase.READY
        ready = (True, Reason.SERVING, f"serving {serving.uri}")
    else:
        phase = DeploymentPhase.DEGRADED
        unhealthy = service.problem if service else "the application is not running"
        ready = (False, *wait) if wait else (False, Reason.APPLICATION_UNHEALTHY, unhealthy)
    progressing = rollout.rollout_start_time is not None
    if rollout.rejected is not None:  # rolled back (or rolling back): the newest rollout failed
        degraded = (True, Reason.ROLLED_BACK if not failed else Reason.ROLLOUT_FAILED, rollout.rejected.reason)
    elif problem is not None:
        degraded = (True, problem.reason, problem.message)
    elif phase == DeploymentPhase.DEGRADED:
        degraded = (True, ready[1], ready[2])
    else:
        degraded = (False, Reason.SERVING if running else Reason.IDLE, "")
    if progressing and serving is not None:
        moving = (True, *wait) if wait else (True, Reason.DEPLOYING, f"rolling out {serving.uri}")
    else:
        moving = (False, Reason.IDLE, "")
    conditions = [
        condition(ConditionType.READY, ready[0], ready[1], ready[2], generation),
        condition(ConditionType.PROGRESSING, moving[0], moving[1], moving[2], generation),
        condition(ConditionType.DEGRADED, degraded[0], degraded[1], degraded[2], generation),
    ]
    return ModelDeploymentStatus(
        observed_generation=generation,
        phase=phase,
        conditions=merge_conditions(previous.conditions if previous else None, conditions, now),
        endpoint=endpoint if serving is not None else None,
        ray_service_name=service.name if service else None,
        serving=serving,
        previous=rollout.previous,
        rejected=rollout.rejected,
        rollout_start_time=rollout.rollout_start_time,
        application_status=service.application_status if service else None,
        serving_pods=service.endpoints if service else None,
    )


def wait_events(previous: ModelDeploymentStatus | None, status: ModelDeploymentStatus) -> list[Event]:
    """A Warning event when a pod's wait becomes the reason of a condition (once, not on every pass)."""
    waits = {Reason.UNSCHEDULABLE, Reason.IMAGE_PULL_FAILED, Reason.POD_CONFIG_ERROR}
    before = {(c.type, c.reason, c.message) for c in (previous.conditions if previous else None) or []}
    for item in status.conditions or []:
        if item.reason in waits and (item.type, item.reason, item.message) not in before:
            return [Event("Warning", Reason(item.reason), item.message)]
    return []
