"""What a ModelDeployment serves: resolving the artifact, rollouts, rollbacks, and the status they give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob, FineTuneJobStatus, JobPhase, RunRecord, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import DeploymentPhase, ModelDeployment, ModelDeploymentStatus, ServedModel
from kubetune.operator.conditions import Reason
from kubetune.operator.planning.modeldeployment import ObservedService, observe_service, plan_rollout, resolve
from kubetune.operator.status.finetunejob import Problem
from kubetune.operator.status.modeldeployment import compute_status

from ..conftest import mutated

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
A = ServedModel(uri="s3://out/1/merged", fine_tune_job="tickets", run=1, variant="merged")
B = ServedModel(uri="s3://out/2/merged", fine_tune_job="tickets", run=2, variant="merged")
C = ServedModel(uri="s3://out/3/merged", fine_tune_job="tickets", run=3, variant="merged")


def record(number: int, phase: JobPhase = JobPhase.SUCCEEDED, **extra: Any) -> RunRecord:
    return RunRecord(
        number=number, ray_job_name=f"tickets-r{number}", trigger=Trigger.SPEC_CHANGE, spec_generation=1, phase=phase,
        **extra,
    )  # fmt: skip


def job(minimal_job: dict[str, Any], runs: list[RunRecord], promoted: int | None) -> FineTuneJob:
    parsed = parse(mutated(minimal_job, "metadata.name", "tickets"))
    assert isinstance(parsed, FineTuneJob)
    parsed.status = FineTuneJobStatus(runs=runs, promoted_run=promoted)
    return parsed


def following(document: dict[str, Any], **edits: Any) -> ModelDeployment:
    """The deployment document, following the FineTuneJob `tickets`, with dotted (`__`) edits."""
    document = mutated(document, "spec.model", {"fromFineTuneJob": {"name": "tickets"}})
    for path, value in edits.items():
        document = mutated(document, path.replace("__", "."), value)
    parsed = parse(document)
    assert isinstance(parsed, ModelDeployment)
    return parsed


ARTIFACTS = {"full": "s3://out/2/full", "merged": "s3://out/2/merged", "int8": "s3://out/2/int8"}


def test_the_promoted_runs_best_variant_is_served(deployment: dict[str, Any], minimal_job: dict[str, Any]) -> None:
    runs = [record(1), record(2, artifacts=ARTIFACTS, best_variant="int8")]
    served = resolve(following(deployment), job(minimal_job, runs, promoted=2))
    assert isinstance(served, ServedModel)
    assert (served.uri, served.run, served.variant, served.task) == (
        "s3://out/2/int8",
        2,
        "int8",
        "text-classification",
    )


@pytest.mark.parametrize(
    ("edits", "promoted", "reason", "fragment"),
    [
        ({}, None, Reason.NO_MODEL_YET, "no promoted run"),
        ({"spec__model__fromFineTuneJob__run": 1}, 2, Reason.RUN_NOT_SERVABLE, "run 1 is Failed"),
        ({"spec__model__fromFineTuneJob__run": 7}, 2, Reason.RUN_NOT_SERVABLE, "run 7 is not in its history"),
        ({"spec__model__fromFineTuneJob__variant": "pruned"}, 2, Reason.RUN_NOT_SERVABLE, "no pruned variant"),
    ],
)
def test_what_cannot_be_served_says_why(
    deployment: dict[str, Any],
    minimal_job: dict[str, Any],
    edits: dict[str, Any],
    promoted: int | None,
    reason: Reason,
    fragment: str,
) -> None:
    runs = [record(1, JobPhase.FAILED), record(2, artifacts=ARTIFACTS)]
    problem = resolve(following(deployment, **edits), job(minimal_job, runs, promoted))
    assert isinstance(problem, Problem) and problem.reason == reason and fragment in problem.message


def test_a_missing_job_and_a_pinned_uri(deployment: dict[str, Any]) -> None:
    missing = resolve(following(deployment), None)
    assert isinstance(missing, Problem) and missing.reason == Reason.FINE_TUNE_JOB_NOT_FOUND
    pinned = parse(mutated(deployment, "spec.model", {"uri": "s3://models/x"}))
    assert isinstance(pinned, ModelDeployment) and resolve(pinned, None) == ServedModel(uri="s3://models/x")


def service(status: str | None, *, ready: bool = True, current: bool = True, spec_hash: str = "h") -> ObservedService:
    return ObservedService("svc", spec_hash, 3, 3 if current else 2, ready, status, "boom" if status else "", 2)


def status(serving: ServedModel | None, previous: ServedModel | None = None, started: datetime | None = None,
           **extra: Any) -> ModelDeploymentStatus:  # fmt: skip
    return ModelDeploymentStatus(serving=serving, previous=previous, rollout_start_time=started, **extra)


def test_a_new_artifact_starts_a_rollout_and_running_ends_it() -> None:
    first = plan_rollout(status(None), A, None, None, 900, NOW)
    assert (first.serving, first.previous, first.rollout_start_time) == (A, None, NOW)
    assert first.events[0].reason == Reason.ROLLOUT_STARTED
    deploying = plan_rollout(status(A, started=NOW), A, service("DEPLOYING"), "h", 900, NOW + timedelta(seconds=5))
    assert deploying.rollout_start_time == NOW and deploying.requeue_after is not None
    # A RUNNING status about an older spec (or another hash) is not this rollout's outcome.
    stale = plan_rollout(status(A, started=NOW), A, service("RUNNING", current=False), "h", 900, NOW)
    assert stale.rollout_start_time == NOW
    other = plan_rollout(status(A, started=NOW), A, service("RUNNING", spec_hash="old"), "h", 900, NOW)
    assert other.rollout_start_time == NOW
    done = plan_rollout(status(A, started=NOW), A, service("RUNNING"), "h", 900, NOW + timedelta(seconds=9))
    assert done.rollout_start_time is None and done.events[0].reason == Reason.ROLLOUT_SUCCEEDED
    promoted = plan_rollout(status(A), B, service("RUNNING"), "h", 900, NOW)
    assert (promoted.serving, promoted.previous) == (B, A)


@pytest.mark.parametrize("failure", ["DEPLOY_FAILED", "UNHEALTHY", "deadline"])
def test_a_failed_rollout_returns_to_the_previous_artifact_and_does_not_retry_it(failure: str) -> None:
    rolling = status(B, previous=A, started=NOW)
    if failure == "deadline":
        plan = plan_rollout(rolling, B, service("DEPLOYING"), "h", 60, NOW + timedelta(seconds=61))
        assert plan.rejected is not None and "60 s" in plan.rejected.reason
    else:
        plan = plan_rollout(rolling, B, service(failure), "h", 900, NOW + timedelta(seconds=5))
        assert plan.rejected is not None and failure in plan.rejected.reason
    assert (plan.serving, plan.previous, plan.rejected.uri) == (A, None, B.uri)
    assert plan.events[0].reason == Reason.ROLLED_BACK and plan.events[0].type == "Warning"
    after = status(A, started=plan.rollout_start_time, rejected=plan.rejected)
    again = plan_rollout(after, B, service("RUNNING"), "h", 900, NOW + timedelta(seconds=30))
    assert again.serving == A and again.rejected == plan.rejected  # B is not tried again
    newer = plan_rollout(status(A, rejected=plan.rejected), C, service("RUNNING"), "h", 900, NOW)
    assert (newer.serving, newer.previous, newer.rejected) == (C, A, None)


def test_a_failed_first_rollout_has_nothing_to_return_to() -> None:
    plan = plan_rollout(status(A, started=NOW), A, service("DEPLOY_FAILED"), "h", 900, NOW)
    assert plan.serving == A and plan.rejected is not None and plan.rollout_start_time is None
    assert plan.events[0].reason == Reason.ROLLOUT_FAILED
    result = compute_status(plan, service("DEPLOY_FAILED"), generation=1, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.FAILED


def test_a_rollout_replaced_midway_keeps_the_last_working_artifact() -> None:
    plan = plan_rollout(status(B, previous=A, started=NOW), C, service("DEPLOYING"), "h", 900, NOW)
    assert (plan.serving, plan.previous) == (C, A)


def conditions(result: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in result.conditions or []}


def test_status_phases_and_conditions() -> None:
    rollout = plan_rollout(status(A), A, service("RUNNING"), "h", 900, NOW)
    ready = compute_status(rollout, service("RUNNING"), generation=4, previous=None, now=NOW, endpoint="http://e")
    assert (ready.phase, ready.endpoint, ready.ready_replicas, ready.observed_generation) == (
        DeploymentPhase.READY, "http://e", 2, 4,
    )  # fmt: skip
    assert conditions(ready) == {"Ready": ("True", "Serving"), "Progressing": ("False", "Idle"),
                                 "Degraded": ("False", "Serving")}  # fmt: skip
    deploying = plan_rollout(status(A), B, service("RUNNING"), "h", 900, NOW)
    result = compute_status(deploying, service("RUNNING"), generation=4, previous=ready, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.DEPLOYING and conditions(result)["Progressing"] == ("True", "Deploying")
    nothing = compute_status(plan_rollout(status(None), None, None, None, 900, NOW), None, generation=1,
                             previous=None, now=NOW, endpoint="http://e",
                             problem=Problem(Reason.NO_MODEL_YET, "no promoted run"))  # fmt: skip
    assert nothing.phase == DeploymentPhase.PENDING and conditions(nothing)["Ready"] == ("False", "NoModelYet")
    assert nothing.endpoint is None


def test_rolled_back_is_degraded_while_serving() -> None:
    back = plan_rollout(status(B, previous=A, started=NOW), B, service("DEPLOY_FAILED"), "h", 900, NOW)
    settled = plan_rollout(status(A, started=NOW, rejected=back.rejected), B, service("RUNNING"), "h", 900, NOW)
    result = compute_status(settled, service("RUNNING"), generation=1, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.DEGRADED and conditions(result)["Degraded"] == ("True", "RolledBack")
    assert conditions(result)["Ready"] == ("True", "Serving")


def test_kuberays_status_is_read_as_kuberay_writes_it() -> None:
    body = {
        "metadata": {"name": "svc", "generation": 5, "annotations": {"kubetune.io/spec-hash": "abc"}},
        "status": {
            "observedGeneration": 5,
            "numServeEndpoints": 3,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "UpgradeInProgress", "status": "False"}],
            "activeServiceStatus": {"applicationStatuses": {"model": {"status": "RUNNING", "message": ""}}},
            "pendingServiceStatus": {"applicationStatuses": {"model": {"status": "DEPLOYING", "message": "new"}}},
        },
    }
    observed = observe_service(body, "model")
    assert (observed.spec_hash, observed.current, observed.ready, observed.endpoints) == ("abc", True, True, 3)
    assert observed.application_status == "DEPLOYING"  # the pending cluster's application is the one rolling out
