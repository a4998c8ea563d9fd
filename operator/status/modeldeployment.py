"""ModelDeployment status, computed from the rollout state and the RayService as KubeRay reports it. Pure.

KubeRay's semantics: the RayService's `Ready` condition (serve endpoints exist), its
application status (DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, ...) and its
observedGeneration (whether those describe the latest spec).
"""

from __future__ import annotations

from datetime import datetime

from kubetune.operator.api.modeldeployment import DeploymentPhase, ModelDeploymentStatus
from kubetune.operator.conditions import ConditionType, Reason, condition, merge_conditions
from kubetune.operator.planning.modeldeployment import RUNNING, ObservedService, Rollout
from kubetune.operator.status.finetunejob import Problem


def compute_status(
    rollout: Rollout,
    service: ObservedService | None,
    *,
    generation: int,
    previous: ModelDeploymentStatus | None,
    now: datetime,
    endpoint: str | None,
    problem: Problem | None = None,
) -> ModelDeploymentStatus:
    """The whole status. `problem` is why the spec cannot be served as asked (what is served stays)."""
    serving = rollout.serving
    failed = serving is not None and rollout.rejected is not None and rollout.rejected.uri == serving.uri
    running = service is not None and service.ready and service.application_status == RUNNING
    if problem is not None and (serving is None or problem.reason in (Reason.INVALID_SPEC, Reason.SECRET_NOT_FOUND)):
        phase = DeploymentPhase.INVALID if problem.reason == Reason.INVALID_SPEC else DeploymentPhase.PENDING
        ready = (False, problem.reason, problem.message)
    elif serving is None:
        phase, ready = DeploymentPhase.PENDING, (False, Reason.NO_MODEL_YET, "nothing to serve yet")
    elif failed:
        reason = rollout.rejected.reason if rollout.rejected else ""
        phase, ready = DeploymentPhase.FAILED, (False, Reason.ROLLOUT_FAILED, reason)
    elif rollout.rollout_start_time is not None:
        phase, ready = DeploymentPhase.DEPLOYING, (False, Reason.DEPLOYING, f"rolling out {serving.uri}")
    elif running:
        phase = DeploymentPhase.DEGRADED if rollout.rejected or problem else DeploymentPhase.READY
        ready = (True, Reason.SERVING, f"serving {serving.uri}")
    else:
        app = service.application_status if service else None
        phase = DeploymentPhase.DEGRADED
        ready = (False, Reason.APPLICATION_UNHEALTHY, f"the application is {app or 'not running'}")
    progressing = rollout.rollout_start_time is not None
    if rollout.rejected is not None:  # rolled back (or rolling back): the newest artifact failed
        degraded = (True, Reason.ROLLED_BACK if not failed else Reason.ROLLOUT_FAILED, rollout.rejected.reason)
    elif problem is not None:
        degraded = (True, problem.reason, problem.message)
    elif phase == DeploymentPhase.DEGRADED:
        degraded = (True, Reason.APPLICATION_UNHEALTHY, ready[2])
    else:
        degraded = (False, Reason.SERVING if running else Reason.IDLE, "")
    conditions = [
        condition(ConditionType.READY, ready[0], ready[1], ready[2], generation),
        condition(
            ConditionType.PROGRESSING,
            progressing,
            Reason.DEPLOYING if progressing else Reason.IDLE,
            f"rolling out {serving.uri}" if progressing and serving else "",
            generation,
        ),
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
        ready_replicas=service.endpoints if service else None,
    )
