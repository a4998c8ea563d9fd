"""What keeps each Ray cluster closed, against a real API server: its NetworkPolicy is asserted on every
pass (made again when deleted, restored when edited), and KubeRay's CRDs are read for authOptions."""

from __future__ import annotations

import time
from typing import Any

from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.kuberay import AUTH_OPTIONS_PATHS, KubeRayAuthSupport, missing_auth_support, schema_has
from kubetune.operator.settings import Settings

from .harness import EXAMPLE_RUNS, InProcessOperator, eventually
from .test_finetunejob_operator import JOB, create_job, wait_ray_job
from .test_modeldeployment_operator import DEPLOYMENT, create_deployment, finish_run, secrets, wait_serving

POLICY = ("networking.k8s.io/v1", "NetworkPolicy")
# Everyone may reach every port: what an edit would open the cluster with.
WIDE_OPEN: dict[str, Any] = {"spec": {"ingress": [{}], "podSelector": {}}}


def policy(kube: Kube, namespace: str, name: str) -> dict[str, Any] | None:
    return kube.get(*POLICY, namespace, name)


def touch(kube: Kube, ref: ObjectRef, value: str) -> None:
    """A change of a label: an event, so a pass, without a new generation."""
    kube.patch(ref, {"metadata": {"labels": {"test.kubetune.io/touched": value}}})


def is_closed(found: dict[str, Any] | None, namespace: str) -> bool:
    """The policy as the operator builds it: own pods, KubeRay from kuberay-system only."""
    if found is None:
        return False
    rules = found["spec"]["ingress"]
    kuberay = {"matchLabels": {"kubernetes.io/metadata.name": Settings().kuberay_namespace}}
    return len(rules) >= 2 and rules[1]["from"][0].get("namespaceSelector") == kuberay and found["spec"]["podSelector"]


def test_an_endpoints_policy_is_made_again_and_restored(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    secrets(kube, namespace)
    create_job(kube, namespace, name="tickets")
    finish_run(kube, namespace, 1, accuracy=0.8)
    create_deployment(kube, namespace)
    wait_serving(kube, namespace, f"{EXAMPLE_RUNS}/1/variants/int8")
    deployment = ObjectRef(*DEPLOYMENT, namespace, "support-tickets")
    first = eventually(lambda: policy(kube, namespace, "support-tickets"), what="the endpoint's NetworkPolicy")
    assert is_closed(first, namespace)

    kube.delete(ObjectRef(*POLICY, namespace, "support-tickets"))
    touch(kube, deployment, "1")
    again = eventually(lambda: policy(kube, namespace, "support-tickets"), what="the NetworkPolicy made again")
    assert again["spec"] == first["spec"] and again["metadata"]["uid"] != first["metadata"]["uid"]

    kube.patch(ObjectRef(*POLICY, namespace, "support-tickets"), WIDE_OPEN)
    touch(kube, deployment, "2")
    restored = eventually(
        lambda: (p := policy(kube, namespace, "support-tickets")) and p["spec"] == first["spec"] and p,
        what="the NetworkPolicy restored",
    )
    # A pass that finds it as it should be writes nothing (the pass runs within a second of the event).
    touch(kube, deployment, "3")
    time.sleep(3)
    after = policy(kube, namespace, "support-tickets")
    assert after is not None and after["metadata"]["resourceVersion"] == restored["metadata"]["resourceVersion"]


def test_an_active_runs_policy_is_made_again_and_restored(
    kube: Kube, namespace: str, operator: InProcessOperator
) -> None:
    create_job(kube, namespace, name="tickets")
    wait_ray_job(kube, namespace, "tickets-r1")
    job = ObjectRef(*JOB, namespace, "tickets")
    first = eventually(lambda: policy(kube, namespace, "tickets-r1"), what="the run's NetworkPolicy")
    assert is_closed(first, namespace)
    # The run is recorded as active before its policy is asserted again.
    eventually(lambda: ((kube.get(*JOB, namespace, "tickets") or {}).get("status") or {}).get("currentRun") == 1,
               what="run 1 in the status")  # fmt: skip

    kube.delete(ObjectRef(*POLICY, namespace, "tickets-r1"))
    touch(kube, job, "1")
    again = eventually(lambda: policy(kube, namespace, "tickets-r1"), what="the NetworkPolicy made again")
    assert again["spec"] == first["spec"]

    kube.patch(ObjectRef(*POLICY, namespace, "tickets-r1"), WIDE_OPEN)
    touch(kube, job, "2")
    eventually(
        lambda: (p := policy(kube, namespace, "tickets-r1")) and p["spec"] == first["spec"],
        what="the NetworkPolicy restored",
    )


def test_the_installed_kuberay_crds_have_auth_options(kube: Kube) -> None:
    """The test API server runs the pinned KubeRay's CRDs (1.5.1): they are read by name, and say yes."""
    assert KubeRayAuthSupport(kube).missing() is None


def test_crds_without_auth_options_are_named(kube: Kube) -> None:
    """KubeRay before 1.5.1: the same CRDs as installed, without the field."""
    crds = {name: KubeRayAuthSupport(kube)._crd(name) for name in AUTH_OPTIONS_PATHS}
    assert all(crd is not None and schema_has(crd, AUTH_OPTIONS_PATHS[name]) for name, crd in crds.items())
    old = crds["rayservices.ray.io"]
    assert old is not None
    for version in old["spec"]["versions"]:
        cluster = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["rayClusterConfig"]
        cluster["properties"].pop("authOptions", None)
    missing = missing_auth_support({**crds, "rayservices.ray.io": old})
    assert missing == "KubeRay's CRD rayservices.ray.io has no spec.rayClusterConfig.authOptions (KubeRay before 1.5.1)"
