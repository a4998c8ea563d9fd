"""The ModelDeployment operator against a real API server; the tests play KubeRay (RayJob and RayService status)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, VariantReport

from ..conftest import load_example, mutated
from ..controlplane import ControlPlane
from .harness import InProcessOperator, conditions, eventually, set_ray_job_status
from .test_finetunejob_operator import JOB, SUCCEEDED, create_job, events, wait_event, wait_phase, wait_ray_job

DEPLOYMENT = ("kubetune.io/v1alpha1", "ModelDeployment")
RAY_SERVICE = ("ray.io/v1", "RayService")


def secrets(kube: Kube, namespace: str) -> None:
    """The Secrets the example deployment names (the endpoint's token, the storage credentials)."""
    for name, data in (("support-tickets-endpoint", {"token": "t0ken-4471"}), ("training-storage", {"K": "v"})):
        kube.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "stringData": data,
            }
        )


def finish_run(kube: Kube, namespace: str, number: int, accuracy: float) -> None:
    """Run `number` of `tickets` ends with a report (base accuracy 0.5) and KubeRay's success."""
    run = f"tickets-r{number}"
    wait_ray_job(kube, namespace, run)
    variants = {
        name: VariantReport(uri=f"s3://out/tickets/{number}/variants/{name}", metrics={"accuracy": accuracy})
        for name in ("full", "merged", "int8")
    }
    report = RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": 0.5},
        metrics_after={"accuracy": accuracy},
        variants=variants,
        best_variant="int8",
    )
    kube.patch(
        ObjectRef("v1", "ConfigMap", namespace, f"{run}-report"), {"data": {REPORT_KEY: report.model_dump_json()}}
    )
    set_ray_job_status(kube, namespace, run, **SUCCEEDED)
    wait_phase(kube, namespace, "Succeeded", run=number)


def retrain(kube: Kube, namespace: str, value: str) -> None:
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"annotations": {"kubetune.io/retrain": value}}})


def create_deployment(kube: Kube, namespace: str) -> dict[str, Any]:
    document = load_example("modeldeployment.yaml")
    document = mutated(document, "spec.model", {"fromFineTuneJob": {"name": "tickets"}})
    created = kube.create({**document, "metadata": {**document["metadata"], "namespace": namespace}})
    assert created is not None
    return created


def deployment(kube: Kube, namespace: str) -> dict[str, Any]:
    body = kube.get(*DEPLOYMENT, namespace, "support-tickets")
    assert body is not None
    return body


def served_run(kube: Kube, namespace: str) -> int | None:
    return ((deployment(kube, namespace).get("status") or {}).get("serving") or {}).get("run")


def ray_service(kube: Kube, namespace: str) -> dict[str, Any]:
    return eventually(lambda: kube.get(*RAY_SERVICE, namespace, "support-tickets"), timeout=60, what="RayService")


def serve_args(service: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    return args


def wait_serving(kube: Kube, namespace: str, uri: str) -> dict[str, Any]:
    return eventually(
        lambda: (s := kube.get(*RAY_SERVICE, namespace, "support-tickets")) and serve_args(s)["modelUri"] == uri and s,
        timeout=60,
        what=f"the RayService serving {uri}",
    )


def play_kuberay(kube: Kube, namespace: str, application: str, ready: bool = True) -> None:
    """What KubeRay writes once it acted on the current spec: the application's status, Ready, endpoints."""
    service = kube.get(*RAY_SERVICE, namespace, "support-tickets")
    assert service is not None
    status = {
        "observedGeneration": service["metadata"]["generation"],
        "numServeEndpoints": 2 if ready else 0,
        "conditions": [
            {
                "type": "Ready",
                "status": "True" if ready else "False",
                "reason": "NonZeroServeEndpoints",
                "message": "",
                "lastTransitionTime": "2026-11-29T12:00:00Z",
            },
        ],
        "activeServiceStatus": {"applicationStatuses": {"model": {"status": application, "message": "as told"}}},
    }
    kube.patch_status(ObjectRef(*RAY_SERVICE, namespace, "support-tickets"), status)


def phase(kube: Kube, namespace: str, wanted: str) -> dict[str, Any]:
    return eventually(
        lambda: (s := deployment(kube, namespace).get("status") or {}).get("phase") == wanted and s,
        what=f"ModelDeployment phase {wanted}",
    )


@pytest.fixture
def promoted(kube: Kube, namespace: str, operator: InProcessOperator) -> str:
    """`tickets` with run 1 promoted, and the deployment's Secrets; the run's served artifact URI."""
    secrets(kube, namespace)
    create_job(kube, namespace, name="tickets")
    finish_run(kube, namespace, 1, accuracy=0.8)
    return "s3://out/tickets/1/variants/int8"


def test_a_deployment_serves_the_promoted_run_on_a_ray_service(kube: Kube, namespace: str, promoted: str) -> None:
    created = create_deployment(kube, namespace)
    service = wait_serving(kube, namespace, promoted)
    owner = service["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("ModelDeployment", created["metadata"]["uid"])
    config = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert config["import_path"] == "kubetune.runtime.serving.app:build"
    assert config["deployments"][0]["autoscaling_config"]["max_replicas"] == 8
    assert serve_args(service)["task"] == "text-classification"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["workerGroupSpecs"][0]["maxReplicas"] == 8
    # The token and the storage credentials travel by reference: no value in the RayService.
    assert "t0ken-4471" not in json.dumps(service)
    status = phase(kube, namespace, "Deploying")
    assert status["serving"]["run"] == 1 and status["serving"]["variant"] == "int8"
    play_kuberay(kube, namespace, "RUNNING")
    ready = phase(kube, namespace, "Ready")
    assert ready["readyReplicas"] == 2
    assert ready["endpoint"] == f"http://support-tickets-serve-svc.{namespace}.svc:8000/"
    assert conditions(deployment(kube, namespace))["Ready"]["status"] == "True"
    assert "rolling out run 1" in wait_event(kube, namespace, "RolloutStarted")
    wait_event(kube, namespace, "RolloutSucceeded")


def test_promotion_moves_the_endpoint_and_a_failed_gate_changes_nothing(
    kube: Kube, namespace: str, promoted: str
) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    retrain(kube, namespace, "second")
    finish_run(kube, namespace, 2, accuracy=0.9)
    service = wait_serving(kube, namespace, "s3://out/tickets/2/variants/int8")
    cluster_before = service["spec"]["rayClusterConfig"]
    status = eventually(
        lambda: (s := deployment(kube, namespace)["status"])["serving"]["run"] == 2 and s, what="serving run 2"
    )
    assert status["previous"]["run"] == 1 and status["phase"] == "Deploying"
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    # The same Ray cluster: only the Serve config changed (an in-place upgrade).
    assert kube.get(*RAY_SERVICE, namespace, "support-tickets")["spec"]["rayClusterConfig"] == cluster_before  # type: ignore[index]
    # Neither user object was written: their generations are still the first.
    assert deployment(kube, namespace)["metadata"]["generation"] == 1
    assert kube.get(*JOB, namespace, "tickets")["metadata"]["generation"] == 1  # type: ignore[index]

    # Run 3 is worse than the base model: it fails the gate, and the endpoint does not move.
    version = kube.get(*RAY_SERVICE, namespace, "support-tickets")["metadata"]["resourceVersion"]  # type: ignore[index]
    retrain(kube, namespace, "third")
    finish_run(kube, namespace, 3, accuracy=0.4)
    eventually(
        lambda: (kube.get(*JOB, namespace, "tickets") or {})["status"]["runs"][-1].get("promotable") is False,
        what="run 3 judged",
    )
    eventually(lambda: served_run(kube, namespace) == 2, what="still serving run 2")
    service_after = kube.get(*RAY_SERVICE, namespace, "support-tickets")
    assert service_after is not None and service_after["metadata"]["resourceVersion"] == version
    assert deployment(kube, namespace)["status"]["phase"] == "Ready"


def test_a_failed_rollout_rolls_back_and_is_not_retried(kube: Kube, namespace: str, promoted: str) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    retrain(kube, namespace, "second")
    finish_run(kube, namespace, 2, accuracy=0.9)
    wait_serving(kube, namespace, "s3://out/tickets/2/variants/int8")
    play_kuberay(kube, namespace, "DEPLOY_FAILED", ready=True)
    wait_serving(kube, namespace, promoted)  # back to run 1's artifact
    status = eventually(
        lambda: (s := deployment(kube, namespace)["status"]).get("rejected") and s, what="run 2 rejected"
    )
    assert status["rejected"]["run"] == 2 and "DEPLOY_FAILED" in status["rejected"]["reason"]
    assert status["serving"]["run"] == 1
    degraded = conditions(deployment(kube, namespace))["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack"
    assert "back to run 1" in wait_event(kube, namespace, "RolledBack")
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Degraded")
    # Whatever wakes the deployment, run 2 is not tried again.
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"labels": {"touched": "yes"}}})
    kube.patch(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"), {"metadata": {"labels": {"touched": "yes"}}})
    eventually(lambda: deployment(kube, namespace)["metadata"]["labels"].get("touched"), what="label")
    assert serve_args(ray_service(kube, namespace))["modelUri"] == promoted
    assert [reason for reason, _ in events(kube, namespace)].count("RolloutStarted") == 2  # run 1 and run 2, once


def test_a_deployment_waits_for_its_secrets_and_its_job(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_deployment(kube, namespace)
    ready = eventually(
        lambda: (c := conditions(deployment(kube, namespace)).get("Ready")) and c["reason"] == "SecretNotFound" and c,
        what="SecretNotFound",
    )
    assert "support-tickets-endpoint" in ready["message"] or "training-storage" in ready["message"]
    secrets(kube, namespace)
    no_job = eventually(
        lambda: (c := conditions(deployment(kube, namespace)).get("Ready")) and c["reason"] == "FineTuneJobNotFound"
        and c,
        what="FineTuneJobNotFound",
    )  # fmt: skip
    assert "tickets" in no_job["message"]
    create_job(kube, namespace, name="tickets")
    eventually(
        lambda: (conditions(deployment(kube, namespace)).get("Ready") or {}).get("reason") == "NoModelYet",
        what="NoModelYet",
    )
    finish_run(kube, namespace, 1, accuracy=0.8)
    wait_serving(kube, namespace, "s3://out/tickets/1/variants/int8")


def test_deleting_the_deployment_removes_its_ray_service(
    control_plane: ControlPlane, kube: Kube, namespace: str, promoted: str
) -> None:
    if not control_plane.garbage_collection:
        pytest.skip("no garbage collector runs here (KUBEBUILDER_ASSETS holds no kube-controller-manager)")
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    kube.delete(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"))
    eventually(lambda: kube.get(*RAY_SERVICE, namespace, "support-tickets") is None, timeout=60, what="gone")
