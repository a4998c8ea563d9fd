"""Decide what a ModelDeployment serves next: roll out, keep, or roll back. Pure (time is passed in).

The artifact to serve is resolved from the spec (a URI, or a FineTuneJob's promoted or
pinned run) and compared with what the status says is served. A new artifact starts
a rollout: the RayService gets it in its Serve config, and the rollout ends when
KubeRay reports the application RUNNING on the new config. If it goes DEPLOY_FAILED
or UNHEALTHY, or is still deploying at the deadline, the deployment returns to the
artifact it served before and records the failed one, which is not tried again
until a different artifact is promoted.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from kubetune.operator.api.finetunejob import FineTuneJob, JobPhase, RunRecord
from kubetune.operator.api.modeldeployment import ModelDeployment, ModelDeploymentStatus, RejectedModel, ServedModel
from kubetune.operator.conditions import Reason
from kubetune.operator.naming import controller_uid
from kubetune.operator.planning.finetunejob import Event
from kubetune.operator.status.finetunejob import Problem
from kubetune.runtime.contract.serving import Variant

RUNNING, DEPLOYING = "RUNNING", "DEPLOYING"
FAILED_STATUSES = frozenset({"DEPLOY_FAILED", "UNHEALTHY"})
# How soon to look again at a rollout in progress when no event comes (a safety net).
ROLLOUT_RECHECK_SECONDS = 30.0


@dataclass(frozen=True)
class ObservedService:
    """What the operator needs of its RayService, as the cache holds it."""

    name: str
    spec_hash: str | None  # the kubetune.io/spec-hash annotation: what the operator last applied
    generation: int
    observed_generation: int  # KubeRay's: the spec it has acted on
    ready: bool  # condition Ready
    application_status: str | None  # of kubetune's application, on the cluster that serves
    application_message: str
    endpoints: int  # KubeRay's numServeEndpoints
    owner_uid: str | None = None  # of its controller owner reference: the deployment it belongs to

    @property
    def current(self) -> bool:
        """KubeRay has acted on the latest spec (its application status is about that spec)."""
        return self.observed_generation >= self.generation


def observe_service(body: Mapping[str, Any], application: str) -> ObservedService:
    meta, status = body["metadata"], body.get("status") or {}
    conditions = {item.get("type"): item for item in status.get("conditions") or []}
    # While KubeRay brings up a new cluster, the application there is the one deploying.
    pending = ((status.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}).get(application)
    active = ((status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}).get(application)
    app = pending or active or {}
    return ObservedService(
        name=meta["name"],
        spec_hash=(meta.get("annotations") or {}).get("kubetune.io/spec-hash"),
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        application_status=app.get("status") or None,
        application_message=str(app.get("message") or ""),
        endpoints=int(status.get("numServeEndpoints") or 0),
        owner_uid=controller_uid(body),
    )


def resolve(deployment: ModelDeployment, job: FineTuneJob | None) -> ServedModel | Problem:
    """The artifact the spec asks for now, or why there is none to serve."""
    model = deployment.spec.model
    if model.uri is not None:
        return ServedModel(uri=model.uri)
    reference = model.from_fine_tune_job
    assert reference is not None
    if job is None:
        return Problem(Reason.FINE_TUNE_JOB_NOT_FOUND, f"spec.model.fromFineTuneJob: {reference.name!r} not found")
    runs = {r.number: r for r in (job.status.runs if job.status and job.status.runs else [])}
    if reference.run is not None:
        record = runs.get(reference.run)
        if record is None or record.phase != JobPhase.SUCCEEDED:
            state = record.phase.value if record else "not in its history"
            return Problem(Reason.RUN_NOT_SERVABLE, f"spec.model.fromFineTuneJob.run: run {reference.run} is {state}")
    else:
        promoted = job.status.promoted_run if job.status else None
        if promoted is None or promoted not in runs:
            return Problem(Reason.NO_MODEL_YET, f"FineTuneJob {reference.name!r} has no promoted run yet")
        record = runs[promoted]
    return _artifact(reference.name, record, reference.variant, job)


def _artifact(job_name: str, record: RunRecord, variant: Variant, job: FineTuneJob) -> ServedModel | Problem:
    artifacts = record.artifacts or {}
    if variant == Variant.BEST:
        name = record.best_variant or ("merged" if "merged" in artifacts else "full")
    else:
        name = variant.value
    if name not in artifacts:
        known = ", ".join(sorted(artifacts)) or "none"
        return Problem(Reason.RUN_NOT_SERVABLE, f"run {record.number} exported no {name} variant (it has {known})")
    return ServedModel(
        uri=artifacts[name], fine_tune_job=job_name, run=record.number, variant=name, task=job.spec.model.task
    )


@dataclass(frozen=True)
class Rollout:
    """The next state of what is served, and what to tell about it."""

    serving: ServedModel | None
    previous: ServedModel | None
    rejected: RejectedModel | None
    rollout_start_time: datetime | None
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None


def _describe(served: ServedModel) -> str:
    return f"run {served.run} ({served.variant}, {served.uri})" if served.run is not None else served.uri


def plan_rollout(
    status: ModelDeploymentStatus,
    desired: ServedModel | None,
    service: ObservedService | None,
    service_hash: str | None,
    deadline_seconds: int,
    now: datetime,
) -> Rollout:
    """What to serve next, given the artifact asked for (None: none can be resolved, keep what is served).

    `service_hash` is the spec hash of the RayService the status's artifact gives: the
    service shows the rollout's outcome once it carries that hash and KubeRay has acted on it.
    """
    state = Rollout(status.serving, status.previous, status.rejected, status.rollout_start_time)
    rejected_uri = status.rejected.uri if status.rejected else None
    if (
        desired is not None
        and desired.uri != rejected_uri
        and (state.serving is None or state.serving.uri != desired.uri)
    ):
        in_progress = state.rollout_start_time is not None
        return Rollout(
            serving=desired,
            # A rollout replaced midway keeps the artifact that was last known to work.
            previous=state.previous if in_progress else state.serving,
            rejected=None,
            rollout_start_time=now,
            events=[Event("Normal", Reason.ROLLOUT_STARTED, f"rolling out {_describe(desired)}")],
            requeue_after=ROLLOUT_RECHECK_SECONDS,
        )
    if state.rollout_start_time is None or state.serving is None:
        return state
    observed = service is not None and service.spec_hash == service_hash and service.current
    if observed and service is not None and service.application_status == RUNNING and service.ready:
        message = f"serving {_describe(state.serving)}"
        return replace(state, rollout_start_time=None, events=[Event("Normal", Reason.ROLLOUT_SUCCEEDED, message)])
    reason = None
    if observed and service is not None and service.application_status in FAILED_STATUSES:
        reason = f"the application is {service.application_status}: {service.application_message}".rstrip(": ")
    elif now - state.rollout_start_time > timedelta(seconds=deadline_seconds):
        reason = f"still not running after {deadline_seconds} s (spec.rolloutDeadlineSeconds)"
    if reason is None:
        waited = (now - state.rollout_start_time).total_seconds()
        return replace(state, requeue_after=max(1.0, min(ROLLOUT_RECHECK_SECONDS, deadline_seconds - waited)))
    rejected = RejectedModel(uri=state.serving.uri, run=state.serving.run, reason=reason[:1024])
    if state.previous is None:
        message = f"{_describe(state.serving)} failed and there is nothing to return to: {reason}"
        return Rollout(state.serving, None, rejected, None, events=[Event("Warning", Reason.ROLLOUT_FAILED, message)])
    message = f"{_describe(state.serving)} failed ({reason}); back to {_describe(state.previous)}"
    return Rollout(
        serving=state.previous,
        previous=None,
        rejected=rejected,
        rollout_start_time=now,  # the way back is a rollout too
        events=[Event("Warning", Reason.ROLLED_BACK, message)],
        requeue_after=ROLLOUT_RECHECK_SECONDS,
    )
