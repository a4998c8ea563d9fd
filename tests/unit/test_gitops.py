"""The GitOps examples: Argo CD's Lua health checks run in a real Lua on statuses the operator computes,
and the manifests of examples/gitops are what Argo CD, Flux and `kubetune validate` expect.

`python tests/unit/test_gitops.py` rewrites examples/gitops/argocd/argocd-cm.yaml from the Lua script.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lupa.lua51  # type: ignore[import-untyped]
import pytest
import yaml
from kubetune.cli.validate import check
from kubetune.operator.api.finetunejob import FineTuneJob, GateReason, GateResult, JobPhase, RunRecord, Trigger
from kubetune.operator.api.modeldeployment import ModelDeployment, RejectedModel, ServedModel
from kubetune.operator.conditions import Reason
from kubetune.operator.model.events import Problem
from kubetune.operator.observe.kuberay import ObservedService
from kubetune.operator.status import finetunejob as finetunejob_status
from kubetune.operator.status import modeldeployment as modeldeployment_status
from kubetune.operator.status.modeldeployment import Rollout
from kubetune.runtime.contract.search import Metric

GITOPS = Path(__file__).resolve().parents[2] / "examples" / "gitops"
ARGOCD = GITOPS / "argocd"
# One script for both kinds: Argo CD takes a health check per kind, and argocd-cm.yaml installs it twice.
HEALTH_SCRIPT = ARGOCD / "health.lua"
KINDS = ("FineTuneJob", "ModelDeployment")
ARGOCD_CM = ARGOCD / "argocd-cm.yaml"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
GENERATION = 3
API_VERSION = "kubetune.io/v1alpha1"


# --- Statuses as the operator writes them, from its own pure status functions.


def run(number: int, phase: JobPhase, **extra: Any) -> RunRecord:
    return RunRecord(
        number=number,
        ray_job_name=f"support-tickets-r{number}",
        trigger=Trigger.SPEC_CHANGE,
        spec_generation=GENERATION,
        phase=phase,
        **extra,
    )


def promoted(number: int) -> RunRecord:
    verdict = GateResult(
        passed=True,
        reason=GateReason.PASSED,
        metric=Metric.ACCURACY,
        value=0.91,
        baseline=0.42,
        message="accuracy 0.91",
    )
    return run(number, JobPhase.SUCCEEDED).judged(verdict)


SMALL_GAIN = "accuracy improved by 0.001, less than promotion.minImprovement 0.01"


def not_promoted(number: int) -> RunRecord:
    verdict = GateResult(passed=False, reason=GateReason.IMPROVEMENT_TOO_SMALL, message=SMALL_GAIN)
    return run(number, JobPhase.SUCCEEDED).judged(verdict)


def finetunejob(
    records: list[RunRecord],
    *,
    suspend: bool = False,
    observed: int = GENERATION,
    problem: Problem | None = None,
) -> dict[str, Any]:
    """A FineTuneJob at GENERATION whose status the operator computed when it saw generation `observed`."""
    status = finetunejob_status.compute_status(
        records, suspended=suspend, generation=observed, previous=None, now=NOW, problem=problem
    )
    spec: dict[str, Any] = {"suspend": True} if suspend else {}
    return {
        "apiVersion": API_VERSION,
        "kind": "FineTuneJob",
        "metadata": {"name": "support-tickets", "namespace": "ml-team", "generation": GENERATION},
        "spec": spec,
        "status": status.to_wire(),
    }


OLD = ServedModel(uri="s3://out/runs/1/merged", fine_tune_job="support-tickets", run=1, variant="merged")
NEW = ServedModel(uri="s3://out/runs/2/merged", fine_tune_job="support-tickets", run=2, variant="merged")


def service(application_status: str | None, *, ready: bool = True, current: bool = True) -> ObservedService:
    """The RayService as KubeRay reports it; not `current` while KubeRay has not acted on the latest spec."""
    return ObservedService(
        name="support-tickets",
        applied_hash="abc",
        generation=2,
        observed_generation=2 if current else 1,
        ready=ready,
        application_status=application_status,
        application_message="",
        endpoints=1 if ready else 0,
        serving_status=application_status,  # one Ray cluster: the application that serves is the rollout's
    )


def modeldeployment(
    rollout: Rollout,
    observed_service: ObservedService | None,
    *,
    observed: int = GENERATION,
    problem: Problem | None = None,
) -> dict[str, Any]:
    status = modeldeployment_status.compute_status(
        rollout,
        observed_service,
        generation=observed,
        previous=None,
        now=NOW,
        endpoint="http://support-tickets-serve-svc.ml-team.svc:8000",
        problem=problem,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": "support-tickets", "namespace": "ml-team", "generation": GENERATION},
        "spec": {"model": {"fromFineTuneJob": {"name": "support-tickets"}}},
        "status": status.to_wire(),
    }


def rollout(
    serving: ServedModel | None,
    *,
    previous: ServedModel | None = None,
    rejected: RejectedModel | None = None,
    started: datetime | None = None,
) -> Rollout:
    return Rollout(serving=serving, previous=previous, rejected=rejected, rollout_start_time=started)


INVALID = Problem(Reason.INVALID_SPEC, "spec.output.uri: a run in a cluster writes to s3:// or pvc://")
REJECTED = RejectedModel(uri=NEW.uri, run=2, reason="the application is DEPLOY_FAILED: out of memory")

# Named objects, shared with test_kstatus.
FINETUNEJOBS: dict[str, dict[str, Any]] = {
    "promoted": finetunejob([promoted(1)]),
    "running": finetunejob([run(1, JobPhase.RUNNING)]),
    "pending": finetunejob([run(1, JobPhase.PENDING)]),
    "retraining": finetunejob([promoted(1), run(2, JobPhase.RUNNING)]),
    "no run yet": finetunejob([]),
    "gate not passed": finetunejob([not_promoted(1)]),
    "failed": finetunejob([run(1, JobPhase.FAILED, message="RuntimeError: CUDA out of memory")]),
    "failed after promoted": finetunejob([promoted(1), run(2, JobPhase.FAILED, message="AppFailed")]),
    "invalid spec": finetunejob([], problem=INVALID),
    "suspended": finetunejob([promoted(1)], suspend=True),
    "suspended, no run": finetunejob([], suspend=True),
    "suspended, run active": finetunejob([run(1, JobPhase.RUNNING)], suspend=True),
    "older generation": finetunejob([promoted(1)], observed=GENERATION - 1),
}
MODELDEPLOYMENTS: dict[str, dict[str, Any]] = {
    "serving": modeldeployment(rollout(OLD), service("RUNNING")),
    "rolling out": modeldeployment(rollout(NEW, previous=OLD, started=NOW), service("RUNNING", current=False)),
    "nothing to serve yet": modeldeployment(rollout(None), None),
    "rolled back": modeldeployment(rollout(OLD, rejected=REJECTED), service("RUNNING")),
    "rollout failed": modeldeployment(rollout(NEW, rejected=REJECTED), service("DEPLOY_FAILED", ready=False)),
    "application unhealthy": modeldeployment(rollout(OLD), service("UNHEALTHY", ready=False)),
    "invalid spec": modeldeployment(rollout(None), None, problem=INVALID),
    "older generation": modeldeployment(rollout(OLD), service("RUNNING"), observed=GENERATION - 1),
}


# --- Argo CD's health checks, run as Argo CD runs them: the script sees `obj` and returns `hs`.


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    # Argo CD's Lua (gopher-lua) is Lua 5.1; a fresh runtime per object, as Argo CD runs each check.
    lua = lupa.lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(HEALTH_SCRIPT.read_text())
    return str(hs["status"]), str(hs["message"])


@pytest.mark.parametrize(
    ("case", "health", "message"),
    [
        ("promoted", "Healthy", "run 1 is promoted: accuracy 0.91"),
        ("running", "Progressing", "run 1: Running"),
        ("pending", "Progressing", "run 1: Pending"),
        ("retraining", "Progressing", "run 2: Running"),
        ("no run yet", "Progressing", "no run has finished yet"),
        # Nothing runs and nothing is promoted: it stays so until the spec (or a retrain) changes.
        ("gate not passed", "Progressing", SMALL_GAIN),
        ("failed", "Degraded", "RuntimeError: CUDA out of memory"),
        ("failed after promoted", "Degraded", "AppFailed"),
        ("invalid spec", "Degraded", INVALID.message),
        ("suspended", "Suspended", "spec.suspend is true: no new runs start"),
        ("suspended, no run", "Suspended", "spec.suspend is true: no new runs start"),
        ("suspended, run active", "Progressing", "run 1: Running"),
        ("older generation", "Progressing", "waiting for the operator to observe generation 3"),
    ],
)
def test_finetunejob_health(case: str, health: str, message: str) -> None:
    assert argocd_health(FINETUNEJOBS[case]) == (health, message)


@pytest.mark.parametrize(
    ("case", "health", "message"),
    [
        ("serving", "Healthy", f"serving {OLD.uri}"),
        ("rolling out", "Progressing", f"rolling out {NEW.uri}"),
        ("nothing to serve yet", "Progressing", "nothing to serve yet"),
        ("rolled back", "Degraded", REJECTED.reason),
        ("rollout failed", "Degraded", REJECTED.reason),
        ("application unhealthy", "Degraded", "the application is UNHEALTHY"),
        ("invalid spec", "Degraded", INVALID.message),
        ("older generation", "Progressing", "waiting for the operator to observe generation 3"),
    ],
)
def test_modeldeployment_health(case: str, health: str, message: str) -> None:
    assert argocd_health(MODELDEPLOYMENTS[case]) == (health, message)


@pytest.mark.parametrize("kind", KINDS)
def test_health_before_the_operator_writes_a_status(kind: str) -> None:
    obj = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "x", "generation": 1}, "spec": {}}
    assert argocd_health(obj) == ("Progressing", "waiting for the operator to report a status")


@pytest.mark.parametrize("kind", KINDS)
def test_health_with_a_stale_condition(kind: str) -> None:
    # A status written in pieces: observedGeneration current, one condition still from before.
    obj = (FINETUNEJOBS if kind == "FineTuneJob" else MODELDEPLOYMENTS)["older generation"]
    status = dict(obj["status"], observedGeneration=GENERATION)
    assert any(c["observedGeneration"] == GENERATION - 1 for c in status["conditions"])
    assert argocd_health(dict(obj, status=status)) == (
        "Progressing",
        "waiting for the operator to observe generation 3",
    )


def bare_conditions(kind: str, *, ready: bool, progressing: bool) -> dict[str, Any]:
    """An object whose conditions carry no message or reason, so the script's own words show."""
    conditions = [
        {"type": name, "status": "True" if value else "False", "observedGeneration": GENERATION}
        for name, value in (("Ready", ready), ("Progressing", progressing), ("Degraded", False))
    ]
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": "x", "generation": GENERATION},
        "spec": {},
        "status": {"observedGeneration": GENERATION, "conditions": conditions},
    }


@pytest.mark.parametrize(
    ("kind", "ready", "progressing", "expected"),
    [
        ("FineTuneJob", True, False, ("Healthy", "a run is promoted")),
        ("FineTuneJob", False, True, ("Progressing", "a run is active")),
        ("ModelDeployment", True, False, ("Healthy", "serving")),
        ("ModelDeployment", True, True, ("Progressing", "rolling out")),
    ],
)
def test_health_words_are_the_kinds_own(kind: str, ready: bool, progressing: bool, expected: tuple[str, str]) -> None:
    assert argocd_health(bare_conditions(kind, ready=ready, progressing=progressing)) == expected


def test_only_a_finetunejob_is_ever_suspended() -> None:
    # The shared script reads spec.suspend for FineTuneJobs alone (a ModelDeployment has no such field).
    job = bare_conditions("FineTuneJob", ready=True, progressing=False)
    deployment = bare_conditions("ModelDeployment", ready=True, progressing=False)
    assert argocd_health(dict(job, spec={"suspend": True}))[0] == "Suspended"
    assert argocd_health(dict(deployment, spec={"suspend": True})) == ("Healthy", "serving")


# --- The argocd-cm snippet embeds the script verbatim, once per kind.


def argocd_cm() -> str:
    """argocd-cm.yaml as generated from the Lua script."""
    lines = [
        "# Generated from health.lua by tests/unit/test_gitops.py: edit the script, then run",
        "# `python tests/unit/test_gitops.py`. Merge it into Argo CD's argocd-cm, e.g.",
        "#   kubectl -n argocd patch configmap argocd-cm --patch-file argocd-cm.yaml",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: argocd-cm",
        "  namespace: argocd",
        "  labels:",
        "    app.kubernetes.io/name: argocd-cm",
        "    app.kubernetes.io/part-of: argocd",
        "data:",
    ]
    for kind in KINDS:
        lines.append(f"  resource.customizations.health.kubetune.io_{kind}: |")
        lines += [f"    {line}" if line else "" for line in HEALTH_SCRIPT.read_text().splitlines()]
    return "\n".join(lines) + "\n"


def test_argocd_cm_embeds_the_script() -> None:
    assert ARGOCD_CM.read_text() == argocd_cm(), "run `python tests/unit/test_gitops.py` to regenerate it"
    data = yaml.safe_load(ARGOCD_CM.read_text())["data"]
    for kind in KINDS:
        assert data[f"resource.customizations.health.kubetune.io_{kind}"] == HEALTH_SCRIPT.read_text()


# --- The manifests.


def load(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def test_the_app_folder_validates() -> None:
    (kustomization,) = load(GITOPS / "app" / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    manifests = {}
    for name in kustomization["resources"]:
        (document,) = load(GITOPS / "app" / name)
        manifests[document["kind"]] = check(document)  # what `kubetune validate` checks
    job, deployment = manifests["FineTuneJob"], manifests["ModelDeployment"]
    assert isinstance(job, FineTuneJob) and isinstance(deployment, ModelDeployment)
    # The deployment follows the job's promoted run: nothing in Git names a run.
    source = deployment.spec.model.from_fine_tune_job
    assert source is not None and source.name == job.metadata["name"]


def test_argocd_application() -> None:
    (app,) = load(ARGOCD / "application.yaml")
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["spec"]["source"]["path"] == "examples/gitops/app"
    assert app["spec"]["syncPolicy"]["automated"]["selfHeal"] is True


def test_flux_kustomization() -> None:
    documents = {document["kind"]: document for document in load(GITOPS / "flux" / "kustomization.yaml")}
    source, kustomization = documents["GitRepository"], documents["Kustomization"]
    assert source["apiVersion"] == "source.toolkit.fluxcd.io/v1"
    assert kustomization["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository", "name": source["metadata"]["name"]}
    assert kustomization["spec"]["path"] == "./examples/gitops/app"
    checks = {(c["apiVersion"], c["kind"], c["name"]) for c in kustomization["spec"]["healthChecks"]}
    assert checks == {(API_VERSION, kind, "support-tickets") for kind in ("FineTuneJob", "ModelDeployment")}


if __name__ == "__main__":
    ARGOCD_CM.write_text(argocd_cm())
    sys.exit(0)
