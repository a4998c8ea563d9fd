"""Reproductions of what broke the operator, against a real API server: NaN in a report, objects
planted or orphaned under a run's names, and the largest status the budget allows."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from kubetune.operator.api.finetunejob import (
    FineTuneJob,
    GateReason,
    GateResult,
    JobPhase,
    RayJobState,
    RunRecord,
    Trigger,
)
from kubetune.operator.api.manifests import parse
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.naming import run_labels
from kubetune.operator.planning.finetunejob import run_spec_hash
from kubetune.operator.settings import Settings
from kubetune.operator.status.finetunejob import compute_status
from kubetune.operator.status.history import STATUS_MAX_BYTES, fit_history
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH, SHORT_TEXT_MAX_LENGTH, URI_MAX_LENGTH
from kubetune.runtime.contract.report import REPORT_KEY, RunProgress, Stage

from ..conftest import load_example, mutated
from ..controlplane import ControlPlane
from .harness import InProcessOperator, MovableClock, conditions, eventually, set_ray_job_status
from .test_finetunejob_operator import (
    RUNNING,
    SUCCEEDED,
    annotate,
    create_job,
    job,
    status,
    wait_event,
    wait_phase,
    wait_ray_job,
)

Manifest = dict[str, Any]
ATTACKER_REPORT = json.dumps(
    {
        "stage": "done",
        "metricsBefore": {"accuracy": 0.1},
        "metricsAfter": {"accuracy": 0.99},
        "variants": {"full": {"uri": "s3://attacker/model"}},
        "bestVariant": "full",
    }
)


def write_raw_report(kube: Kube, namespace: str, name: str, text: str) -> None:
    kube.patch(ObjectRef("v1", "ConfigMap", namespace, name), {"data": {REPORT_KEY: text}})


def test_nan_in_a_report_neither_freezes_the_status_nor_passes_the_gate(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **RUNNING)
    # What the runtime's json.dumps writes for a diverged loss (learning rate 1.0).
    write_raw_report(kube, namespace, "tickets-r1-report", '{"stage": "train", "step": 5, "loss": NaN}')
    eventually(
        lambda: (status(kube, namespace).get("runs") or [{}])[-1].get("progress", {}).get("step") == 5,
        what="progress step 5 in status",
    )
    done = '{"stage": "done", "metricsBefore": {"accuracy": 0.2}, "metricsAfter": {"accuracy": NaN, "loss": Infinity}}'
    write_raw_report(kube, namespace, "tickets-r1-report", done)
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    final = wait_phase(kube, namespace, "Succeeded")
    run = final["runs"][-1]
    assert run["notFinite"] == ["metricsAfter.accuracy", "metricsAfter.loss"]
    assert run["gate"]["reason"] == GateReason.METRIC_NOT_FINITE and "promotedRun" not in final
    assert conditions(job(kube, namespace))["Ready"]["status"] == "False"


def plant(kube: Kube, namespace: str, job_name: str, *, ray_job: bool, report: bool) -> None:
    """Objects under run 1's names, with the job's labels, made by someone else (no owner)."""
    labels = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/finetunejob": job_name, "kubetune.io/run": "1"}
    if report:
        kube.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": f"{job_name}-r1-report",
                    "namespace": namespace,
                    "labels": {**labels, "kubetune.io/report": "true"},
                },
                "data": {REPORT_KEY: ATTACKER_REPORT},
            }
        )
    if ray_job:
        annotations = {"kubetune.io/trigger": "SpecChange", "kubetune.io/trigger-detail": "generation 1"}
        kube.create(
            {
                "apiVersion": "ray.io/v1",
                "kind": "RayJob",
                "metadata": {
                    "name": f"{job_name}-r1",
                    "namespace": namespace,
                    "labels": labels,
                    "annotations": annotations,
                },
                "spec": {"entrypoint": "python -c 'print(1)'"},
            }
        )
        set_ray_job_status(kube, namespace, f"{job_name}-r1", **SUCCEEDED)


def assert_name_conflict(kube: Kube, namespace: str, job_name: str, taken: str) -> None:
    final = wait_phase(kube, namespace, "Failed", name=job_name)
    (run,) = final["runs"]
    assert run["failure"] == "NameConflict" and taken in run["message"]
    assert "promotedRun" not in final and "artifacts" not in run and "metricsAfter" not in run
    degraded = conditions(job(kube, namespace, job_name))["Degraded"]
    assert (degraded["status"], degraded["reason"]) == ("True", "NameConflict")
    assert "s3://attacker" not in json.dumps(final)


def test_a_planted_run_config_with_the_jobs_uid_is_not_used(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    """L1 of the 2026-12-06 review: a ConfigMap planted under the next run's config name, with an ownerReference
    copied from the job (its UID included), was adopted, and the run mounted the attacker's run.json."""
    created = create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", run=1)
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "tickets",
             "uid": created["metadata"]["uid"], "controller": True}  # fmt: skip
    planted = {"name": "tickets-r2-config", "namespace": namespace, "labels": run_labels("tickets", 2),
               "ownerReferences": [owner]}  # fmt: skip
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": planted, "data": {"run.json": "{}"}})
    annotate(kube, namespace, "tickets", "2026-12-07")
    run = eventually(
        lambda: (runs := status(kube, namespace).get("runs") or []) and runs[-1]["number"] == 2
        and runs[-1].get("failure") == "NameConflict" and runs[-1],
        what="run 2 refused with NameConflict",
    )  # fmt: skip
    assert "ConfigMap tickets-r2-config" in run["message"] and "data" in run["message"]
    assert kube.get("ray.io/v1", "RayJob", namespace, "tickets-r2") is None  # nothing mounts it
    config = kube.get("v1", "ConfigMap", namespace, "tickets-r2-config")
    assert config is not None and config["data"] == {"run.json": "{}"}  # left as it was
    assert status(kube, namespace)["runs"][0]["phase"] == "Succeeded"  # run 1 is untouched


def test_a_planted_rayjob_and_report_are_not_adopted(kube: Kube, namespace: str, operator: InProcessOperator) -> None:
    """One reproduction turned these into a Succeeded, promoted run serving s3://attacker/model."""
    plant(kube, namespace, "planted", ray_job=True, report=True)
    plant(kube, namespace, "rayjob-only", ray_job=True, report=False)
    create_job(kube, namespace, name="planted")
    create_job(kube, namespace, name="rayjob-only")
    assert_name_conflict(kube, namespace, "planted", "ConfigMap planted-r1-report")
    assert_name_conflict(kube, namespace, "rayjob-only", "RayJob rayjob-only-r1")
    assert "run 1 not started" in wait_event(kube, namespace, "NameConflict")
    for name in ("planted-r1", "rayjob-only-r1"):  # left as they were: not taken over, not deleted
        planted = kube.get("ray.io/v1", "RayJob", namespace, name)
        assert planted is not None and not planted["metadata"].get("ownerReferences")
    # What the job made of its own before the conflict (report, config) is its own.
    config = kube.get("v1", "ConfigMap", namespace, "rayjob-only-r1-config")
    assert config is not None and config["metadata"]["ownerReferences"][0]["name"] == "rayjob-only"


def test_an_orphan_of_an_earlier_job_with_the_same_name_is_not_adopted(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    first = create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    write_raw_report(kube, namespace, "tickets-r1-report", ATTACKER_REPORT)
    kube.request(
        "DELETE",
        kube.object_path(ObjectRef("kubetune.io/v1alpha1", "FineTuneJob", namespace, "tickets")),
        body={"propagationPolicy": "Orphan"},
    )
    # The garbage collector orphans the children; right after the control plane starts it may not know
    # the FineTuneJob kind yet (it rediscovers kinds every 30 s).
    eventually(
        lambda: kube.get("kubetune.io/v1alpha1", "FineTuneJob", namespace, "tickets") is None,
        timeout=120,
        what="job gone",
    )
    orphan = eventually(
        lambda: (
            (body := kube.get("ray.io/v1", "RayJob", namespace, "tickets-r1"))
            and not body["metadata"].get("ownerReferences")
            and body
        ),
        timeout=120,
        what="the RayJob orphaned by the garbage collector",
    )
    second = create_job(kube, namespace)
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert_name_conflict(kube, namespace, "tickets", "tickets-r1")
    kept = kube.get("ray.io/v1", "RayJob", namespace, "tickets-r1")
    assert kept is not None and kept["metadata"]["uid"] == orphan["metadata"]["uid"]


def largest_record(number: int, trigger_hash: str, promoted: bool = False) -> RunRecord:
    """A run record with every bounded field at its bound."""
    text, short = "m" * MESSAGE_MAX_LENGTH, "s" * SHORT_TEXT_MAX_LENGTH
    metrics = {f"{n:03d}".ljust(SHORT_TEXT_MAX_LENGTH, "x"): 0.123456789012345 for n in range(32)}
    return RunRecord(
        number=number,
        ray_job_name=f"big-r{number}",
        trigger=Trigger.ANNOTATION,
        trigger_detail=short,
        spec_generation=1,
        trigger_hash=trigger_hash,
        phase=JobPhase.SUCCEEDED if promoted else JobPhase.FAILED,
        message=text,
        ray_job=RayJobState(name=short, job_status=short, job_deployment_status=short, reason=short, message=text),
        progress=RunProgress(stage=Stage.EXPORT, message=text, step=10**9, total_steps=10**9, loss=1e300),
        metrics_before=metrics,
        metrics_after=metrics,
        not_finite=[f"metricsAfter.{n}".ljust(SHORT_TEXT_MAX_LENGTH, "y") for n in range(64)],
        artifacts={
            f"{n:02d}".ljust(SHORT_TEXT_MAX_LENGTH, "v"): "s3://b/" + "k" * (URI_MAX_LENGTH - 7) for n in range(16)
        },
        best_variant=short,
        manifest_uri="s3://b/" + "k" * (URI_MAX_LENGTH - 7),
        best_hyperparameters={"note": "h" * 4000},
        gate=GateResult(
            passed=promoted, reason=GateReason.PASSED if promoted else GateReason.RUN_NOT_SUCCEEDED, message=text
        ),
        promotable=promoted,
    )


def test_the_largest_status_the_budget_allows_is_written_and_the_job_goes_on(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, name="big", spec__historyLimit=100, spec__suspend=True)
    parsed = parse(mutated(load_example("finetunejob-minimal.yaml"), "spec.historyLimit", 100))
    assert isinstance(parsed, FineTuneJob)
    records = [largest_record(n, run_spec_hash(parsed), promoted=n == 50) for n in range(1, 101)]
    kept, dropped = fit_history(records)
    largest = compute_status(kept, suspended=True, generation=1, previous=None, now=datetime.now(UTC)).to_wire()
    size = len(json.dumps(largest))
    # Records this large fill the budget within a few: the rest were summarised, then dropped.
    assert STATUS_MAX_BYTES // 2 < size <= STATUS_MAX_BYTES and dropped
    wait_phase(kube, namespace, "Pending", name="big")  # the operator's first status, before ours
    ref = ObjectRef("kubetune.io/v1alpha1", "FineTuneJob", namespace, "big")
    kube.patch_status(ref, largest)
    assert len(status(kube, namespace, "big")["runs"]) == len(kept)
    # The operator reads it back, starts a run on request and still writes its status within the budget.
    kube.patch(ref, {"metadata": {"annotations": {"kubetune.io/retrain": "now"}}, "spec": {"suspend": False}})
    after = eventually(
        lambda: (current := status(kube, namespace, "big")).get("currentRun") == 101 and current,
        what="run 101 in the status",
    )
    assert after["promotedRun"] == 50 and len(json.dumps(after)) <= STATUS_MAX_BYTES


def test_a_rayservice_made_by_someone_else_is_not_taken_over(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    from .test_modeldeployment_operator import create_deployment, deployment, finish_run, secrets

    secrets(kube, namespace)
    planted = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "support-tickets", "namespace": namespace, "labels": {"team": "other"}},
        "spec": {"serveConfigV2": "applications: []", "rayClusterConfig": {"headGroupSpec": {"template": {}}}},
    }
    before = kube.create(planted)
    assert before is not None
    create_job(kube, namespace)
    create_deployment(kube, namespace)
    finish_run(kube, namespace, 1, accuracy=0.9)
    eventually(
        lambda: (c := conditions(deployment(kube, namespace)).get("Ready")) and c["reason"] == "NameConflict",
        what="the deployment's Ready=False, reason NameConflict",
    )
    message = conditions(deployment(kube, namespace))["Ready"]["message"]
    assert message == "RayService support-tickets exists and does not belong to this ModelDeployment"
    after = kube.get("ray.io/v1", "RayService", namespace, "support-tickets")
    assert after is not None and after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "serving" not in (deployment(kube, namespace).get("status") or {})


def test_images_and_priority_classes_outside_the_operators_settings_are_invalid(
    control_plane: ControlPlane, kube: Kube, namespace: str, running_operator: InProcessOperator
) -> None:
    from .test_modeldeployment_operator import deployment

    settings = Settings(
        metrics_port=0,
        recheck_seconds=600,
        allowed_images="registry.example.com/kubetune/*",
        allowed_priority_classes="batch",
    )
    running_operator.stop()
    restricted = InProcessOperator(control_plane.kubeconfig, MovableClock(), settings)
    restricted.start()
    try:
        create_job(kube, namespace, spec__resources={"image": "evil.example/miner:1"})
        kube.create(
            {
                **mutated(
                    load_example("modeldeployment.yaml"), "spec.resources.priorityClassName", "system-cluster-critical"
                ),
                "metadata": {"name": "support-tickets", "namespace": namespace},
            }
        )
        ready = eventually(
            lambda: (c := conditions(job(kube, namespace)).get("Ready")) and c["reason"] == "InvalidSpec" and c,
            what="the job's Ready=False, reason InvalidSpec",
        )
        assert ready["message"].startswith("spec.resources.image: 'evil.example/miner:1' is not allowed here")
        served = eventually(
            lambda: (c := conditions(deployment(kube, namespace)).get("Ready")) and c["reason"] == "InvalidSpec" and c,
            what="the deployment's Ready=False, reason InvalidSpec",
        )
        assert served["message"].startswith("spec.resources.priorityClassName: 'system-cluster-critical'")
        assert kube.list("ray.io/v1", "RayJob", namespace, {}) == []
        assert kube.list("ray.io/v1", "RayService", namespace, {}) == []
    finally:
        restricted.stop()
        running_operator.start()


def test_tolerations_node_labels_and_remote_code_outside_the_settings_are_invalid(
    control_plane: ControlPlane, kube: Kube, namespace: str, running_operator: InProcessOperator
) -> None:
    from .test_modeldeployment_operator import deployment

    control_plane_taint = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    settings = Settings(metrics_port=0, recheck_seconds=600, allowed_node_selectors="node-pool")
    running_operator.stop()
    restricted = InProcessOperator(control_plane.kubeconfig, MovableClock(), settings)
    restricted.start()
    try:
        create_job(
            kube,
            namespace,
            spec__model={"uri": "pvc://models/base", "trustRemoteCode": True},
            spec__resources={"tolerations": [control_plane_taint]},
        )
        served = mutated(
            load_example("modeldeployment.yaml"), "spec.resources.head.nodeSelector", {"kubernetes.io/hostname": "cp-1"}
        )
        kube.create({**served, "metadata": {"name": "support-tickets", "namespace": namespace}})
        ready = eventually(
            lambda: (c := conditions(job(kube, namespace)).get("Ready")) and c["reason"] == "InvalidSpec" and c,
            what="the job's Ready=False, reason InvalidSpec",
        )
        assert ready["message"] == (
            "spec.resources.tolerations[0]: tolerating node-role.kubernetes.io/control-plane:NoSchedule is not allowed "
            "here (this operator allows no tolerations); spec.model.trustRemoteCode: the code of 'pvc://models/base' "
            "may not run here (no model's code may run here)"
        )
        refused = eventually(
            lambda: (c := conditions(deployment(kube, namespace)).get("Ready")) and c["reason"] == "InvalidSpec" and c,
            what="the deployment's Ready=False, reason InvalidSpec",
        )
        assert refused["message"] == (
            "spec.resources.head.nodeSelector: kubernetes.io/hostname=cp-1 is not allowed here (allowed: node-pool)"
        )
        assert kube.list("ray.io/v1", "RayJob", namespace, {}) == []
        assert kube.list("ray.io/v1", "RayService", namespace, {}) == []
    finally:
        restricted.stop()
        running_operator.start()
