"""Decide what a ModelDeployment serves next: roll out, keep, or roll back. Pure (time is passed in).

The artifact to serve is resolved from the spec (a URI, or a FineTuneJob's promoted or
pinned run) and compared with what the status says is served, together with the spec it
is served with. A new artifact starts a rollout, and so does a spec that changes the
RayService (its Ray cluster or its Serve config). KubeRay updates a Serve config in place
and replaces a changed cluster by a new one, which serves once it is ready. The rollout
ends when KubeRay reports the application RUNNING on the new spec, on the new cluster
when there is one, and no longer upgrading. If it goes DEPLOY_FAILED or UNHEALTHY, or is
still deploying at the deadline, the deployment returns to the artifact and the spec it
served before and records the failed rollout: a failed artifact is not tried again until
a different one is promoted, a failed spec not until the spec changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from kubetune.operator.api.finetunejob import FineTuneJob, JobPhase, RunRecord
from kubetune.operator.api.modeldeployment import ModelDeployment, ModelDeploymentStatus, RejectedModel, ServedModel
from kubetune.operator.conditions import Reason
from kubetune.operator.model.events import Event, Problem
from kubetune.operator.observe.kuberay import FAILED_STATUSES, RUNNING, ObservedService
from kubetune.operator.observe.pods import PodWait
from kubetune.operator.status.modeldeployment import Rollout
from kubetune.runtime.contract.serving import Variant

# How soon to look again at a rollout in progress when no event comes (a safety net).
ROLLOUT_RECHECK_SECONDS = 30.0


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
class Asked:
    """What the deployment asks for in this pass."""

    artifact: ServedModel | None  # resolved from the spec; None: none can be resolved (what is served stays)
    generation: int  # metadata.generation of the spec
    spec: Mapping[str, Any]  # the spec in wire form, recorded with what is rolled out
    # The spec hash of the RayService this spec builds for the artifact served now (None: nothing is served).
    service_hash: str | None


def _describe(served: ServedModel) -> str:
    return f"run {served.run} ({served.variant}, {served.uri})" if served.run is not None else served.uri


def _with_spec(artifact: ServedModel, generation: int | None, spec: Mapping[str, Any] | None) -> ServedModel:
    return artifact.model_copy(update={"generation": generation, "spec": dict(spec) if spec is not None else None})


def plan_rollout(
    status: ModelDeploymentStatus,
    asked: Asked,
    service: ObservedService | None,
    service_hash: str | None,
    deadline_seconds: int,
    now: datetime,
    waiting: PodWait | None = None,
) -> Rollout:
    """What to serve next: roll out a new artifact or a new spec, keep what is served, or return to what was.

    `service_hash` is the spec hash of the RayService that the status's artifact and its spec give:
    the service shows the rollout's outcome once it carries that hash, KubeRay has acted on it, and
    no new Ray cluster is still coming up. `waiting` is why a pod of the endpoint cannot run, if one cannot.
    """
    state = Rollout(status.serving, status.previous, status.rejected, status.rollout_start_time)
    rejected = status.rejected
    in_progress = state.rollout_start_time is not None
    spec_rejected = rejected is not None and rejected.generation == asked.generation
    desired = asked.artifact
    new_artifact = desired is not None and (state.serving is None or state.serving.uri != desired.uri)
    if desired is not None and new_artifact and desired.uri != (rejected.uri if rejected else None):
        # A spec that failed to roll out is not the one a new artifact comes with: what serves now is.
        source = state.serving if spec_rejected and state.serving is not None else None
        target = (
            _with_spec(desired, source.generation, source.spec)
            if source is not None
            else _with_spec(desired, asked.generation, asked.spec)
        )
        return Rollout(
            serving=target,
            # A rollout replaced midway keeps the artifact that was last known to work.
            previous=state.previous if in_progress else state.serving,
            rejected=rejected if spec_rejected else None,  # a rejected spec stays rejected while it is the spec
            rollout_start_time=now,
            events=[Event("Normal", Reason.ROLLOUT_STARTED, f"rolling out {_describe(desired)}")],
            requeue_after=ROLLOUT_RECHECK_SECONDS,
        )
    serving = state.serving
    if serving is None:
        return state
    if serving.spec is None:
        # Served before the spec was recorded with it: taken as served with this spec.
        state = replace(state, serving=_with_spec(serving, asked.generation, asked.spec))
    elif asked.service_hash is not None and asked.service_hash != service_hash and not spec_rejected:
        # The spec changed what the RayService is (its cluster or its Serve config): a rollout too.
        message = f"rolling out the spec of generation {asked.generation} ({_describe(serving)})"
        return Rollout(
            serving=_with_spec(serving, asked.generation, asked.spec),
            previous=state.previous if in_progress else serving,
            # A rejected artifact stays rejected; a rejected spec is replaced by this one.
            rejected=rejected if rejected is not None and rejected.uri is not None else None,
            rollout_start_time=now,
            events=[Event("Normal", Reason.ROLLOUT_STARTED, message)],
            requeue_after=ROLLOUT_RECHECK_SECONDS,
        )
    if state.rollout_start_time is None:
        return state
    return _outcome(state, service, service_hash, deadline_seconds, now, waiting)


def _outcome(
    state: Rollout,
    service: ObservedService | None,
    service_hash: str | None,
    deadline_seconds: int,
    now: datetime,
    waiting: PodWait | None,
) -> Rollout:
    """A rollout in progress: done, still going, or failed (and then back to what was served before)."""
    assert state.serving is not None and state.rollout_start_time is not None
    observed = service is not None and service.applied_hash == service_hash and service.current
    running = observed and service is not None and service.application_status == RUNNING and service.ready
    if running and service is not None and not service.upgrading:
        message = f"serving {_describe(state.serving)}"
        return replace(state, rollout_start_time=None, events=[Event("Normal", Reason.ROLLOUT_SUCCEEDED, message)])
    reason = None
    if observed and service is not None and service.application_status in FAILED_STATUSES:
        reason = service.problem
    elif now - state.rollout_start_time > timedelta(seconds=deadline_seconds):
        reason = f"still not running after {deadline_seconds} s (spec.rolloutDeadlineSeconds)"
        if waiting is not None:
            reason += f": {waiting.message}"
        elif service is not None and service.upgrading:
            reason += ": KubeRay's new Ray cluster is not ready"
    if reason is None:
        waited = (now - state.rollout_start_time).total_seconds()
        return replace(state, requeue_after=max(1.0, min(ROLLOUT_RECHECK_SECONDS, deadline_seconds - waited)))
    previous = state.previous
    only_spec = previous is not None and previous.uri == state.serving.uri
    if only_spec:
        rejected = RejectedModel(generation=state.serving.generation, reason=reason[:1024])
    else:
        rejected = RejectedModel(uri=state.serving.uri, run=state.serving.run, reason=reason[:1024])
    what = f"the spec of generation {state.serving.generation}" if only_spec else _describe(state.serving)
    if previous is None:
        message = f"{what} failed and there is nothing to return to: {reason}"
        return Rollout(state.serving, None, rejected, None, events=[Event("Warning", Reason.ROLLOUT_FAILED, message)])
    back = f"generation {previous.generation}'s spec" if only_spec else _describe(previous)
    message = f"{what} failed ({reason}); back to {back}"
    return Rollout(
        serving=previous,
        previous=None,
        rejected=rejected,
        rollout_start_time=now,  # the way back is a rollout too
        events=[Event("Warning", Reason.ROLLED_BACK, message)],
        requeue_after=ROLLOUT_RECHECK_SECONDS,
    )
