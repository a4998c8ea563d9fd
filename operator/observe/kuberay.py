"""Reading KubeRay's objects: what a run's RayJob and an endpoint's RayService say, as typed values.

Every place that interprets KubeRay's status fields does it here, as KubeRay defines them
(`rayjob_types.go`: a RayJob succeeded when jobDeploymentStatus is Complete and jobStatus
SUCCEEDED; a RayService serves when Ready and its application is RUNNING). No I/O and
no clock (a RayJob that is not a run is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubetune.operator.api.finetunejob import JobPhase, RayJobState, RunFailure, Trigger
from kubetune.operator.conditions import Reason
from kubetune.operator.model.events import parse_time
from kubetune.operator.naming import (
    APPLIED_HASH_ANNOTATION,
    FORMER_APPLIED_HASH_ANNOTATION,
    GENERATION_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    RUN_LABEL,
    SERVE_APPLICATION,
    SPEC_HASH_ANNOTATION,
    TRIGGER_ANNOTATION,
    TRIGGER_DETAIL_ANNOTATION,
    controller_uid,
)

log = logging.getLogger("kubetune.finetunejob")


@dataclass(frozen=True)
class ObservedRun:
    """A run's RayJob as listed from the cluster."""

    number: int
    name: str
    trigger: Trigger
    trigger_detail: str
    spec_generation: int
    trigger_hash: str | None  # the kubetune.io/spec-hash annotation: the run-relevant spec it was made for
    created: datetime | None
    status: Mapping[str, Any] | None
    owner_uid: str | None = None  # of its controller owner reference: the job it belongs to
    queue: str | None = None  # the Kueue LocalQueue it was submitted through


def observe_run(ray_job: Mapping[str, Any]) -> ObservedRun | None:
    """What the planner needs of a run's RayJob; None for a RayJob that is not a kubetune run."""
    meta = ray_job["metadata"]
    annotations = meta.get("annotations") or {}
    try:
        number = int((meta.get("labels") or {})[RUN_LABEL])
        trigger = Trigger(annotations[TRIGGER_ANNOTATION])
        generation = int(annotations.get(GENERATION_ANNOTATION, "0"))
    except (KeyError, ValueError):
        log.warning("ignoring RayJob %s: it lacks kubetune's run label or trigger", meta.get("name"))
        return None
    return ObservedRun(
        number=number,
        name=meta["name"],
        trigger=trigger,
        trigger_detail=annotations.get(TRIGGER_DETAIL_ANNOTATION, ""),
        spec_generation=generation,
        trigger_hash=annotations.get(SPEC_HASH_ANNOTATION),
        created=parse_time(meta.get("creationTimestamp")),
        status=dict(ray_job.get("status") or {}) or None,
        owner_uid=controller_uid(ray_job),
        queue=(meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL),
    )


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


# KubeRay's RayService application statuses.
RUNNING, DEPLOYING = "RUNNING", "DEPLOYING"
FAILED_STATUSES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})
# KubeRay's condition while it brings up a new Ray cluster to replace the one that serves.
UPGRADE_IN_PROGRESS = "UpgradeInProgress"
# What the status keeps of Serve's messages: the application's beginning, a failing deployment's end
# (a traceback, whose last line is the error). Together they fit a condition's 1024 characters.
APPLICATION_MESSAGE_MAX_LENGTH = 256


DEPLOYMENT_MESSAGE_MAX_LENGTH = 640


@dataclass(frozen=True)
class ObservedService:
    """What the operator needs of its RayService, as the cache holds it."""

    name: str
    applied_hash: str | None  # the kubetune.io/applied-hash annotation: what the operator last applied
    generation: int
    observed_generation: int  # KubeRay's: the spec it has acted on
    ready: bool  # condition Ready: the serve Service has endpoints
    # Kubetune's application where the latest spec goes: on the pending Ray cluster while KubeRay brings
    # one up (DEPLOYING until it reports one), else on the active cluster.
    application_status: str | None
    application_message: str
    endpoints: int  # KubeRay's numServeEndpoints
    owner_uid: str | None = None  # of its controller owner reference: the deployment it belongs to
    upgrading: bool = False  # UpgradeInProgress: a new cluster is coming up; the active one still serves
    serving_status: str | None = None  # the application on the active cluster: what answers requests now
    deployment_message: str = ""  # the Serve deployment that fails, with the end of its message

    @property
    def current(self) -> bool:
        """KubeRay has acted on the latest spec (its application status is about that spec)."""
        return self.observed_generation >= self.generation

    @property
    def problem(self) -> str:
        """The application's status with what Serve says of it, for messages."""
        details = "; ".join(text for text in (self.application_message, self.deployment_message) if text)
        return f"the application is {self.application_status or 'not running'}" + (f": {details}" if details else "")


def _cut(text: str, limit: int, *, keep_end: bool = False) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    return "…" + text[-(limit - 1) :] if keep_end else text[: limit - 1] + "…"


def failing_deployment(application: Mapping[str, Any]) -> str:
    """The Serve deployment of the application that fails (a failed one first), with its message's end."""
    troubled = sorted(
        (item.get("status") not in FAILED_STATUSES, name, str(item["message"]))
        for name, item in (application.get("serveDeploymentStatuses") or {}).items()
        if item.get("status") != "HEALTHY" and item.get("message")
    )
    if not troubled:
        return ""
    _, name, message = troubled[0]
    return f"{name}: {_cut(message, DEPLOYMENT_MESSAGE_MAX_LENGTH, keep_end=True)}"


def observe_service(body: Mapping[str, Any], application: str = SERVE_APPLICATION) -> ObservedService:
    """What the operator needs of a RayService: its spec's state as KubeRay reports it, for `application`."""
    meta, status = body["metadata"], body.get("status") or {}
    annotations = meta.get("annotations") or {}
    conditions = {item.get("type"): item for item in status.get("conditions") or []}
    pending = status.get("pendingServiceStatus") or {}
    active = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(application) or {}
    # While KubeRay brings up a new cluster, the latest spec goes there: only its application tells
    # how the rollout goes (the active one still runs what was served before).
    if pending.get("rayClusterName"):
        app = (pending.get("applicationStatuses") or {}).get(application) or {"status": DEPLOYING}
    else:
        app = active
    return ObservedService(
        name=meta["name"],
        applied_hash=annotations.get(APPLIED_HASH_ANNOTATION) or annotations.get(FORMER_APPLIED_HASH_ANNOTATION),
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        application_status=app.get("status") or None,
        application_message=_cut(str(app.get("message") or ""), APPLICATION_MESSAGE_MAX_LENGTH),
        endpoints=int(status.get("numServeEndpoints") or 0),
        owner_uid=controller_uid(body),
        upgrading=(conditions.get(UPGRADE_IN_PROGRESS) or {}).get("status") == "True",
        serving_status=active.get("status") or None,
        deployment_message=failing_deployment(app),
    )
