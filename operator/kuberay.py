"""Whether the installed KubeRay can run Ray with token authentication, read from its CRDs.

KubeRay 1.5.1 added the RayCluster's spec.authOptions (and so the same field in the RayCluster
spec that a RayJob and a RayService embed). The API server drops a field its CRD does not know,
so with an older KubeRay a cluster asked for with authOptions would run without authentication,
silently. While token authentication is on, the operator therefore reads KubeRay's CRDs first and
creates or changes no Ray cluster while they lack the field; each object says why in its status.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kubetune.operator.api.common import Placement
from kubetune.operator.builders.pods import image_of
from kubetune.operator.kube import Kube
from kubetune.operator.settings import Settings

log = logging.getLogger("kubetune.kuberay")
Manifest = dict[str, Any]
CRD_API_VERSION, CRD_KIND = "apiextensions.k8s.io/v1", "CustomResourceDefinition"
RAY_API_VERSION = "v1"
# Each of KubeRay's CRDs, and where authOptions sits in its ray.io/v1 objects.
AUTH_OPTIONS_PATHS: dict[str, tuple[str, ...]] = {
    "rayclusters.ray.io": ("spec", "authOptions"),
    "rayjobs.ray.io": ("spec", "rayClusterSpec", "authOptions"),
    "rayservices.ray.io": ("spec", "rayClusterConfig", "authOptions"),
}
MINIMUM_KUBERAY = "1.5.1"
# KubeRay refuses token authentication for an older Ray (rayVersion).
MINIMUM_RAY = (2, 52, 0)
AUTH_SETTING = "operator.kuberayAuthOptions (KUBETUNE_KUBERAY_AUTH_OPTIONS)"
# How long an answer is kept: an upgraded KubeRay is seen within this long (plus the objects' recheck).
CHECK_SECONDS = 60.0


def schema_has(crd: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether the CRD's ray.io/v1 schema declares the field at `path`."""
    versions = (crd.get("spec") or {}).get("versions") or []
    version = next((v for v in versions if v.get("name") == RAY_API_VERSION), None)
    node: Mapping[str, Any] | None = ((version or {}).get("schema") or {}).get("openAPIV3Schema")
    for part in path:
        if node is None:
            return False
        node = (node.get("properties") or {}).get(part)
    return node is not None


def missing_auth_support(crds: Mapping[str, Mapping[str, Any] | None]) -> str | None:
    """What of KubeRay's CRDs (by name; None: not installed) lacks authOptions; None when none does."""
    for name, path in AUTH_OPTIONS_PATHS.items():
        crd = crds.get(name)
        if crd is None:
            return f"KubeRay's CRD {name} is not installed"
        if not schema_has(crd, path):
            return f"KubeRay's CRD {name} has no {'.'.join(path)} (KubeRay before {MINIMUM_KUBERAY})"
    return None


def auth_unavailable_message(missing: str) -> str:
    """What a FineTuneJob or ModelDeployment says while KubeRay cannot run Ray with token authentication."""
    return (
        f"Ray token authentication is on ({AUTH_SETTING}) but {missing}: no Ray cluster is created or changed "
        f"without it. Upgrade KubeRay and its CRDs to {MINIMUM_KUBERAY} or later, or set {AUTH_SETTING} to false "
        f"to run Ray without authentication (closed by its NetworkPolicy alone)"
    )


def ray_version_problem(placement: Placement, field: str, settings: Settings) -> str | None:
    """Why the Ray of `placement` (at `field`, e.g. spec.resources) cannot run with token authentication."""
    if not settings.kuberay_auth_options:
        return None
    ray_version = image_of(placement, settings)[1]
    release = re.match(r"(\d+)\.(\d+)\.(\d+)", ray_version)
    if release is None or tuple(map(int, release.groups())) >= MINIMUM_RAY:
        return None
    minimum = ".".join(map(str, MINIMUM_RAY))
    return (
        f"{field}.rayVersion: Ray {ray_version} has no token authentication ({minimum} or later), which "
        f"{AUTH_SETTING} turns on"
    )


class KubeRayAuthSupport:
    """Reads KubeRay's CRDs (at most once per `ttl_seconds`) and says what keeps token authentication out.

    The CRDs are listed by name (a field selector): the operator may list CRDs, which kopf needs, not get them.
    Safe to share between reconcile threads. An error reading them fails the pass that asked, which is retried.
    """

    def __init__(
        self, kube: Kube, ttl_seconds: float = CHECK_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.kube, self.ttl_seconds, self.clock = kube, ttl_seconds, clock
        self._lock = threading.Lock()
        self._answer: tuple[float, str | None] | None = None

    def missing(self) -> str | None:
        """What of KubeRay lacks token authentication; None when it has it."""
        with self._lock:
            now = self.clock()
            if self._answer is not None and now - self._answer[0] < self.ttl_seconds:
                return self._answer[1]
            missing = missing_auth_support({name: self._crd(name) for name in AUTH_OPTIONS_PATHS})
            if self._answer is None or self._answer[1] != missing:
                if missing is None:
                    log.info("KubeRay's CRDs have authOptions: Ray clusters run with token authentication")
                else:
                    log.warning("%s", auth_unavailable_message(missing))
            self._answer = (now, missing)
            return missing

    def _crd(self, name: str) -> Manifest | None:
        items, _ = self.kube.list_with_version(CRD_API_VERSION, CRD_KIND, None, field_selector=f"metadata.name={name}")
        return items[0] if items else None
