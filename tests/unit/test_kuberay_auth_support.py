"""Whether KubeRay can run Ray with token authentication: read from its CRDs (pure), cached, and the
Ray version a spec names."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.common import Placement
from kubetune.operator.kuberay import (
    AUTH_OPTIONS_PATHS,
    KubeRayAuthSupport,
    auth_unavailable_message,
    missing_auth_support,
    ray_version_problem,
)
from kubetune.operator.settings import Settings


def crd(path: tuple[str, ...], version: str = "v1") -> dict[str, Any]:
    """A CRD whose `version` schema declares the object fields along `path`."""
    node: dict[str, Any] = {"type": "object"}
    for part in reversed(path):
        node = {"type": "object", "properties": {part: node}}
    return {"spec": {"versions": [{"name": version, "schema": {"openAPIV3Schema": node}}]}}


CURRENT = {name: crd(path) for name, path in AUTH_OPTIONS_PATHS.items()}
# KubeRay before 1.5.1: the RayCluster spec without authOptions.
OLD = {name: crd((*path[:-1], "autoscalerOptions")) for name, path in AUTH_OPTIONS_PATHS.items()}


@pytest.mark.parametrize(
    ("crds", "missing"),
    [
        (CURRENT, None),
        (OLD, "KubeRay's CRD rayclusters.ray.io has no spec.authOptions (KubeRay before 1.5.1)"),
        ({**CURRENT, "rayjobs.ray.io": OLD["rayjobs.ray.io"]},
         "KubeRay's CRD rayjobs.ray.io has no spec.rayClusterSpec.authOptions (KubeRay before 1.5.1)"),
        ({**CURRENT, "rayservices.ray.io": OLD["rayservices.ray.io"]},
         "KubeRay's CRD rayservices.ray.io has no spec.rayClusterConfig.authOptions (KubeRay before 1.5.1)"),
        ({**CURRENT, "rayservices.ray.io": crd(AUTH_OPTIONS_PATHS["rayservices.ray.io"], version="v1alpha1")},
         "KubeRay's CRD rayservices.ray.io has no spec.rayClusterConfig.authOptions (KubeRay before 1.5.1)"),
        ({**CURRENT, "rayjobs.ray.io": None}, "KubeRay's CRD rayjobs.ray.io is not installed"),
    ],
)  # fmt: skip
def test_what_of_kuberay_lacks_auth_options(crds: dict[str, Any], missing: str | None) -> None:
    assert missing_auth_support(crds) == missing


def test_the_message_names_the_setting_and_the_version() -> None:
    message = auth_unavailable_message("KubeRay's CRD rayjobs.ray.io is not installed")
    assert "operator.kuberayAuthOptions (KUBETUNE_KUBERAY_AUTH_OPTIONS)" in message
    assert "1.5.1 or later" in message and "rayjobs.ray.io is not installed" in message


class Crds:
    """A Kube that lists CRDs by name from a dict, counting the lists."""

    def __init__(self, crds: dict[str, Any]) -> None:
        self.crds, self.lists = crds, 0

    def list_with_version(self, api_version: str, kind: str, namespace: str | None, **query: Any) -> Any:
        assert (api_version, kind, namespace) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition", None)
        self.lists += 1
        name = query["field_selector"].removeprefix("metadata.name=")
        return ([self.crds[name]] if self.crds.get(name) else []), "1"


def test_the_answer_is_kept_for_a_while_and_then_read_again() -> None:
    kube, now = Crds(dict(OLD)), [0.0]
    support = KubeRayAuthSupport(kube, ttl_seconds=60, clock=lambda: now[0])  # type: ignore[arg-type]
    assert support.missing() is not None and kube.lists == 3
    kube.crds = dict(CURRENT)  # KubeRay upgraded
    now[0] = 59.0
    assert support.missing() is not None and kube.lists == 3
    now[0] = 60.0
    assert support.missing() is None and kube.lists == 6


@pytest.mark.parametrize(
    ("placement", "auth", "problem"),
    [
        ({}, True, None),  # the release's own image: its Ray has it
        ({"image": "r/ray:1", "rayVersion": "2.52.0"}, True, None),
        ({"image": "r/ray:1", "rayVersion": "2.51.9"}, True,
         "spec.resources.rayVersion: Ray 2.51.9 has no token authentication (2.52.0 or later), which "
         "operator.kuberayAuthOptions (KUBETUNE_KUBERAY_AUTH_OPTIONS) turns on"),
        ({"image": "r/ray:1", "rayVersion": "2.9.3"}, True, "spec.resources.rayVersion: Ray 2.9.3 has no"),
        ({"image": "r/ray:1", "rayVersion": "2.9.3"}, False, None),
        ({"image": "r/ray:1", "rayVersion": "2.52.0-rc1"}, True, None),
        ({"image": "r/ray:1", "rayVersion": "2.51.0+cu121"}, True, "spec.resources.rayVersion: Ray 2.51.0+cu121"),
    ],
)  # fmt: skip
def test_a_ray_without_token_authentication_is_refused_while_it_is_on(
    placement: dict[str, Any], auth: bool, problem: str | None
) -> None:
    found = ray_version_problem(
        Placement.model_validate(placement), "spec.resources", Settings(kuberay_auth_options=auth)
    )
    assert found == problem if problem is None else (found or "").startswith(problem)
