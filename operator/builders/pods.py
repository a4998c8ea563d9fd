"""Pieces of the Ray pods every kind builds: image, resources, storage access, volumes, placement.

Pure: no I/O, no clock, no kopf. Runs (RayJob) and endpoints (RayService) share them,
so a model is trained and served with the same image, credentials and placement rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.operator.api.common import Placement, StorageAccess
from kubetune.operator.settings import Settings

Manifest = dict[str, Any]
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


def pvc_claims(uris: Iterable[str | None]) -> list[str]:
    """Claims named by pvc:// URIs, each once, in order of appearance."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            if claim not in claims:
                claims.append(claim)
    return claims


def storage_environment(storage: StorageAccess | None) -> tuple[list[Manifest], list[Manifest]]:
    """(env, envFrom) that give a pod access to object storage; credentials by reference only."""
    env: list[Manifest] = []
    env_from: list[Manifest] = []
    if storage is not None:
        if storage.s3_endpoint:
            env.append({"name": "AWS_ENDPOINT_URL", "value": storage.s3_endpoint})
        if storage.s3_region:
            env.append({"name": "AWS_DEFAULT_REGION", "value": storage.s3_region})
        if storage.credentials_secret is not None:
            # Referenced, never copied: the values stay in the Secret.
            env_from.append({"secretRef": {"name": storage.credentials_secret.name}})
    return env, env_from


def placement(resources: Placement, gpu_node: bool) -> Manifest:
    """Node selection, tolerations, affinity and priority of a pod (GPU pods also select the GPU model)."""
    pod: Manifest = {}
    selector = dict(resources.node_selector or {})
    if gpu_node and resources.gpu_type:
        selector[GPU_PRODUCT_LABEL] = resources.gpu_type
    if selector:
        pod["nodeSelector"] = selector
    if resources.tolerations:
        pod["tolerations"] = [t.to_wire() for t in resources.tolerations]
    if resources.affinity:
        pod["affinity"] = resources.affinity
    if resources.priority_class_name:
        pod["priorityClassName"] = resources.priority_class_name
    return pod


@dataclass(frozen=True)
class RayPod:
    """One Ray pod template: its container, resources, environment, volumes and placement."""

    container: str
    cpu: str
    memory: str
    gpus: int
    placement: Placement
    env: Sequence[Manifest] = ()
    env_from: Sequence[Manifest] = ()
    claims: Sequence[str] = ()
    mounts: Sequence[Manifest] = field(default=())  # besides the claims'
    volumes: Sequence[Manifest] = field(default=())

    def template(self, settings: Settings) -> Manifest:
        limits: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        if self.gpus:
            limits[GPU_RESOURCE] = self.gpus
        env = [{"name": "KUBETUNE_PVC_ROOT", "value": settings.pvc_mount_root}, *self.env]
        mounts = [
            *({"name": f"pvc-{claim}", "mountPath": f"{settings.pvc_mount_root}/{claim}"} for claim in self.claims),
            *self.mounts,
        ]
        volumes = [
            *({"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim}} for claim in self.claims),
            *self.volumes,
        ]
        main: Manifest = {
            "name": self.container,
            "image": self.placement.image or settings.runtime_image,
            "resources": {"requests": {"cpu": self.cpu, "memory": self.memory}, "limits": limits},
            "env": env,
        }
        if self.env_from:
            main["envFrom"] = list(self.env_from)
        if mounts:
            main["volumeMounts"] = mounts
        spec: Manifest = {"containers": [main], **placement(self.placement, gpu_node=self.gpus > 0)}
        if volumes:
            spec["volumes"] = volumes
        return {"spec": spec}
