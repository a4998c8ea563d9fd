"""kubetune's runs and endpoints on the real KubeRay controller, kube-scheduler and kwok nodes.

The operator runs in-process against the test API server; KubeRay v1.5.1 turns what it
builds into RayClusters and pods, which the scheduler places on the simulated CPU pool
and the tainted GPU pool, in a namespace that enforces the restricted Pod Security level.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.builders.modeldeployment import TOKEN_MOUNT_PATH
from kubetune.operator.kube import Kube
from kubetune.runtime.contract.plan import RunPlan

from ..conftest import EXAMPLES
from ..controlplane.cluster_sim import CPU_POOL, GPU_POOL, GPU_PRODUCT, ClusterSim
from ..plans import DOES_NOT_FIT, FITS
from .harness import InProcessOperator, write_plan
from .kuberay_sim import Manifest, PodPlacement, WaitFor, collection_path, get_or_none, items_of

RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
PULL_SECRET = "registry-creds"


def example(name: str, kind: str) -> Manifest:
    documents = yaml.safe_load_all((EXAMPLES / name).read_text())
    document: Manifest = next(d for d in documents if d["kind"] == kind)
    return document


@pytest.fixture(scope="module")
def restricted(kube: Kube, kuberay_namespace: str) -> str:
    """The simulator's namespace, enforcing the restricted Pod Security level, with the examples' Secrets."""
    kube.request(
        "PATCH",
        f"/api/v1/namespaces/{kuberay_namespace}",
        body={"metadata": {"labels": RESTRICTED}},
        content_type="application/merge-patch+json",
    )
    for secret in ("training-storage", "support-tickets-endpoint", PULL_SECRET):
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret}, "stringData": {"token": "t"}}
        kube.request("POST", f"/api/v1/namespaces/{kuberay_namespace}/secrets", body=body)
    return kuberay_namespace


@pytest.fixture(scope="module")
def priority_class(kube: Kube) -> Iterator[str]:
    """The complete example's PriorityClass (pods naming a missing one are refused)."""
    path = "/apis/scheduling.k8s.io/v1/priorityclasses"
    body = {"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": "training-low"}}
    kube.request("POST", path, body={**body, "value": 100})
    yield "training-low"
    kube.request("DELETE", f"{path}/training-low")


def job_status(kube: Kube, namespace: str, name: str) -> Manifest:
    status: Manifest = (kube.get(API_VERSION, "FineTuneJob", namespace, name) or {}).get("status") or {}
    return status


def condition(status: Manifest, kind: str) -> Manifest:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def pod_body(kube: Kube, namespace: str, placement: PodPlacement) -> Manifest:
    pod: Manifest = kube.request("GET", f"/api/v1/namespaces/{namespace}/pods/{placement.name}")
    return pod


def the_complete_example(**edits: Any) -> Manifest:
    job = copy.deepcopy(example("finetunejob-complete.yaml", "FineTuneJob"))
    job["spec"].pop("schedule")
    job["spec"]["resources"]["imagePullSecrets"] = [PULL_SECRET]
    for key, value in edits.items():
        if value is None:
            job["spec"].pop(key, None)
        else:
            job["spec"]["resources"][key] = value
    return job


def plan_run(
    kube: Kube, namespace: str, run: str, wait_for: WaitFor, pools: dict[str, str], plan: RunPlan = FITS
) -> Manifest:
    """Play the run's plan pod once the scheduler has placed it (on the CPU pool, holding no GPU): write its plan."""
    pod: Manifest = wait_for(
        lambda: next(
            (
                pod
                for pod in items_of(kube, f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"job-name={run}-plan")
                if pod["spec"].get("nodeName")
            ),
            None,
        ),
        what=f"the plan pod of {run} to be placed",
        timeout=60,
    )
    assert pools[pod["spec"]["nodeName"]] == CPU_POOL
    assert "nvidia.com/gpu" not in str(pod["spec"]["containers"][0]["resources"])
    write_plan(kube, namespace, run, plan)
    return pod


def ray_cluster_of(kube: Kube, namespace: str, ray_job: str, wait_for: WaitFor) -> str:
    path = f"{collection_path('ray.io/v1', 'RayJob', namespace)}/{ray_job}"

    def named() -> str | None:
        status = (get_or_none(kube, path) or {}).get("status") or {}
        assert status.get("jobDeploymentStatus") != "ValidationFailed", status
        return status.get("rayClusterName")

    return wait_for(named, what=f"KubeRay to make the RayCluster of {ray_job}", timeout=60)


def ray_token_of(container: Manifest) -> dict[str, Any] | None:
    """Where KubeRay's token authentication (authOptions) gives the container its Ray token from; None: no auth."""
    env = {item["name"]: item for item in container.get("env", [])}
    if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
        return None
    reference: dict[str, Any] = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    return reference


def test_kuberay_runs_the_complete_example_where_the_spec_says(
    operator: InProcessOperator,
    restricted: str,
    priority_class: str,
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    ray_pods: Callable[[str], list[PodPlacement]],
    cluster_sim: ClusterSim,
    kube: Kube,
) -> None:
    namespace = restricted
    job = create(the_complete_example(queueName=None))
    run = f"{job['metadata']['name']}-r1"
    plan_pod = plan_run(kube, namespace, run, wait_for, cluster_sim.node_pools)["spec"]
    assert plan_pod["serviceAccountName"] == f"{run}-runner" and plan_pod["priorityClassName"] == "training-low"
    cluster = ray_cluster_of(kube, namespace, run, wait_for)
    placed = wait_for(
        lambda: (pods := ray_pods(cluster)) and len(pods) == 3 and all(p.phase == "Running" for p in pods) and pods,
        what="the head and two workers to run",
        timeout=60,
    )
    assert {p.node_type: p.pool for p in placed} == {"head": CPU_POOL, "worker": GPU_POOL}
    assert [p.pool for p in placed if p.node_type == "worker"] == [GPU_POOL, GPU_POOL]
    head = pod_body(kube, namespace, placed[0])["spec"]
    worker = pod_body(kube, namespace, placed[1])["spec"]
    for spec in (head, worker):
        assert spec["serviceAccountName"] == f"{run}-runner"
        assert spec["imagePullSecrets"] == [{"name": PULL_SECRET}]
        assert spec["priorityClassName"] == "training-low"
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["envFrom"] == [{"secretRef": {"name": "training-storage"}}]
        assert {"tmp", "cache", "shm"} <= {volume["name"] for volume in spec["volumes"]}
    assert head["nodeSelector"] == {"node-pool": "cpu"}
    assert not [t for t in head.get("tolerations", []) if t["key"] == "nvidia.com/gpu"]  # the API server adds others
    assert worker["nodeSelector"] == {"node-pool": "gpu", "nvidia.com/gpu.product": GPU_PRODUCT}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert "run-config" in {volume["name"] for volume in head["volumes"]}
    # The token is the head's only: the run's ServiceAccount token is mounted nowhere else.
    assert head["automountServiceAccountToken"] is True and worker["automountServiceAccountToken"] is False
    # KubeRay submits the run from a pod of the template kubetune gave it, on the CPU pool.
    submitter = wait_for(
        lambda: [
            pod
            for pod in items_of(kube, f"/api/v1/namespaces/{namespace}/pods", labelSelector=f"job-name={run}")
            if pod["spec"].get("nodeName")
        ],
        what="the submitter pod to be placed",
        timeout=60,
    )[0]["spec"]
    assert submitter["securityContext"]["runAsNonRoot"] is True
    assert submitter["imagePullSecrets"] == [{"name": PULL_SECRET}]
    assert submitter["automountServiceAccountToken"] is False
    assert cluster_sim.node_pools[submitter["nodeName"]] == CPU_POOL
    # Ray's token authentication: KubeRay made the cluster's token and gave it to every Ray container.
    token = {"name": cluster, "key": "auth_token"}
    for spec in (head, worker, submitter):
        assert ray_token_of(spec["containers"][0]) == token
    assert kube.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{cluster}")  # the token Secret
    policy = kube.get("networking.k8s.io/v1", "NetworkPolicy", namespace, run)
    assert policy is not None and policy["spec"]["podSelector"]["matchLabels"]["kubetune.io/run"] == "1"


def test_a_gpu_type_no_node_has_leaves_the_run_waiting_and_saying_why(
    operator: InProcessOperator,
    restricted: str,
    priority_class: str,
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    kube: Kube,
    cluster_sim: ClusterSim,
) -> None:
    job = the_complete_example(queueName=None, gpuType="NVIDIA-B200")
    job["metadata"]["name"] = "no-such-gpu"
    create(job)
    plan_run(kube, restricted, "no-such-gpu-r1", wait_for, cluster_sim.node_pools)

    def waiting() -> Manifest | None:
        status = job_status(kube, restricted, "no-such-gpu")
        return status if condition(status, "Progressing").get("reason") == "Unschedulable" else None

    status = wait_for(waiting, what="the job to say its run cannot be scheduled", timeout=60)
    (run,) = status["runs"]
    assert run["waiting"] == "Unschedulable" and run["phase"] == "Pending"
    assert "cannot be scheduled" in run["message"] and "no-such-gpu-r1-" in run["message"]
    assert "node(s) didn't match" in condition(status, "Progressing")["message"]


def test_a_run_that_cannot_fit_fails_before_any_gpu_worker_is_created(
    operator: InProcessOperator,
    restricted: str,
    priority_class: str,
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    kube: Kube,
    cluster_sim: ClusterSim,
) -> None:
    job = the_complete_example(queueName=None)
    job["metadata"]["name"] = "too-big"
    create(job)
    plan_run(kube, restricted, "too-big-r1", wait_for, cluster_sim.node_pools, DOES_NOT_FIT)

    def failed() -> Manifest | None:
        status = job_status(kube, restricted, "too-big")
        return status if status.get("phase") == "Failed" else None

    status = wait_for(failed, what="the run to fail on its plan", timeout=60)
    [run] = status["runs"]
    assert (run["failure"], run["message"]) == ("InvalidSpec", DOES_NOT_FIT.message)
    assert condition(status, "Degraded")["reason"] == "InvalidSpec"
    # Nothing that would hold a GPU was made: no RayJob, no RayCluster, no pod but the plan's.
    assert get_or_none(kube, f"{collection_path('ray.io/v1', 'RayJob', restricted)}/too-big-r1") is None
    clusters = items_of(kube, collection_path("ray.io/v1", "RayCluster", restricted))
    assert [c for c in clusters if c["metadata"]["name"].startswith("too-big")] == []
    pods = items_of(kube, f"/api/v1/namespaces/{restricted}/pods", labelSelector="kubetune.io/finetunejob=too-big")
    assert [pod["metadata"]["labels"].get("job-name") for pod in pods] == ["too-big-r1-plan"]


def test_a_queued_run_says_which_kueue_queue_it_waits_for(
    operator: InProcessOperator,
    restricted: str,
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    kube: Kube,
    cluster_sim: ClusterSim,
) -> None:
    job = the_complete_example()
    job["metadata"]["name"] = "queued"
    create(job)
    plan_run(kube, restricted, "queued-r1", wait_for, cluster_sim.node_pools)

    def queued() -> Manifest | None:
        status = job_status(kube, restricted, "queued")
        return status if condition(status, "Progressing").get("reason") == "Queued" else None

    status = wait_for(queued, what="the job to say it waits for its Kueue queue", timeout=60)
    assert "LocalQueue 'ml-training'" in condition(status, "Progressing")["message"]
    assert status["runs"][0]["phase"] == "Suspended"


def test_kuberay_serves_a_model_deployment_where_the_spec_says(
    operator: InProcessOperator,
    restricted: str,
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    ray_pods: Callable[[str], list[PodPlacement]],
    kube: Kube,
) -> None:
    deployment = copy.deepcopy(example("modeldeployment.yaml", "ModelDeployment"))
    deployment["spec"]["model"] = {"uri": "s3://kubetune-examples/runs/support-tickets/variants/int8"}
    deployment["spec"]["resources"].update(
        cpu="500m",
        gpus=1,
        gpuType=GPU_PRODUCT,
        imagePullSecrets=[PULL_SECRET],
        head={"cpu": "250m", "memory": "1Gi"},
        autoscaler={"cpu": "100m", "memory": "256Mi"},
    )
    create(deployment)
    name = deployment["metadata"]["name"]
    service_path = f"{collection_path('ray.io/v1', 'RayService', restricted)}/{name}"
    cluster = wait_for(
        lambda: (
            ((get_or_none(kube, service_path) or {}).get("status") or {})
            .get("activeServiceStatus", {})
            .get("rayClusterName")
            or ((get_or_none(kube, service_path) or {}).get("status") or {})
            .get("pendingServiceStatus", {})
            .get("rayClusterName")
        ),
        what="KubeRay to make the RayService's RayCluster",
        timeout=60,
    )
    placed = wait_for(
        lambda: (pods := ray_pods(cluster)) and len(pods) == 2 and all(p.node for p in pods) and pods,
        what="the head and one replica pod to be placed",
        timeout=60,
    )
    assert {p.node_type: p.pool for p in placed} == {"head": CPU_POOL, "worker": GPU_POOL}
    for placement in placed:
        spec = pod_body(kube, restricted, placement)["spec"]
        assert spec["imagePullSecrets"] == [{"name": PULL_SECRET}]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert all(c["securityContext"]["allowPrivilegeEscalation"] is False for c in spec["containers"])
    replica = pod_body(kube, restricted, next(p for p in placed if p.node_type == "worker"))["spec"]
    (server,) = replica["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert server["resources"]["requests"]["cpu"] == "500m"  # what the spec says, not rounded up
    head = pod_body(kube, restricted, next(p for p in placed if p.node_type == "head"))["spec"]
    containers = {c["name"]: c for c in head["containers"]}
    assert set(containers) == {"ray-head", "autoscaler"}
    assert containers["ray-head"]["resources"]["requests"]["cpu"] == "250m"
    assert containers["autoscaler"]["resources"]["requests"] == {"cpu": "100m", "memory": "256Mi"}
    # The autoscaler, and no other container, has the ServiceAccount token (it scales the RayCluster
    # through the API); the pod mounts none, and its ServiceAccount is the one KubeRay made for it.
    token_path = "/var/run/secrets/kubernetes.io/serviceaccount"
    mounts = {name: {m["mountPath"] for m in c.get("volumeMounts", [])} for name, c in containers.items()}
    assert [name for name, paths in mounts.items() if token_path in paths] == ["autoscaler"]
    token = next(v for v in head["volumes"] if v["name"] == "autoscaler-token")
    assert {"serviceAccountToken", "configMap", "downwardAPI"} == {k for s in token["projected"]["sources"] for k in s}
    assert head["serviceAccountName"] == cluster
    # Ray's token authentication on the endpoint's cluster too, the autoscaler's container included.
    assert [ray_token_of(c) for c in (*containers.values(), server)] == [{"name": cluster, "key": "auth_token"}] * 3
    account = kube.get("v1", "ServiceAccount", restricted, cluster)
    assert account is not None and account["metadata"]["ownerReferences"][0]["kind"] == "RayCluster"
    assert replica["nodeSelector"]["nvidia.com/gpu.product"] == GPU_PRODUCT
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in replica["tolerations"]
    assert server["envFrom"] == [{"secretRef": {"name": "training-storage"}}]
    token = next(v for v in replica["volumes"] if v["name"] == "endpoint-token")
    assert token["secret"]["secretName"] == "support-tickets-endpoint"
    assert {"name": "endpoint-token", "mountPath": TOKEN_MOUNT_PATH, "readOnly": True} in server["volumeMounts"]
    policy = kube.get("networking.k8s.io/v1", "NetworkPolicy", restricted, name)
    assert policy is not None and {"ports": [{"protocol": "TCP", "port": 8000}]} in policy["spec"]["ingress"]
