"""The Helm chart: it lints and renders, its values schema rejects bad values by name, and the API server
accepts what it renders, with the RBAC that operator/permissions.py declares."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import Kube
from kubetune.operator.leader import Election
from kubetune.operator.permissions import PERMISSIONS, Scope, rules
from kubetune.operator.settings import Settings

from ..conftest import REPO_ROOT
from ..controlplane import CommandError, ControlPlane
from .harness import eventually

CHART = REPO_ROOT / "charts" / "kubetune"
RELEASE = "kt"
# Every option away from its default that changes what is rendered (the ServiceMonitor aside).
NON_DEFAULT = [
    "--set", "networkPolicy.enabled=true",
    "--set", "image.pullSecrets[0].name=registry-credentials",
    "--set", "operator.imagePullSecrets={ray-pull}",
    "--set", "operator.allowedImages={registry.example/kubetune/*}",
    "--set", "operator.allowedTolerations={dedicated:NoSchedule,spot.example.com/*}",
    "--set", "operator.allowedNodeSelectors={node-pool,topology.kubernetes.io/zone=eu-*}",
    "--set", "operator.allowedRemoteCodeModels={hf://my-org/*}",
    "--set", "operator.runtimeImage=registry.example/kubetune/runtime:1",
]  # fmt: skip


def render(plane: ControlPlane, namespace: str, *args: str) -> list[dict[str, Any]]:
    out = plane.helm("template", RELEASE, str(CHART), "--namespace", namespace, *args).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The documents of `kind`, leaving out the user roles (for people, not for the operator)."""
    return [doc for doc in docs if doc["kind"] == kind and not is_user_role(doc)]


def is_user_role(doc: dict[str, Any]) -> bool:
    return (doc["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == "user-roles"


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = by_kind(docs, "Deployment")
    [operator] = deployment["spec"]["template"]["spec"]["containers"]
    return dict(operator)


@pytest.fixture
def other_namespace(kube: Kube) -> Iterator[str]:
    name = f"chart-other-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


def test_the_chart_lints_with_default_and_non_default_values(control_plane: ControlPlane) -> None:
    assert "0 chart(s) failed" in control_plane.helm("lint", str(CHART)).stdout
    namespaced = ["--set", "watchNamespaces={team-a,team-b}", "--set", "serviceMonitor.enabled=true", *NON_DEFAULT]
    assert "0 chart(s) failed" in control_plane.helm("lint", str(CHART), *namespaced).stdout


def test_default_values_render_a_restricted_cluster_wide_operator(control_plane: ControlPlane) -> None:
    docs = render(control_plane, "ops")
    assert sorted(doc["kind"] for doc in docs) == [
        "ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding",
        "Service", "ServiceAccount",
    ]  # fmt: skip
    assert sorted(doc["metadata"]["name"] for doc in docs if is_user_role(doc)) == [
        "kt-kubetune-edit",
        "kt-kubetune-view",
    ]
    [role] = by_kind(docs, "ClusterRole")
    assert role["rules"] == rules(Scope.NAMESPACED) + rules(Scope.CLUSTER)
    assert [rule for rule in role["rules"] if "secrets" in rule["resources"]] == []
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "ops"}]
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    # With leader election (on by default), an old and a new replica may overlap: only the Lease's holder works.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    assert pod["serviceAccountName"] == "kt-kubetune"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    operator = container(docs)
    assert operator["command"] == ["kubetune", "operator"]
    assert operator["args"] == ["--liveness=http://0.0.0.0:8081/healthz"]
    assert operator["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"
    assert operator["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "tmp", "mountPath": "/tmp"} in operator["volumeMounts"]
    env = {item["name"]: item["value"] for item in operator["env"]}
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert env["KUBETUNE_KUBERAY_OPERATOR_LABELS"] == "app.kubernetes.io/name=kuberay-operator"
    assert env["KUBETUNE_KUBERAY_NAMESPACE"] == "kuberay-system"
    assert env["KUBETUNE_KUBERAY_AUTH_OPTIONS"] == "true"
    assert not {"KUBETUNE_RAY_METRICS_NAMESPACE", "KUBETUNE_RAY_METRICS_POD_LABELS"} & set(env)  # nobody scrapes
    assert "KUBETUNE_RUNTIME_IMAGE" not in env  # the release's own runtime image
    [service] = by_kind(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics"}]


def test_namespaced_mode_grants_a_role_per_namespace(control_plane: ControlPlane) -> None:
    args = ["--set", "watchNamespaces={team-a,team-b}", "--set", "serviceMonitor.enabled=true", *NON_DEFAULT]
    docs = render(control_plane, "ops", *args)
    roles = [role for role in by_kind(docs, "Role") if role["metadata"]["name"] == "kt-kubetune"]
    assert [role["metadata"]["namespace"] for role in roles] == ["team-a", "team-b"]
    assert all(role["rules"] == rules(Scope.NAMESPACED) for role in roles)
    bindings = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == "kt-kubetune"]
    assert [(b["metadata"]["namespace"], b["roleRef"]["kind"]) for b in bindings] == [
        ("team-a", "Role"), ("team-b", "Role"),
    ]  # fmt: skip
    # Only what is cluster-scoped stays cluster-wide, and it only reads: no write anywhere but the watched namespaces.
    [cluster_role] = by_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == rules(Scope.CLUSTER)
    assert {verb for rule in cluster_role["rules"] for verb in rule["verbs"]} <= {"get", "list", "watch"}
    assert [rule for role in [*roles, cluster_role] for rule in role["rules"] if "secrets" in rule["resources"]] == []
    operator = container(docs)
    assert operator["args"][:2] == ["--namespace=team-a", "--namespace=team-b"]
    env = {item["name"]: item["value"] for item in operator["env"]}
    assert env["KUBETUNE_IMAGE_PULL_SECRETS"] == "ray-pull"
    assert env["KUBETUNE_ALLOWED_IMAGES"] == "registry.example/kubetune/*"
    assert env["KUBETUNE_ALLOWED_TOLERATIONS"] == "dedicated:NoSchedule,spot.example.com/*"
    assert env["KUBETUNE_ALLOWED_NODE_SELECTORS"] == "node-pool,topology.kubernetes.io/zone=eu-*"
    assert env["KUBETUNE_ALLOWED_REMOTE_CODE_MODELS"] == "hf://my-org/*"
    assert env["KUBETUNE_RUNTIME_IMAGE"] == "registry.example/kubetune/runtime:1"
    [deployment] = by_kind(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-credentials"}]
    [monitor] = by_kind(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    [policy] = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}]


def test_leader_election_lets_replicas_run_side_by_side(control_plane: ControlPlane) -> None:
    for args in ([], ["--set", "watchNamespaces={team-a,team-b}"]):
        docs = render(control_plane, "ops", "--set", "replicaCount=2", *args)
        [deployment] = by_kind(docs, "Deployment")
        assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
        env = {item["name"]: item["value"] for item in container(docs)["env"]}
        settings = Settings.from_environment(env)
        assert Election.of(settings, identity="pod") == Election("kt-kubetune", "ops", "pod", 10, 6, 1)
        # The Lease is granted in the release's namespace only, whichever namespaces are watched.
        [role] = [role for role in by_kind(docs, "Role") if role["metadata"]["name"] == "kt-kubetune-leader-election"]
        assert role["metadata"]["namespace"] == "ops" and role["rules"] == rules(Scope.OPERATOR_NAMESPACE)
        [binding] = [b for b in by_kind(docs, "RoleBinding") if b["roleRef"]["name"] == "kt-kubetune-leader-election"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kt-kubetune", "namespace": "ops"}]
    timing = ["--set", "leaderElection.leaseDurationSeconds=30", "--set", "leaderElection.renewDeadlineSeconds=20",
              "--set", "leaderElection.retryPeriodSeconds=4"]  # fmt: skip
    env = {item["name"]: item["value"] for item in container(render(control_plane, "ops", *timing))["env"]}
    assert Election.of(Settings.from_environment(env), identity="pod") == Election(
        "kt-kubetune", "ops", "pod", 30, 20, 4
    )
    # Without it, one replica that works alone, and neither the Lease nor its Role.
    docs = render(control_plane, "ops", "--set", "leaderElection.enabled=false")
    [deployment] = by_kind(docs, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert by_kind(docs, "Role") == [] and by_kind(docs, "RoleBinding") == []
    env = {item["name"]: item["value"] for item in container(docs)["env"]}
    assert Settings.from_environment(env).leader_election is False
    assert not any(name.startswith("KUBETUNE_LEASE") for name in env)


def test_a_service_monitor_needs_metrics(control_plane: ControlPlane) -> None:
    with pytest.raises(CommandError, match=r"serviceMonitor\.enabled needs metrics\.enabled"):
        render(control_plane, "ops", "--set", "serviceMonitor.enabled=true", "--set", "metrics.enabled=false")


def test_metrics_can_be_turned_off(control_plane: ControlPlane) -> None:
    docs = render(control_plane, "ops", "--set", "metrics.enabled=false")
    assert by_kind(docs, "Service") == []
    env = {item["name"]: item["value"] for item in container(docs)["env"]}
    assert env["KUBETUNE_METRICS_PORT"] == "0"


def test_the_ray_clusters_peers_reach_the_operators_settings(control_plane: ControlPlane) -> None:
    """The chart's KubeRay namespace and metrics scraper are what the operator reads from its environment."""
    args = ["--set", "operator.kuberayNamespace=ray-operators", "--set", "operator.kuberayAuthOptions=false",
            "--set", "operator.rayMetricsScraper.namespace=monitoring",
            "--set", "operator.rayMetricsScraper.podLabels.app=prometheus"]  # fmt: skip
    env = {item["name"]: item["value"] for item in container(render(control_plane, "ops", *args))["env"]}
    settings = Settings.from_environment(env)
    assert settings.kuberay_namespace == "ray-operators" and settings.kuberay_auth_options is False
    assert settings.ray_metrics_namespace == "monitoring" and settings.ray_metrics_pod_selector == {"app": "prometheus"}


# (schema rule as its path in values.schema.json, values that break it, where helm says it failed, and how)
BAD_VALUES: list[tuple[str, list[str], str, str]] = [
    ("", ["foo=1"], "", "additional properties 'foo' not allowed"),
    ("/image", ["image.name=x"], "/image", "additional properties 'name' not allowed"),
    ("/image/repository", ["image.repository=a b"], "/image/repository", "does not match pattern"),
    ("/image/tag", ["image.tag=bad tag"], "/image/tag", "does not match pattern"),
    ("/image/pullPolicy", ["image.pullPolicy=Sometimes"], "/image/pullPolicy", "value must be one of"),
    ("/image/pullSecrets", ["image.pullSecrets=x"], "/image/pullSecrets", "want array"),
    ("/image/pullSecrets/*", ["image.pullSecrets[0].nam=x"], "/image/pullSecrets/0", "missing property 'name'"),
    ("/image/pullSecrets/*/name", ["image.pullSecrets[0].name=Bad_Name"], "/image/pullSecrets/0/name", "pattern"),
    ("/replicaCount", ["replicaCount=2", "leaderElection.enabled=false"], "/replicaCount", "maximum: got 2, want 1"),
    ("/leaderElection", ["leaderElection.name=x"], "/leaderElection", "additional properties 'name'"),
    ("/leaderElection/enabled", ["leaderElection.enabled=yes"], "/leaderElection/enabled", "want boolean"),
    ("/leaderElection/leaseDurationSeconds", ["leaderElection.leaseDurationSeconds=4"],
     "/leaderElection/leaseDurationSeconds", "minimum: got 4, want 5"),
    ("/leaderElection/renewDeadlineSeconds", ["leaderElection.renewDeadlineSeconds=1"],
     "/leaderElection/renewDeadlineSeconds", "minimum: got 1, want 2"),
    ("/leaderElection/retryPeriodSeconds", ["leaderElection.retryPeriodSeconds=0"],
     "/leaderElection/retryPeriodSeconds", "minimum: got 0, want 1"),
    ("/nameOverride", ["nameOverride=1"], "/nameOverride", "want string"),
    ("/fullnameOverride", ["fullnameOverride=1"], "/fullnameOverride", "want string"),
    ("/watchNamespaces", ["watchNamespaces={a,a}"], "/watchNamespaces", "items at 0 and 1 are equal"),
    ("/watchNamespaces/*", ["watchNamespaces={Bad_NS}"], "/watchNamespaces/0", "does not match pattern"),
    ("/serviceAccount", ["serviceAccount.create=false"], "/serviceAccount", "additional properties 'create'"),
    ("/serviceAccount/annotations", ["serviceAccount.annotations=x"], "/serviceAccount/annotations", "want object"),
    ("/serviceAccount/annotations/{}", ["serviceAccount.annotations.a=1"], "/serviceAccount/annotations/a",
     "want string"),
    ("/resources", ["resources=big"], "/resources", "want object"),
    ("/nodeSelector", ["nodeSelector=gpu"], "/nodeSelector", "want object"),
    ("/nodeSelector/{}", ["nodeSelector.gpu=true"], "/nodeSelector/gpu", "want string"),
    ("/tolerations", ["tolerations=x"], "/tolerations", "want array"),
    ("/tolerations/*", ["tolerations={x}"], "/tolerations/0", "want object"),
    ("/affinity", ["affinity=x"], "/affinity", "want object"),
    ("/priorityClassName", ["priorityClassName=1"], "/priorityClassName", "want string"),
    ("/podAnnotations", ["podAnnotations=x"], "/podAnnotations", "want object"),
    ("/podAnnotations/{}", ["podAnnotations.a=1"], "/podAnnotations/a", "want string"),
    ("/operator", ["operator.rayVersion=2"], "/operator", "additional properties 'rayVersion'"),
    ("/operator/runtimeImage", ["operator.runtimeImage=a b"], "/operator/runtimeImage", "does not match pattern"),
    ("/operator/imagePullSecrets", ["operator.imagePullSecrets=x"], "/operator/imagePullSecrets", "want array"),
    ("/operator/imagePullSecrets/*", ["operator.imagePullSecrets={A_B}"], "/operator/imagePullSecrets/0", "pattern"),
    ("/operator/allowedImages", ["operator.allowedImages=x"], "/operator/allowedImages", "want array"),
    ("/operator/allowedImages/*", ["operator.allowedImages[0]=a b"], "/operator/allowedImages/0", "pattern"),
    ("/operator/allowedTolerations", ["operator.allowedTolerations=x"], "/operator/allowedTolerations", "want array"),
    ("/operator/allowedNodeSelectors", ["operator.allowedNodeSelectors=x"], "/operator/allowedNodeSelectors",
     "want array"),
    ("/operator/allowedRemoteCodeModels", ["operator.allowedRemoteCodeModels=x"], "/operator/allowedRemoteCodeModels",
     "want array"),
    ("/operator/allowedRemoteCodeModels/*", ["operator.allowedRemoteCodeModels[0]=a b"],
     "/operator/allowedRemoteCodeModels/0", "pattern"),
    ("/operator/allowedTolerations/*", ["operator.allowedTolerations[0]=gpu:Never"], "/operator/allowedTolerations/0",
     "pattern"),
    ("/operator/allowedNodeSelectors/*", ["operator.allowedNodeSelectors[0]=a=b=c"],
     "/operator/allowedNodeSelectors/0", "pattern"),
    ("/operator/allowedPriorityClasses", ["operator.allowedPriorityClasses=x"], "/operator/allowedPriorityClasses",
     "want array"),
    ("/operator/allowedPriorityClasses/*", ["operator.allowedPriorityClasses={A_B}"],
     "/operator/allowedPriorityClasses/0", "pattern"),
    ("/operator/kuberayAuthOptions", ["operator.kuberayAuthOptions=yes"], "/operator/kuberayAuthOptions",
     "want boolean"),
    ("/operator/kuberayOperatorLabels", ["operator.kuberayOperatorLabels=x"], "/operator/kuberayOperatorLabels",
     "want object"),
    ("/operator/kuberayOperatorLabels/{}", ["operator.kuberayOperatorLabels.app=a=b"],
     "/operator/kuberayOperatorLabels/app", "does not match pattern"),
    ("/operator/kuberayNamespace", ["operator.kuberayNamespace=Ray_System"], "/operator/kuberayNamespace",
     "does not match pattern"),
    ("/operator/rayMetricsScraper", ["operator.rayMetricsScraper.ports=x"], "/operator/rayMetricsScraper",
     "additional properties 'ports'"),
    ("/operator/rayMetricsScraper/namespace", ["operator.rayMetricsScraper.namespace=Mon"],
     "/operator/rayMetricsScraper/namespace", "does not match pattern"),
    ("/operator/rayMetricsScraper/podLabels", ["operator.rayMetricsScraper.podLabels=x"],
     "/operator/rayMetricsScraper/podLabels", "want object"),
    ("/operator/rayMetricsScraper/podLabels/{}", ["operator.rayMetricsScraper.podLabels.app=a=b"],
     "/operator/rayMetricsScraper/podLabels/app", "does not match pattern"),
    ("/operator/defaultActiveDeadlineSeconds", ["operator.defaultActiveDeadlineSeconds=0"],
     "/operator/defaultActiveDeadlineSeconds", "minimum: got 0, want 1"),
    ("/operator/finishedClusterTtlSeconds", ["operator.finishedClusterTtlSeconds=-1"],
     "/operator/finishedClusterTtlSeconds", "minimum: got -1, want 0"),
    ("/operator/workers", ["operator.workers=0"], "/operator/workers", "minimum: got 0, want 1"),
    ("/metrics", ["metrics.path=/m"], "/metrics", "additional properties 'path'"),
    ("/metrics/enabled", ["metrics.enabled=yes"], "/metrics/enabled", "want boolean"),
    ("/metrics/port", ["metrics.port=70000"], "/metrics/port", "maximum"),
    ("/metrics/service", ["metrics.service.name=x"], "/metrics/service", "additional properties 'name'"),
    ("/metrics/service/type", ["metrics.service.type=External"], "/metrics/service/type", "value must be one of"),
    ("/metrics/service/port", ["metrics.service.port=0"], "/metrics/service/port", "minimum"),
    ("/serviceMonitor", ["serviceMonitor.path=/m"], "/serviceMonitor", "additional properties 'path'"),
    ("/serviceMonitor/enabled", ["serviceMonitor.enabled=yes"], "/serviceMonitor/enabled", "want boolean"),
    ("/serviceMonitor/interval", ["serviceMonitor.interval=soon"], "/serviceMonitor/interval", "pattern"),
    ("/serviceMonitor/labels", ["serviceMonitor.labels=x"], "/serviceMonitor/labels", "want object"),
    ("/serviceMonitor/labels/{}", ["serviceMonitor.labels.release=1"], "/serviceMonitor/labels/release", "want string"),
    ("/health", ["health.path=/h"], "/health", "additional properties 'path'"),
    ("/health/port", ["health.port=0"], "/health/port", "minimum"),
    ("/networkPolicy", ["networkPolicy.egress=x"], "/networkPolicy", "additional properties 'egress'"),
    ("/networkPolicy/enabled", ["networkPolicy.enabled=yes"], "/networkPolicy/enabled", "want boolean"),
    ("/networkPolicy/metricsFrom", ["networkPolicy.metricsFrom=x"], "/networkPolicy/metricsFrom", "want array"),
    ("/networkPolicy/metricsFrom/*", ["networkPolicy.metricsFrom={x}"], "/networkPolicy/metricsFrom/0", "want object"),
    ("/podSecurityContext", ["podSecurityContext=x"], "/podSecurityContext", "want object"),
    ("/podSecurityContext/runAsNonRoot", ["podSecurityContext.runAsNonRoot=false"],
     "/podSecurityContext/runAsNonRoot", "value must be true"),
    ("/securityContext", ["securityContext=x"], "/securityContext", "want object"),
    ("/securityContext/allowPrivilegeEscalation", ["securityContext.allowPrivilegeEscalation=true"],
     "/securityContext/allowPrivilegeEscalation", "value must be false"),
    ("/securityContext/privileged", ["securityContext.privileged=true"], "/securityContext/privileged",
     "value must be false"),
]  # fmt: skip


def schema_rules() -> set[str]:
    """The path of every schema node that constrains a value (`*`: any item, `{}`: any map value)."""
    schema = json.loads((CHART / "values.schema.json").read_text())

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        ref = node.get("$ref")
        return resolve(schema["definitions"][ref.rsplit("/", 1)[1]]) if ref else node

    def walk(node: dict[str, Any], path: str) -> Iterator[str]:
        node = resolve(node)
        yield path
        for name, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}/{name}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}/*")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}/{{}}")

    return set(walk(schema, ""))


def test_every_schema_rule_has_a_bad_value_test() -> None:
    assert {rule for rule, *_ in BAD_VALUES} == schema_rules()


@pytest.mark.parametrize(("rule", "sets", "where", "why"), BAD_VALUES, ids=[case[0] or "/" for case in BAD_VALUES])
def test_the_schema_rejects_a_bad_value_by_name(
    control_plane: ControlPlane, rule: str, sets: list[str], where: str, why: str
) -> None:
    args = [item for value in sets for item in ("--set", value)]
    with pytest.raises(CommandError) as failure:
        control_plane.helm("template", RELEASE, str(CHART), *args)
    message = str(failure.value)
    assert f"at '{where}'" in message and why in message, message


def can_i(
    plane: ControlPlane, user: str, verb: str, resource: str, namespace: str | None, subresource: str = ""
) -> bool:
    where = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    if subresource:
        where.append(f"--subresource={subresource}")
    try:
        plane.kubectl("auth", "can-i", verb, resource, f"--as={user}", *where)
    except CommandError as error:
        if "no" in str(error).split():
            return False
        raise
    return True


@contextmanager
def applied(plane: ControlPlane, docs: list[dict[str, Any]]) -> Iterator[None]:
    manifest = yaml.safe_dump_all(docs)
    plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        yield
    finally:
        plane.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", "-", input=manifest)


def test_the_api_server_accepts_the_cluster_wide_chart(control_plane: ControlPlane, namespace: str) -> None:
    docs = render(control_plane, namespace)
    with applied(control_plane, docs):
        user = f"system:serviceaccount:{namespace}:{RELEASE}-kubetune"
        for permission in PERMISSIONS:
            resource, _, subresource = permission.resource.partition("/")
            qualified = f"{resource}.{permission.api_group}".rstrip(".")
            # The operator's own objects (its Lease) in its namespace only; the rest everywhere.
            where = namespace if permission.scope == Scope.OPERATOR_NAMESPACE else None
            for verb in permission.verbs:
                assert can_i(control_plane, user, verb, qualified, where, subresource), (verb, permission.resource)
        assert not can_i(control_plane, user, "update", "leases.coordination.k8s.io", None)
        for verb in ("get", "list", "watch"):
            assert not can_i(control_plane, user, verb, "secrets", None), verb
        assert not can_i(control_plane, user, "update", "rayjobs.ray.io", namespace)
        assert not can_i(control_plane, user, "update", "configmaps", None)


def test_the_api_server_accepts_the_namespaced_chart(
    control_plane: ControlPlane, namespace: str, other_namespace: str
) -> None:
    args = ["--set", f"watchNamespaces={{{namespace},{other_namespace}}}", *NON_DEFAULT]
    docs = render(control_plane, namespace, *args)
    with applied(control_plane, docs):
        user = f"system:serviceaccount:{namespace}:{RELEASE}-kubetune"
        for watched in (namespace, other_namespace):
            assert can_i(control_plane, user, "create", "rayjobs.ray.io", watched)
            assert can_i(control_plane, user, "patch", "configmaps", watched)  # what each run's Role grants
            assert not can_i(control_plane, user, "list", "secrets", watched)
            assert not can_i(control_plane, user, "get", "secrets", watched)
        assert not can_i(control_plane, user, "list", "rayjobs.ray.io", "default")
        assert can_i(control_plane, user, "watch", "customresourcedefinitions.apiextensions.k8s.io", None)
        # Nothing is written outside the watched namespaces, on any kind.
        for verb, resource in (
            ("patch", "configmaps"),
            ("create", "rayjobs.ray.io"),
            ("create", "roles.rbac.authorization.k8s.io"),
            ("update", "leases.coordination.k8s.io"),
            ("create", "serviceaccounts"),
        ):
            assert not can_i(control_plane, user, verb, resource, "default"), (verb, resource)
            assert not can_i(control_plane, user, verb, resource, None), (verb, resource)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def healthy(port: int, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the operator exited {proc.returncode}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return int(response.status) == 200
    except OSError:
        return False


def test_the_charts_command_starts_the_operator_with_a_health_endpoint(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    health, metrics = free_port(), free_port()
    args = ["--set", f"watchNamespaces={{{namespace}}}", "--set", f"health.port={health}"]
    operator = container(render(control_plane, namespace, *args, "--set", f"metrics.port={metrics}"))
    # The chart's command and arguments, as the container would run them (kubetune from this environment).
    executable = shutil.which(operator["command"][0], path=str(Path(sys.executable).parent))
    assert executable is not None
    env = {
        **os.environ,
        **{item["name"]: item["value"] for item in operator["env"]},
        "KUBECONFIG": str(control_plane.kubeconfig),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    with open(tmp_path / "operator.log", "wb") as log:
        proc = subprocess.Popen(
            [executable, *operator["command"][1:], *operator["args"]],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        eventually(lambda: healthy(health, proc), timeout=60, interval=0.2, what="the operator's /healthz")
    except AssertionError:
        print((tmp_path / "operator.log").read_text(errors="replace")[-4000:])
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_the_notes_name_the_kuberay_prerequisite(control_plane: ControlPlane) -> None:
    args = ["--dry-run=client", "--namespace", "ops", "--set", "watchNamespaces={team-a,team-b}"]
    notes = control_plane.helm("install", RELEASE, str(CHART), *args).stdout.split("NOTES:", 1)[1]
    assert "KubeRay v1.5.1" in notes and "team-a, team-b" in notes
    assert "--namespace kuberay-system" in notes and "enforces NetworkPolicy" in notes
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert "KubeRay v1.5.1" in chart["description"] and "v1.5.1" in chart["annotations"]["kubetune.io/requires"]
