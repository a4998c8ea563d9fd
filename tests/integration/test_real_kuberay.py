"""The real KubeRay operator, kube-scheduler and simulated nodes (kwok) on the test control plane.

Elsewhere the tests play KubeRay by patching child status; here KubeRay v1.5.1 itself
turns RayJobs into RayClusters and RayClusters into pods, kube-scheduler places the
pods on a CPU pool and a tainted GPU pool of kwok nodes, and kwok marks them Running
(no container runs, and the Ray dashboard of a head pod never answers).

KubeRay watches only this module's namespace (``kuberay_namespace``), so the other
modules on the shared control plane are not disturbed, and it stops with the module.

Fixtures for tests of this module: ``kuberay_namespace``; ``create`` (creates an
object there and deletes it after the test); ``wait_for`` (polls, and fails with the
namespace's pods, events, Ray objects and the simulator's logs); ``ray_pods`` (the pods
of a RayCluster with their node and node pool); ``cluster_sim`` (node → pool, logs).
"""

from __future__ import annotations

from collections.abc import Callable

from kubetune.operator.kube import Kube

from ..controlplane.cluster_sim import CPU_POOL, GPU_POOL, ClusterSim
from .kuberay_sim import (
    Manifest,
    PodPlacement,
    WaitFor,
    collection_path,
    condition_of,
    get_or_none,
    items_of,
    ray_cluster,
    ray_cluster_spec,
)


def test_kuberay_places_the_head_on_the_cpu_pool_and_the_worker_on_the_gpu_pool(
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    ray_pods: Callable[[str], list[PodPlacement]],
    kube: Kube,
    kuberay_namespace: str,
) -> None:
    create(ray_cluster("placement"))

    def running() -> list[PodPlacement] | None:
        pods = ray_pods("placement")
        return pods if len(pods) == 2 and all(p.phase == "Running" for p in pods) else None

    head, worker = wait_for(running, what="a running head and worker pod")
    assert (head.node_type, head.pool) == ("head", CPU_POOL)
    assert (worker.node_type, worker.group, worker.pool) == ("worker", "gpu", GPU_POOL)
    # KubeRay counts the cluster ready once every pod is Running and Ready.
    path = f"{collection_path('ray.io/v1', 'RayCluster', kuberay_namespace)}/placement"
    wait_for(
        lambda: (kube.request("GET", path).get("status") or {}).get("state") == "ready",
        what="RayCluster placement to be ready",
    )


def test_a_worker_asking_for_a_gpu_no_node_has_stays_pending(
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    ray_pods: Callable[[str], list[PodPlacement]],
    kube: Kube,
    kuberay_namespace: str,
) -> None:
    create(ray_cluster("no-such-gpu", gpu_product="NVIDIA-B200"))
    worker = wait_for(
        lambda: next((p for p in ray_pods("no-such-gpu") if p.node_type == "worker"), None),
        what="KubeRay to create the worker pod",
    )
    pod = f"/api/v1/namespaces/{kuberay_namespace}/pods/{worker.name}"

    def unschedulable() -> Manifest | None:
        condition = condition_of(kube.request("GET", pod), "PodScheduled")
        return condition if condition.get("reason") == "Unschedulable" else None

    assert wait_for(unschedulable, what="the worker to be found unschedulable")["status"] == "False"
    events = f"/api/v1/namespaces/{kuberay_namespace}/events"
    wait_for(
        lambda: [
            e
            for e in items_of(kube, events, fieldSelector=f"involvedObject.name={worker.name}")
            if e.get("reason") == "FailedScheduling"
        ],
        what="a FailedScheduling event for the worker",
    )
    placed = {p.node_type: p for p in ray_pods("no-such-gpu")}
    assert placed["worker"].node is None and placed["worker"].phase == "Pending"


def test_kuberay_accepts_a_rayjob_and_creates_its_raycluster(
    create: Callable[[Manifest], Manifest],
    wait_for: WaitFor,
    ray_pods: Callable[[str], list[PodPlacement]],
    kube: Kube,
    kuberay_namespace: str,
    cluster_sim: ClusterSim,
) -> None:
    create(
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": "smoke"},
            "spec": {
                "entrypoint": "python -c 'print(1)'",
                "submissionMode": "K8sJobMode",
                "shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": 60,
                "rayClusterSpec": ray_cluster_spec(),
            },
        }
    )
    path = f"{collection_path('ray.io/v1', 'RayJob', kuberay_namespace)}/smoke"

    def cluster_named() -> str | None:
        status = kube.request("GET", path).get("status") or {}
        assert status.get("jobDeploymentStatus") != "ValidationFailed", status
        return status.get("rayClusterName")

    name = wait_for(cluster_named, what="KubeRay to name the RayJob's RayCluster")
    cluster_path = f"{collection_path('ray.io/v1', 'RayCluster', kuberay_namespace)}/{name}"
    cluster = wait_for(lambda: get_or_none(kube, cluster_path), what=f"RayCluster {name}")
    assert [o["kind"] for o in cluster["metadata"].get("ownerReferences", [])] == ["RayJob"]
    # Once the cluster is ready KubeRay creates the submitter Job, the Job controller its pod,
    # and the scheduler puts it on the CPU pool (it tolerates no GPU taint).
    wait_for(
        lambda: (kube.request("GET", path).get("status") or {}).get("jobDeploymentStatus") == "Running",
        what="the RayJob to be Running",
    )
    submitters = wait_for(
        lambda: [
            pod
            for pod in items_of(kube, f"/api/v1/namespaces/{kuberay_namespace}/pods", labelSelector="job-name=smoke")
            if pod.get("status", {}).get("phase") == "Running"
        ],
        what="the submitter pod to run",
    )
    assert cluster_sim.node_pools[submitters[0]["spec"]["nodeName"]] == CPU_POOL
    assert {p.pool for p in ray_pods(name)} == {CPU_POOL, GPU_POOL}
