"""The ModelDeployment operator against a real API server; the tests play KubeRay (RayJob and RayService status)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, VariantReport

from ..conftest import load_example, mutated
from ..controlplane import ControlPlane
from .harness import (
    EXAMPLE_RUNS,
    InProcessOperator,
    MovableClock,
    conditions,
    create_secret,
    eventually,
    set_ray_job_status,
)
from .test_finetunejob_operator import JOB, SUCCEEDED, create_job, events, wait_event, wait_phase, wait_ray_job

DEPLOYMENT = ("kubetune.io/v1alpha1", "ModelDeployment")
RAY_SERVICE = ("ray.io/v1", "RayService")


def secrets(kube: Kube, namespace: str) -> None:
    """The Secrets the example deployment names (the endpoint's token, the storage credentials)."""
    for name, data in (("support-tickets-endpoint", {"token": "t0ken-4471"}), ("training-storage", {"K": "v"})):
        create_secret(kube, namespace, name, data)


def finish_run(kube: Kube, namespace: str, number: int, accuracy: float) -> None:
    """Run `number` of `tickets` ends with a report (base accuracy 0.5) and KubeRay's success."""
    run = f"tickets-r{number}"
    wait_ray_job(kube, namespace, run)
    variants = {
        name: VariantReport(uri=f"{EXAMPLE_RUNS}/{number}/variants/{name}", metrics={"accuracy": accuracy})
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


def play_kuberay(
    kube: Kube,
    namespace: str,
    application: str,
    ready: bool = True,
    *,
    pending: str | None = None,
    deployment_message: str = "",
) -> None:
    """What KubeRay writes once it acted on the current spec: the application's status, Ready, endpoints.

    `application` is the status on the active cluster. With `pending`, KubeRay is bringing up a new
    cluster (an upgrade in progress) whose application has that status ("" for none yet); without,
    there is none. `deployment_message` is what Serve says of the ModelServer deployment.
    """
    service = kube.get(*RAY_SERVICE, namespace, "support-tickets")
    assert service is not None

    def applications(status: str) -> dict[str, Any]:
        app: dict[str, Any] = {"status": status, "message": "as told"}
        if deployment_message:
            app["serveDeploymentStatuses"] = {"ModelServer": {"status": status, "message": deployment_message}}
        return {"model": app}

    upgrading = pending is not None
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
            {
                "type": "UpgradeInProgress",
                "status": "True" if upgrading else "False",
                "reason": "BothActivePendingClustersExist" if upgrading else "NoPendingCluster",
                "message": "",
                "lastTransitionTime": "2026-11-29T12:00:00Z",
            },
        ],
        "activeServiceStatus": {
            "rayClusterName": "support-tickets-a",
            "applicationStatuses": applications(application),
        },
        # A merge patch: null removes the pending cluster KubeRay has promoted (or never had).
        "pendingServiceStatus": None,
    }
    if pending is not None:
        status["pendingServiceStatus"] = {"rayClusterName": "support-tickets-b"}
        if pending:
            status["pendingServiceStatus"]["applicationStatuses"] = applications(pending)
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
    return f"{EXAMPLE_RUNS}/1/variants/int8"


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
    assert ready["servingPods"] == 2
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
    service = wait_serving(kube, namespace, f"{EXAMPLE_RUNS}/2/variants/int8")
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


def test_a_ray_service_annotated_by_an_older_operator_is_not_rewritten(
    kube: Kube, namespace: str, promoted: str
) -> None:
    """Operators before kubetune.io/applied-hash wrote what they applied under kubetune.io/spec-hash."""
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    ref = ObjectRef(*RAY_SERVICE, namespace, "support-tickets")
    applied = (kube.get(*RAY_SERVICE, namespace, "support-tickets") or {})["metadata"]["annotations"]
    older = {"kubetune.io/applied-hash": None, "kubetune.io/spec-hash": applied["kubetune.io/applied-hash"]}
    kube.patch(ref, {"metadata": {"annotations": older}})
    # A change the operator acts on: the endpoint loses its pods, and the status says so.
    play_kuberay(kube, namespace, "RUNNING", ready=False)
    eventually(lambda: deployment(kube, namespace)["status"].get("servingPods") == 0, what="no serving pods")
    annotations = (kube.get(*RAY_SERVICE, namespace, "support-tickets") or {})["metadata"]["annotations"]
    assert "kubetune.io/applied-hash" not in annotations  # not rewritten: what it says was applied is current


def test_a_failed_rollout_rolls_back_and_is_not_retried(kube: Kube, namespace: str, promoted: str) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    retrain(kube, namespace, "second")
    finish_run(kube, namespace, 2, accuracy=0.9)
    wait_serving(kube, namespace, f"{EXAMPLE_RUNS}/2/variants/int8")
    traceback = "Traceback (most recent call last):\n" + "  File ...\n" * 300 + "InvalidCxxCompiler: no g++"
    play_kuberay(kube, namespace, "DEPLOY_FAILED", ready=True, deployment_message=traceback)
    wait_serving(kube, namespace, promoted)  # back to run 1's artifact
    status = eventually(
        lambda: (s := deployment(kube, namespace)["status"]).get("rejected") and s, what="run 2 rejected"
    )
    assert status["rejected"]["run"] == 2 and "DEPLOY_FAILED" in status["rejected"]["reason"]
    # What Serve said of the deployment, not only of the application: the end, where the error is.
    reason = status["rejected"]["reason"]
    assert "ModelServer: …" in reason and "InvalidCxxCompiler: no g++" in reason
    assert status["serving"]["run"] == 1
    degraded = conditions(deployment(kube, namespace))["Degraded"]
    assert degraded["status"] == "True" and degraded["reason"] == "RolledBack"
    rolled_back = wait_event(kube, namespace, "RolledBack")
    assert "back to run 1" in rolled_back and "InvalidCxxCompiler: no g++" in rolled_back
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Degraded")
    # Whatever wakes the deployment, run 2 is not tried again.
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"labels": {"touched": "yes"}}})
    kube.patch(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"), {"metadata": {"labels": {"touched": "yes"}}})
    eventually(lambda: deployment(kube, namespace)["metadata"]["labels"].get("touched"), what="label")
    assert serve_args(ray_service(kube, namespace))["modelUri"] == promoted
    assert [reason for reason, _ in events(kube, namespace)].count("RolloutStarted") == 2  # run 1 and run 2, once


def test_a_deployment_waits_for_its_job_and_its_pods_name_a_missing_secret(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    # The deployment's Secrets do not exist; the operator holds no grant on Secrets and does not look.
    create_deployment(kube, namespace)
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
    service = wait_serving(kube, namespace, f"{EXAMPLE_RUNS}/1/variants/int8")
    assert '"name": "training-storage"' in json.dumps(service["spec"])  # the storage Secret, by reference
    # The kubelet cannot start the replica without the storage Secret, and says which one.
    pod = ray_pod(kube, namespace, "support-tickets-a-head-x7k2p")
    missing = {"reason": "CreateContainerConfigError", "message": 'secret "training-storage" not found'}
    container = {"name": "ray-head", "image": "kubetune-runtime:test", "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"waiting": missing}}  # fmt: skip
    kube.patch_status(pod, {"containerStatuses": [container]})
    progressing = condition_reason(kube, namespace, "Progressing", "PodConfigError")
    assert 'secret "training-storage" not found' in progressing["message"]
    assert 'secret "training-storage" not found' in wait_event(kube, namespace, "PodConfigError")


def test_deleting_the_deployment_removes_its_ray_service(
    control_plane: ControlPlane, kube: Kube, namespace: str, promoted: str
) -> None:
    if not control_plane.garbage_collection:
        pytest.skip("no garbage collector runs here (KUBEBUILDER_ASSETS holds no kube-controller-manager)")
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    kube.delete(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"))
    eventually(lambda: kube.get(*RAY_SERVICE, namespace, "support-tickets") is None, timeout=60, what="gone")


def replica_cpu(service: dict[str, Any]) -> str:
    container = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    cpu: str = container["resources"]["requests"]["cpu"]
    return cpu


def ray_pod(kube: Kube, namespace: str, name: str) -> ObjectRef:
    """A pod of the endpoint's Ray cluster, as KubeRay makes it from our template (labels included)."""
    labels = {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/modeldeployment": "support-tickets"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "ray-head", "image": "kubetune-runtime:test"}]},
    }
    assert kube.create(pod) is not None
    return ObjectRef("v1", "Pod", namespace, name)


UNSCHEDULABLE = {
    "type": "PodScheduled",
    "status": "False",
    "reason": "Unschedulable",
    "message": "0/1 nodes are available: 1 Insufficient cpu.",
    "lastTransitionTime": "2026-12-06T12:00:00Z",
}


def condition_reason(kube: Kube, namespace: str, kind: str, reason: str) -> dict[str, Any]:
    return eventually(
        lambda: (c := conditions(deployment(kube, namespace)).get(kind)) and c["reason"] == reason and c,
        what=f"{kind} {reason}",
    )


def test_a_deployment_says_which_pod_holds_it_up_and_why(kube: Kube, namespace: str, promoted: str) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    phase(kube, namespace, "Deploying")
    head = ray_pod(kube, namespace, "support-tickets-a-head-x7k2p")
    kube.patch_status(head, {"conditions": [UNSCHEDULABLE]})
    progressing = condition_reason(kube, namespace, "Progressing", "Unschedulable")
    assert progressing["status"] == "True"
    assert "support-tickets-a-head-x7k2p" in progressing["message"] and "Insufficient cpu" in progressing["message"]
    assert condition_reason(kube, namespace, "Ready", "Unschedulable")["status"] == "False"
    assert "Insufficient cpu" in wait_event(kube, namespace, "Unschedulable")
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "kubetune-runtime:test"'}
    container = {"name": "ray-head", "image": "kubetune-runtime:test", "imageID": "", "ready": False,
                 "restartCount": 0, "state": {"waiting": waiting}}  # fmt: skip
    scheduled = {**UNSCHEDULABLE, "status": "True", "reason": "", "message": ""}
    kube.patch_status(head, {"conditions": [scheduled], "containerStatuses": [container]})
    pulling = condition_reason(kube, namespace, "Progressing", "ImagePullFailed")
    assert "Back-off pulling image" in pulling["message"]
    assert "Back-off pulling image" in wait_event(kube, namespace, "ImagePullFailed")
    # Once the pods run and KubeRay serves, nothing holds the endpoint up.
    kube.patch_status(head, {"containerStatuses": [{**container, "ready": True, "state": {"running": {}}}]})
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")


def test_a_new_cluster_is_rolled_out_until_kuberay_serves_from_it(kube: Kube, namespace: str, promoted: str) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    # Only the replicas' resources change: the same model on another Ray cluster.
    kube.patch(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"), {"spec": {"resources": {"cpu": "500m"}}})
    service = eventually(
        lambda: (s := ray_service(kube, namespace)) and replica_cpu(s) == "500m" and s, what="the new cluster's spec"
    )
    assert serve_args(service)["modelUri"] == promoted
    eventually(
        lambda: [m for r, m in events(kube, namespace) if r == "RolloutStarted" and "generation 2" in m],
        what="RolloutStarted for the spec of generation 2",
    )
    status = phase(kube, namespace, "Deploying")
    assert status["serving"]["generation"] == 2 and status["previous"]["generation"] == 1
    # KubeRay brings up the new cluster while the old one serves: the rollout is not over.
    play_kuberay(kube, namespace, "RUNNING", pending="")
    eventually(lambda: deployment(kube, namespace)["status"].get("applicationStatus") == "DEPLOYING", what="pending")
    assert deployment(kube, namespace)["status"]["phase"] == "Deploying"
    # The application runs on the new cluster, but KubeRay has not switched the traffic to it yet.
    play_kuberay(kube, namespace, "RUNNING", pending="RUNNING")
    eventually(lambda: deployment(kube, namespace)["status"].get("applicationStatus") == "RUNNING", what="running")
    assert deployment(kube, namespace)["status"]["phase"] == "Deploying"
    assert [reason for reason, _ in events(kube, namespace)].count("RolloutSucceeded") == 1  # run 1's
    # KubeRay promotes the new cluster: done.
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    eventually(
        lambda: [reason for reason, _ in events(kube, namespace)].count("RolloutSucceeded") == 2,
        what="the second RolloutSucceeded",
    )


def test_a_cluster_that_never_starts_is_rolled_back_at_the_deadline(
    kube: Kube, namespace: str, promoted: str, clock: MovableClock
) -> None:
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, promoted)
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")
    kube.patch(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"), {"spec": {"resources": {"cpu": "64"}}})
    eventually(lambda: replica_cpu(ray_service(kube, namespace)) == "64", what="the new cluster's spec")
    play_kuberay(kube, namespace, "RUNNING", pending="")
    worker = ray_pod(kube, namespace, "support-tickets-b-replicas-worker-q9z4m")
    kube.patch_status(worker, {"conditions": [UNSCHEDULABLE]})
    condition_reason(kube, namespace, "Progressing", "Unschedulable")
    clock.set(clock() + timedelta(seconds=901))  # past spec.rolloutDeadlineSeconds
    wake = {"metadata": {"labels": {"woken": "yes"}}}  # a pass, as the next timer would make one
    kube.patch(ObjectRef(*DEPLOYMENT, namespace, "support-tickets"), wake)
    rolled_back = wait_event(kube, namespace, "RolledBack")
    assert "generation 2" in rolled_back and "back to generation 1's spec" in rolled_back
    assert "Insufficient cpu" in rolled_back
    # Back to the cluster that serves, on the model it serves; the spec is not tried again.
    eventually(lambda: replica_cpu(ray_service(kube, namespace)) == "2", what="the spec before")
    status = deployment(kube, namespace)["status"]
    assert status["rejected"]["generation"] == 2 and "uri" not in status["rejected"]
    assert status["serving"]["uri"] == promoted and status["serving"]["generation"] == 1
    assert conditions(deployment(kube, namespace))["Degraded"]["reason"] == "RolledBack"
    kube.delete(worker)
    play_kuberay(kube, namespace, "RUNNING")
    ready = phase(kube, namespace, "Degraded")
    assert conditions(deployment(kube, namespace))["Ready"]["status"] == "True" and ready["rejected"]["generation"] == 2
    assert replica_cpu(ray_service(kube, namespace)) == "2"
