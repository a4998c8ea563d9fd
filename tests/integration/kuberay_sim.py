"""Fixtures for the tests that run the real KubeRay operator, kube-scheduler and kwok nodes.

``cluster_sim`` (module scope) starts them for one test module; KubeRay watches only
``kuberay_namespace``, so the other modules on the shared control plane are not disturbed.
``create`` makes an object there and deletes it after the test; ``wait_for`` polls, and fails
with the namespace's pods, events, Ray objects and the simulator's logs; ``ray_pods`` lists
the pods of a RayCluster with their node and node pool. conftest.py makes them fixtures.
"""

from __future__ import annotations

import copy
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import pytest
from kubetune.operator.kube import ApiError, Kube

from ..controlplane import CommandError, ControlPlane
from ..controlplane.cluster_sim import (
    CPU_POOL,
    GPU_PRODUCT,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    GPU_TOLERATION,
    POOL_LABEL,
    ClusterSim,
)
from .harness import eventually

T = TypeVar("T")
Manifest = dict[str, Any]
RAY_IMAGE = "rayproject/ray:2.49.0"  # never pulled: kwok runs no containers
_PLURALS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayService": "rayservices"}


@dataclass(frozen=True)
class PodPlacement:
    """Where a pod of a RayCluster is: KubeRay's node type (head, worker) and group, the node and its pool."""

    name: str
    node_type: str
    group: str
    phase: str
    node: str | None
    pool: str | None


class WaitFor(Protocol):
    def __call__(self, probe: Callable[[], T | Literal[False] | None], *, what: str, timeout: float = 30.0) -> T: ...


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{base}/namespaces/{namespace}/{_PLURALS.get(kind, kind.lower() + 's')}"


def get_or_none(kube: Kube, path: str) -> Manifest | None:
    try:
        return kube.request("GET", path)
    except ApiError as error:
        if error.not_found:
            return None
        raise


def items_of(kube: Kube, path: str, **query: str) -> list[Manifest]:
    items: list[Manifest] = kube.request("GET", path, query=query or None).get("items") or []
    return items


def condition_of(body: Manifest, kind: str) -> Manifest:
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == kind), {})


def describe(kube: Kube, namespace: str, sim: ClusterSim, log_lines: int = 25) -> str:
    """What a failing wait prints: pods and where they are, events, Ray objects' status, the simulator's logs."""
    pools = sim.node_pools
    lines = [f"--- pods in {namespace}"]
    for pod in items_of(kube, f"/api/v1/namespaces/{namespace}/pods"):
        node = pod["spec"].get("nodeName")
        scheduled = condition_of(pod, "PodScheduled")
        lines.append(
            f"{pod['metadata']['name']}: {pod.get('status', {}).get('phase')} on {node} (pool {pools.get(node or '')})"
            f" PodScheduled={scheduled.get('status')} {scheduled.get('reason', '')} {scheduled.get('message', '')}"
        )
    lines.append("--- events")
    events = items_of(kube, f"/api/v1/namespaces/{namespace}/events")
    events.sort(key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    for event in events[-30:]:
        involved = event.get("involvedObject", {})
        lines.append(
            f"{event.get('type')} {event.get('reason')} {involved.get('kind')}/{involved.get('name')}:"
            f" {event.get('message')}"
        )
    for kind in ("RayCluster", "RayJob"):
        lines.append(f"--- {kind}s")
        for item in items_of(kube, collection_path("ray.io/v1", kind, namespace)):
            lines.append(f"{item['metadata']['name']}: {item.get('status')}")
    lines.append(sim.logs(log_lines))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def cluster_sim(control_plane: ControlPlane, kube: Kube) -> Iterator[ClusterSim]:
    """kube-scheduler, kwok nodes and KubeRay, acting in one namespace of their own, for this module."""
    if control_plane.external:
        pytest.skip("an existing cluster is in use: it has its own scheduler and nodes")
    namespace = f"kuberay-sim-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    sim = ClusterSim(control_plane, kuberay_namespaces=[namespace])
    try:
        sim.start()
    except CommandError:
        if shutil.which("go") is None:
            pytest.skip("the simulator is not built and there is no Go toolchain to build it")
        raise
    try:
        yield sim
        # Stop only once KubeRay has taken its finalizer off the RayJobs and kwok has removed the
        # deleted pods of its nodes; the namespace controller finishes the rest on its own.
        kube.request("DELETE", f"/api/v1/namespaces/{namespace}")
        leftovers = [
            *(collection_path("ray.io/v1", kind, namespace) for kind in ("RayJob", "RayCluster", "RayService")),
            f"/api/v1/namespaces/{namespace}/pods",
        ]
        deadline = time.monotonic() + 60
        while any(items_of(kube, path) for path in leftovers):
            if time.monotonic() > deadline:
                raise AssertionError(f"{namespace} not emptied after 60 s\n{describe(kube, namespace, sim)}")
            time.sleep(0.2)
    finally:
        sim.stop()


@pytest.fixture(scope="module")
def kuberay_namespace(cluster_sim: ClusterSim) -> str:
    """The namespace the real KubeRay acts in (and no other)."""
    return cluster_sim.kuberay_namespaces[0]


@pytest.fixture
def wait_for(kube: Kube, kuberay_namespace: str, cluster_sim: ClusterSim) -> WaitFor:
    """Poll `probe` until it returns something truthy (and return that); fail with diagnostics after `timeout` s."""

    def wait(probe: Callable[[], T | Literal[False] | None], *, what: str, timeout: float = 30.0) -> T:
        return eventually(
            probe,
            timeout=timeout,
            interval=0.2,
            what=what,
            diagnose=lambda: describe(kube, kuberay_namespace, cluster_sim),
        )

    return wait


@pytest.fixture
def create(kube: Kube, kuberay_namespace: str) -> Iterator[Callable[[Manifest], Manifest]]:
    """Create an object in the KubeRay namespace (returned as stored); it is deleted after the test."""
    made: list[str] = []

    def make(manifest: Manifest) -> Manifest:
        body = copy.deepcopy(manifest)
        body["metadata"]["namespace"] = kuberay_namespace
        collection = collection_path(body["apiVersion"], body["kind"], kuberay_namespace)
        stored = kube.request("POST", collection, body=body)
        made.append(f"{collection}/{body['metadata']['name']}")
        return stored

    yield make
    for path in reversed(made):
        try:
            kube.request("DELETE", path, body={"propagationPolicy": "Background"})
        except ApiError as error:
            if not error.not_found:
                raise


@pytest.fixture
def ray_pods(kube: Kube, kuberay_namespace: str, cluster_sim: ClusterSim) -> Callable[[str], list[PodPlacement]]:
    """The pods of a RayCluster (by KubeRay's ray.io/cluster label), head first, with their node and pool."""

    def placements(cluster: str) -> list[PodPlacement]:
        pools = cluster_sim.node_pools
        pods = [
            PodPlacement(
                name=pod["metadata"]["name"],
                node_type=pod["metadata"].get("labels", {}).get("ray.io/node-type", ""),
                group=pod["metadata"].get("labels", {}).get("ray.io/group", ""),
                phase=pod.get("status", {}).get("phase", ""),
                node=pod["spec"].get("nodeName"),
                pool=pools.get(pod["spec"].get("nodeName") or ""),
            )
            for pod in items_of(
                kube, f"/api/v1/namespaces/{kuberay_namespace}/pods", labelSelector=f"ray.io/cluster={cluster}"
            )
        ]
        return sorted(pods, key=lambda p: (p.node_type != "head", p.name))

    return placements


def ray_cluster_spec(*, gpu_product: str = GPU_PRODUCT) -> Manifest:
    """A CPU head on the CPU pool and one worker with one GPU of `gpu_product`."""
    resources = {"cpu": "2", "memory": "8Gi"}
    return {
        "rayVersion": "2.49.0",
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {
                "spec": {
                    "nodeSelector": {POOL_LABEL: CPU_POOL},
                    "containers": [
                        {
                            "name": "ray-head",
                            "image": RAY_IMAGE,
                            "resources": {"requests": resources, "limits": resources},
                        }
                    ],
                }
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": "gpu",
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 1,
                "rayStartParams": {},
                "template": {
                    "spec": {
                        "nodeSelector": {GPU_PRODUCT_LABEL: gpu_product},
                        "tolerations": [GPU_TOLERATION],
                        "containers": [
                            {
                                "name": "ray-worker",
                                "image": RAY_IMAGE,
                                "resources": {
                                    "requests": {"cpu": "8", "memory": "64Gi", GPU_RESOURCE: "1"},
                                    "limits": {"cpu": "8", "memory": "64Gi", GPU_RESOURCE: "1"},
                                },
                            }
                        ],
                    }
                },
            }
        ],
    }


def ray_cluster(name: str, *, gpu_product: str = GPU_PRODUCT) -> Manifest:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name},
        "spec": ray_cluster_spec(gpu_product=gpu_product),
    }
