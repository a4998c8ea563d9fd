"""What a ModelDeployment serves: resolving the artifact, rollouts, rollbacks, and the status they give."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob, FineTuneJobStatus, JobPhase, RunRecord, Trigger, WaitReason
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import (
    DeploymentPhase,
    ModelDeployment,
    ModelDeploymentStatus,
    RejectedModel,
    ServedModel,
)
from kubetune.operator.conditions import Reason
from kubetune.operator.model.events import Problem
from kubetune.operator.observe.kuberay import ObservedService, observe_service
from kubetune.operator.observe.pods import PodWait
from kubetune.operator.planning.modeldeployment import Asked, plan_rollout, resolve
from kubetune.operator.status.modeldeployment import compute_status, wait_events

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


SPEC_1 = {"model": {"uri": "s3://out/1/merged"}, "resources": {"cpu": "1"}}
SPEC_2 = {"model": {"uri": "s3://out/1/merged"}, "resources": {"cpu": "500m"}}


def service(
    status: str | None,
    *,
    ready: bool = True,
    current: bool = True,
    applied_hash: str = "h",
    upgrading: bool = False,
    serving: str | None = "",
    deployment_message: str = "",
) -> ObservedService:
    """The RayService as observed: `status` is the application where the latest spec goes, `serving` the
    one on the active cluster (the same unless given)."""
    return ObservedService(
        "svc", applied_hash, 3, 3 if current else 2, ready, status, "boom" if status else "", 2,
        upgrading=upgrading, serving_status=status if serving == "" else serving,
        deployment_message=deployment_message,
    )  # fmt: skip


def asked(artifact: ServedModel | None, generation: int = 1, spec: dict[str, Any] | None = None,
          service_hash: str | None = "h") -> Asked:  # fmt: skip
    return Asked(artifact, generation, spec or SPEC_1, service_hash)


def served(artifact: ServedModel, generation: int = 1, spec: dict[str, Any] | None = None) -> ServedModel:
    """`artifact` as served with a spec of `generation`."""
    return artifact.model_copy(update={"generation": generation, "spec": spec or SPEC_1})


def status(serving: ServedModel | None, previous: ServedModel | None = None, started: datetime | None = None,
           **extra: Any) -> ModelDeploymentStatus:  # fmt: skip
    return ModelDeploymentStatus(serving=serving, previous=previous, rollout_start_time=started, **extra)


def uris(*models: ServedModel | None) -> tuple[str | None, ...]:
    return tuple(model.uri if model else None for model in models)


def test_a_new_artifact_starts_a_rollout_and_running_ends_it() -> None:
    first = plan_rollout(status(None), asked(A), None, None, 900, NOW)
    assert (uris(first.serving, first.previous), first.rollout_start_time) == ((A.uri, None), NOW)
    assert first.serving is not None and (first.serving.generation, first.serving.spec) == (1, SPEC_1)
    assert first.events[0].reason == Reason.ROLLOUT_STARTED
    rolling = status(served(A), started=NOW)
    deploying = plan_rollout(rolling, asked(A), service("DEPLOYING"), "h", 900, NOW + timedelta(seconds=5))
    assert deploying.rollout_start_time == NOW and deploying.requeue_after is not None
    # A RUNNING status about an older spec (or another hash) is not this rollout's outcome.
    stale = plan_rollout(rolling, asked(A), service("RUNNING", current=False), "h", 900, NOW)
    assert stale.rollout_start_time == NOW
    other = plan_rollout(rolling, asked(A), service("RUNNING", applied_hash="old"), "h", 900, NOW)
    assert other.rollout_start_time == NOW
    done = plan_rollout(rolling, asked(A), service("RUNNING"), "h", 900, NOW + timedelta(seconds=9))
    assert done.rollout_start_time is None and done.events[0].reason == Reason.ROLLOUT_SUCCEEDED
    promoted = plan_rollout(status(served(A)), asked(B), service("RUNNING"), "h", 900, NOW)
    assert (promoted.serving, promoted.previous) == (served(B), served(A))


@pytest.mark.parametrize("failure", ["DEPLOY_FAILED", "UNHEALTHY", "deadline"])
def test_a_failed_rollout_returns_to_the_previous_artifact_and_does_not_retry_it(failure: str) -> None:
    rolling = status(served(B), previous=served(A), started=NOW)
    if failure == "deadline":
        plan = plan_rollout(rolling, asked(B), service("DEPLOYING"), "h", 60, NOW + timedelta(seconds=61))
        assert plan.rejected is not None and "60 s" in plan.rejected.reason
    else:
        plan = plan_rollout(rolling, asked(B), service(failure), "h", 900, NOW + timedelta(seconds=5))
        assert plan.rejected is not None and failure in plan.rejected.reason
    assert (plan.serving, plan.previous, plan.rejected.uri) == (served(A), None, B.uri)
    assert plan.events[0].reason == Reason.ROLLED_BACK and plan.events[0].type == "Warning"
    after = status(served(A), started=plan.rollout_start_time, rejected=plan.rejected)
    again = plan_rollout(after, asked(B), service("RUNNING"), "h", 900, NOW + timedelta(seconds=30))
    assert again.serving == served(A) and again.rejected == plan.rejected  # B is not tried again
    newer = plan_rollout(status(served(A), rejected=plan.rejected), asked(C), service("RUNNING"), "h", 900, NOW)
    assert (newer.serving, newer.previous, newer.rejected) == (served(C), served(A), None)


def test_a_failed_first_rollout_has_nothing_to_return_to() -> None:
    plan = plan_rollout(status(served(A), started=NOW), asked(A), service("DEPLOY_FAILED"), "h", 900, NOW)
    assert plan.serving == served(A) and plan.rejected is not None and plan.rollout_start_time is None
    assert plan.events[0].reason == Reason.ROLLOUT_FAILED
    result = compute_status(plan, service("DEPLOY_FAILED"), generation=1, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.FAILED


def test_a_rollout_replaced_midway_keeps_the_last_working_artifact() -> None:
    plan = plan_rollout(status(served(B), previous=served(A), started=NOW), asked(C), service("DEPLOYING"), "h", 900,
                        NOW)  # fmt: skip
    assert (plan.serving, plan.previous) == (served(C), served(A))


def conditions(result: ModelDeploymentStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in result.conditions or []}


def test_status_phases_and_conditions() -> None:
    rollout = plan_rollout(status(served(A)), asked(A), service("RUNNING"), "h", 900, NOW)
    ready = compute_status(rollout, service("RUNNING"), generation=4, previous=None, now=NOW, endpoint="http://e")
    assert (ready.phase, ready.endpoint, ready.serving_pods, ready.observed_generation) == (
        DeploymentPhase.READY, "http://e", 2, 4,
    )  # fmt: skip
    assert conditions(ready) == {"Ready": ("True", "Serving"), "Progressing": ("False", "Idle"),
                                 "Degraded": ("False", "Serving")}  # fmt: skip
    deploying = plan_rollout(status(served(A)), asked(B), service("RUNNING"), "h", 900, NOW)
    result = compute_status(deploying, service("RUNNING"), generation=4, previous=ready, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.DEPLOYING and conditions(result)["Progressing"] == ("True", "Deploying")
    nothing = compute_status(plan_rollout(status(None), asked(None), None, None, 900, NOW), None, generation=1,
                             previous=None, now=NOW, endpoint="http://e",
                             problem=Problem(Reason.NO_MODEL_YET, "no promoted run"))  # fmt: skip
    assert nothing.phase == DeploymentPhase.PENDING and conditions(nothing)["Ready"] == ("False", "NoModelYet")
    assert nothing.endpoint is None


def test_rolled_back_is_degraded_while_serving() -> None:
    back = plan_rollout(status(served(B), previous=served(A), started=NOW), asked(B), service("DEPLOY_FAILED"), "h",
                        900, NOW)  # fmt: skip
    settled = plan_rollout(status(served(A), started=NOW, rejected=back.rejected), asked(B), service("RUNNING"), "h",
                           900, NOW)  # fmt: skip
    result = compute_status(settled, service("RUNNING"), generation=1, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.DEGRADED and conditions(result)["Degraded"] == ("True", "RolledBack")
    assert conditions(result)["Ready"] == ("True", "Serving")


TRACEBACK = (
    "Traceback (most recent call last):\n"
    + "  File x.py, line 1\n" * 200
    + ("torch._inductor.exc.InductorError: InvalidCxxCompiler: No working C++ compiler found")
)


def rayservice(status: dict[str, Any], *conditions: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {"name": "svc", "generation": 5, "annotations": {"kubetune.io/applied-hash": "abc"}},
        "status": {"observedGeneration": 5, "numServeEndpoints": 3, "conditions": [*conditions], **status},
    }


def app(status: str, message: str = "", **deployments: dict[str, str]) -> dict[str, Any]:
    return {"model": {"status": status, "message": message, "serveDeploymentStatuses": deployments}}


READY = {"type": "Ready", "status": "True"}
UPGRADING = {"type": "UpgradeInProgress", "status": "True"}
NOT_UPGRADING = {"type": "UpgradeInProgress", "status": "False"}


@pytest.mark.parametrize(
    ("status", "conditions", "wanted"),
    [
        # One cluster: its application is the rollout's and the one that serves.
        ({"activeServiceStatus": {"applicationStatuses": app("RUNNING")}}, (READY, NOT_UPGRADING),
         ("RUNNING", "RUNNING", False)),
        # KubeRay brings up a new cluster: only its application tells the rollout; none yet is DEPLOYING.
        ({"activeServiceStatus": {"applicationStatuses": app("RUNNING")},
          "pendingServiceStatus": {"rayClusterName": "svc-x2"}}, (READY, UPGRADING),
         ("DEPLOYING", "RUNNING", True)),
        ({"activeServiceStatus": {"applicationStatuses": app("RUNNING")},
          "pendingServiceStatus": {"rayClusterName": "svc-x2", "applicationStatuses": app("DEPLOY_FAILED")}},
         (READY, UPGRADING), ("DEPLOY_FAILED", "RUNNING", True)),
        # The first cluster, still pending (no active one): deploying, nothing serves.
        ({"pendingServiceStatus": {"rayClusterName": "svc-x1"}}, (), ("DEPLOYING", None, False)),
        # Application statuses without a pending cluster's name are not a pending cluster.
        ({"activeServiceStatus": {"applicationStatuses": app("RUNNING")},
          "pendingServiceStatus": {"applicationStatuses": app("DEPLOYING")}}, (READY,), ("RUNNING", "RUNNING", False)),
    ],
)  # fmt: skip
def test_kuberays_status_is_read_as_kuberay_writes_it(
    status: dict[str, Any], conditions: tuple[dict[str, str], ...], wanted: tuple[str | None, str | None, bool]
) -> None:
    observed = observe_service(rayservice(status, *conditions), "model")
    assert (observed.applied_hash, observed.current, observed.endpoints) == ("abc", True, 3)
    assert (observed.application_status, observed.serving_status, observed.upgrading) == wanted


def test_a_rayservice_annotated_by_an_older_operator_keeps_its_applied_hash() -> None:
    """The applied hash was written under kubetune.io/spec-hash before its rename: it is still read."""
    body = rayservice({"activeServiceStatus": {"applicationStatuses": app("RUNNING")}}, READY)
    body["metadata"]["annotations"] = {"kubetune.io/spec-hash": "old"}
    assert observe_service(body).applied_hash == "old"
    body["metadata"]["annotations"]["kubetune.io/applied-hash"] = "new"
    assert observe_service(body).applied_hash == "new"


def test_a_failing_deployments_message_is_kept_by_its_end() -> None:
    failed = app(
        "DEPLOY_FAILED", "Failed to update the deployments ['ModelServer'].",
        ModelServer={"status": "DEPLOY_FAILED", "message": TRACEBACK},
        Other={"status": "HEALTHY", "message": "fine"},
    )  # fmt: skip
    observed = observe_service(rayservice({"activeServiceStatus": {"applicationStatuses": failed}}), "model")
    assert observed.deployment_message.startswith("ModelServer: …")
    assert observed.deployment_message.endswith("InvalidCxxCompiler: No working C++ compiler found")
    assert len(observed.deployment_message) <= len("ModelServer: ") + 640
    assert "Failed to update the deployments" in observed.problem and "InvalidCxxCompiler" in observed.problem
    # The rollout's failure says it, and fits the status.
    rolling = status(served(B), previous=served(A), started=NOW)
    plan = plan_rollout(rolling, asked(B, service_hash="abc"), observed, "abc", 900, NOW)
    assert plan.rejected is not None and "InvalidCxxCompiler" in plan.rejected.reason
    assert plan.events[0].reason == Reason.ROLLED_BACK and "InvalidCxxCompiler" in plan.events[0].message
    result = compute_status(plan, observed, generation=1, previous=None, now=NOW, endpoint="http://e")
    assert "InvalidCxxCompiler" in next(c.message for c in result.conditions or [] if c.type == "Degraded")


UNSCHEDULABLE = PodWait(WaitReason.UNSCHEDULABLE, "pod svc-head-x cannot be scheduled: 0/1 nodes: Insufficient cpu")


@pytest.mark.parametrize(
    ("observed", "at", "outcome"),
    [
        # KubeRay still brings up the new cluster (the old one serves): not done.
        (service("DEPLOYING", upgrading=True, serving="RUNNING"), 5, "waiting"),
        # The application runs on the new cluster, but KubeRay has not switched to it yet: not done.
        (service("RUNNING", upgrading=True), 5, "waiting"),
        (service("RUNNING", upgrading=False), 5, "done"),
        (service("DEPLOY_FAILED", upgrading=True, serving="RUNNING"), 5, "rolled back"),
        # The new cluster never comes up: rolled back at the deadline, saying which pod waits for what.
        (service("DEPLOYING", upgrading=True, serving="RUNNING"), 901, "rolled back"),
    ],
)
def test_a_rollout_ends_only_once_kuberay_serves_from_the_new_cluster(
    observed: ObservedService, at: int, outcome: str
) -> None:
    rolling = status(served(B), previous=served(A), started=NOW)
    plan = plan_rollout(rolling, asked(B), observed, "h", 900, NOW + timedelta(seconds=at), UNSCHEDULABLE)
    seen = "done" if plan.rollout_start_time is None else "rolled back" if plan.rejected else "waiting"
    assert seen == outcome
    if outcome == "rolled back" and at > 900:
        assert plan.rejected is not None and "Insufficient cpu" in plan.rejected.reason
    result = compute_status(plan, observed, generation=1, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == {"done": DeploymentPhase.READY, "waiting": DeploymentPhase.DEPLOYING,
                            "rolled back": DeploymentPhase.DEPLOYING}[outcome]  # fmt: skip


SPEC_ROLLOUTS = [
    # (status, asked, service hash, what happens)
    (status(served(A)), asked(A, 2, SPEC_2, "h2"), "h", "rollout"),
    (status(served(A)), asked(A, 2, SPEC_2, "h"), "h", "nothing"),  # a change the RayService does not see
    # A spec that failed to roll out is not tried again while it is the spec.
    (status(served(A), rejected=RejectedModel(generation=2, reason="r")), asked(A, 2, SPEC_2, "h2"), "h", "nothing"),
    (status(served(A), rejected=RejectedModel(generation=2, reason="r")), asked(A, 3, SPEC_2, "h3"), "h", "rollout"),
    # Served before the spec was recorded with it: taken as served with this one.
    (status(A), asked(A, 2, SPEC_2, "h2"), "h2", "adopted"),
]


@pytest.mark.parametrize(("before", "ask", "service_hash", "happens"), SPEC_ROLLOUTS)
def test_a_spec_that_changes_the_ray_service_is_a_rollout(
    before: ModelDeploymentStatus, ask: Asked, service_hash: str, happens: str
) -> None:
    plan = plan_rollout(before, ask, service("RUNNING"), service_hash, 900, NOW)
    if happens == "rollout":
        assert plan.rollout_start_time == NOW and plan.events[0].reason == Reason.ROLLOUT_STARTED
        assert f"generation {ask.generation}" in plan.events[0].message
        assert plan.serving == served(A, ask.generation, SPEC_2) and plan.previous == before.serving
        assert plan.rejected is None
    else:
        assert plan.rollout_start_time is None and not plan.events
        assert plan.serving == (served(A, 2, SPEC_2) if happens == "adopted" else before.serving)


def test_a_failed_spec_rollout_returns_to_the_spec_before_and_is_not_the_artifacts_fault() -> None:
    rolling = status(served(A, 2, SPEC_2), previous=served(A), started=NOW)
    never = service("DEPLOYING", upgrading=True, serving="RUNNING")
    plan = plan_rollout(rolling, asked(A, 2, SPEC_2, "h"), never, "h", 900, NOW + timedelta(seconds=901),
                        UNSCHEDULABLE)  # fmt: skip
    assert plan.serving == served(A) and plan.previous is None and plan.rollout_start_time is not None
    assert plan.rejected is not None and (plan.rejected.uri, plan.rejected.generation) == (None, 2)
    assert "Insufficient cpu" in plan.rejected.reason
    assert plan.events[0].reason == Reason.ROLLED_BACK and "back to generation 1's spec" in plan.events[0].message
    # Back on the spec before: not retried, and Degraded (rolled back), not Failed.
    back = status(served(A), started=NOW, rejected=plan.rejected)
    settled = plan_rollout(back, asked(A, 2, SPEC_2, "h2"), service("RUNNING"), "h", 900, NOW)
    assert settled.rollout_start_time is None and settled.serving == served(A) and not settled.failed
    result = compute_status(settled, service("RUNNING"), generation=2, previous=None, now=NOW, endpoint="http://e")
    assert result.phase == DeploymentPhase.DEGRADED and conditions(result)["Degraded"] == ("True", "RolledBack")
    # A new artifact meanwhile comes with the spec that works, and the rejected spec stays rejected.
    promoted = plan_rollout(back, asked(B, 2, SPEC_2, "h2"), service("RUNNING"), "h", 900, NOW)
    assert promoted.serving == served(B) and promoted.rejected == plan.rejected


def test_a_failed_spec_rollout_with_nothing_to_return_to_is_failed() -> None:
    rolling = status(served(A, 2, SPEC_2), started=NOW)
    plan = plan_rollout(rolling, asked(A, 2, SPEC_2, "h"), service("DEPLOY_FAILED"), "h", 900, NOW)
    assert plan.failed and plan.events[0].reason == Reason.ROLLOUT_FAILED
    result = compute_status(plan, service("DEPLOY_FAILED"), generation=2, previous=None, now=NOW, endpoint="e")
    assert result.phase == DeploymentPhase.FAILED


@pytest.mark.parametrize(
    ("rolling", "observed", "ready", "progressing", "phase"),
    [
        (True, service("DEPLOYING", ready=False), ("False", "Unschedulable"), ("True", "Unschedulable"),
         DeploymentPhase.DEPLOYING),
        (False, service("DEPLOYING", ready=False), ("False", "Unschedulable"), ("False", "Idle"),
         DeploymentPhase.DEGRADED),
        # Serving while a pod for one more replica waits: ready, nothing to say.
        (False, service("RUNNING"), ("True", "Serving"), ("False", "Idle"), DeploymentPhase.READY),
    ],
)  # fmt: skip
def test_a_pod_that_cannot_run_is_why_the_endpoint_waits(
    rolling: bool,
    observed: ObservedService,
    ready: tuple[str, str],
    progressing: tuple[str, str],
    phase: DeploymentPhase,
) -> None:
    before = status(served(A), started=NOW if rolling else None)
    plan = plan_rollout(before, asked(A), observed, "h", 900, NOW + timedelta(seconds=5), UNSCHEDULABLE)
    result = compute_status(plan, observed, generation=1, previous=before, now=NOW, endpoint="e", waiting=UNSCHEDULABLE)
    assert (conditions(result)["Ready"], conditions(result)["Progressing"], result.phase) == (ready, progressing, phase)
    events = wait_events(before, result)
    if ready[1] == "Unschedulable":
        assert [(e.type, e.reason, e.message) for e in events] == [("Warning", Reason.UNSCHEDULABLE,
                                                                    UNSCHEDULABLE.message)]  # fmt: skip
        assert wait_events(result, result) == []  # said once
    else:
        assert events == []
