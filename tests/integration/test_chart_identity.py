"""The operator as the chart's ServiceAccount: with only the RBAC the chart renders, it runs a FineTuneJob and the
ModelDeployment that follows it to the end, it is denied what it must never do, and the chart's user roles fold
into Kubernetes' view and edit roles."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import Kube
from kubetune.operator.permissions import PERMISSIONS, Scope, verbs_by_resource
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport

from ..conftest import REPO_ROOT
from ..controlplane import ControlPlane, kuberay_crds
from .conftest import KUBETUNE_CRDS
from .harness import EXAMPLE_RUNS, CapturedLogs, InProcessOperator, MovableClock, eventually, set_ray_job_status
from .test_finetunejob_operator import SUCCEEDED, create_job, wait_event, wait_phase, wait_ray_job, write_report
from .test_modeldeployment_operator import create_deployment, phase, play_kuberay, ray_service, secrets

CHART = REPO_ROOT / "charts" / "kubetune"
# What the chart's RBAC is made of (the Deployment, Service and the rest play no part here).
IDENTITY_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
Manifest = dict[str, Any]
RBAC, NETWORKING, RAY, COORDINATION = "rbac.authorization.k8s.io", "networking.k8s.io", "ray.io", "coordination.k8s.io"
# Declared in operator/permissions.py but not called in the flow these tests run (`run_the_flow`), and why.
UNUSED_IN_THE_FLOW: dict[str, set[tuple[str, str, str]]] = {
    "a run's objects are deleted only when it is stopped or the history forgets it": {
        (RAY, "rayjobs", "delete"), ("", "configmaps", "delete"), ("", "serviceaccounts", "delete"),
        (RBAC, "roles", "delete"), (RBAC, "rolebindings", "delete"), (NETWORKING, "networkpolicies", "delete"),
    },
    "read only when a create finds the name taken, or when the object is not cached yet": {
        (RAY, "rayjobs", "get"), (RAY, "rayservices", "get"), ("", "configmaps", "get"),
        ("", "serviceaccounts", "get"), (RBAC, "roles", "get"), (RBAC, "rolebindings", "get"),
    },
    "a Ray cluster's NetworkPolicy is patched only when it was changed, or the settings were": {
        (NETWORKING, "networkpolicies", "patch"),
    },
    "held only so that each run's Role may grant it (RBAC's escalation check)": {("", "configmaps", "patch")},
    "a RayService is patched only to roll out a newer promoted run": {(RAY, "rayservices", "patch")},
    "a GPU run's plan Job (the flow's run trains on CPU: it is started without a plan)": {
        ("batch", "jobs", verb) for verb in ("get", "create", "delete")
    },
    "the Lease of the leader election (the operator here runs alone, without it)": {
        (COORDINATION, "leases", verb) for verb in ("get", "create", "update")
    },
}  # fmt: skip


@dataclass(frozen=True)
class Identity:
    """The chart's ServiceAccount, installed, and a kubeconfig that authenticates as it."""

    namespace: str
    name: str
    kubeconfig: Path

    @property
    def user(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"

    @property
    def groups(self) -> list[str]:
        return ["system:serviceaccounts", f"system:serviceaccounts:{self.namespace}", "system:authenticated"]


def token_kubeconfig(control_plane: ControlPlane, token: str, path: Path) -> Path:
    """The control plane's kubeconfig (server, CA) with a bearer token for its only user."""
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": cluster["name"], "user": "operator"}}],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def install_identity(
    control_plane: ControlPlane, kube: Kube, workdir: Path, *values: str
) -> tuple[Identity, list[Manifest], list[Manifest]]:
    """Render the chart (default values, unless `values` are `--set` arguments) into a fresh namespace and apply
    its RBAC (and the user roles)."""
    suffix = uuid.uuid4().hex[:6]
    namespace, release = f"kubetune-ops-{suffix}", f"id-{suffix}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    out = control_plane.helm("template", release, str(CHART), "--namespace", namespace, *values).stdout
    docs = [doc for doc in yaml.safe_load_all(out) if doc and doc["kind"] in IDENTITY_KINDS]
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    [account] = [doc for doc in docs if doc["kind"] == "ServiceAccount"]
    name = account["metadata"]["name"]
    answer = kube.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
        body={"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}},
    )
    kubeconfig = token_kubeconfig(control_plane, str(answer["status"]["token"]), workdir / f"{release}.kubeconfig")
    user_roles = [doc for doc in docs if doc["metadata"]["labels"].get("app.kubernetes.io/component") == "user-roles"]
    return Identity(namespace, name, kubeconfig), docs, user_roles


@pytest.fixture(scope="module")
def installed(
    control_plane: ControlPlane, kube: Kube, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Identity, list[Manifest]]]:
    identity, docs, user_roles = install_identity(control_plane, kube, tmp_path_factory.mktemp("identity"))
    yield identity, user_roles
    control_plane.kubectl("delete", "--ignore-not-found", "-f", "-", input=yaml.safe_dump_all(docs))
    kube.request("DELETE", f"/api/v1/namespaces/{identity.namespace}")


@pytest.fixture(scope="module")
def identity(installed: tuple[Identity, list[Manifest]]) -> Identity:
    return installed[0]


def allowed(
    kube: Kube,
    user: str,
    groups: list[str],
    verb: str,
    resource: str,
    group: str = "",
    namespace: str = "",
    subresource: str = "",
) -> bool:
    """What the API server's authorizer answers (SubjectAccessReview); namespace "" asks cluster-wide."""
    attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource}
    review = kube.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        body={
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": {**attributes, "namespace": namespace}},
        },
    )
    return bool(review["status"].get("allowed"))


def run_the_flow(kube: Kube, namespace: str) -> None:
    """A FineTuneJob from creation to a promoted run, then a ModelDeployment of it to Ready (tests play KubeRay)."""
    secrets(kube, namespace)  # the deployment's token and storage Secrets, for its pods: the operator never looks
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    for api_version, kind, name in [
        ("v1", "ConfigMap", "tickets-r1-config"),
        ("v1", "ConfigMap", "tickets-r1-report"),
        ("v1", "ServiceAccount", "tickets-r1-runner"),
        ("rbac.authorization.k8s.io/v1", "Role", "tickets-r1-runner"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", "tickets-r1-runner"),
        ("networking.k8s.io/v1", "NetworkPolicy", "tickets-r1"),
    ]:
        assert kube.get(api_version, kind, namespace, name) is not None, f"{kind} {name}"
    wait_phase(kube, namespace, "Pending", run=1)
    report = RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": 0.5},
        metrics_after={"accuracy": 0.8},
        variants={"int8": VariantReport(uri=f"{EXAMPLE_RUNS}/1/int8", metrics={"accuracy": 0.8})},
        best_variant="int8",
    )
    write_report(kube, namespace, "tickets-r1-report", report)
    set_ray_job_status(kube, namespace, "tickets-r1", **SUCCEEDED)
    assert wait_phase(kube, namespace, "Succeeded", run=1)["promotedRun"] == 1
    wait_event(kube, namespace, "RunSucceeded")

    created = create_deployment(kube, namespace)
    service = ray_service(kube, namespace)
    assert service["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    policies = eventually(
        lambda: [
            item
            for item in kube.list("networking.k8s.io/v1", "NetworkPolicy", namespace, {})
            if any(owner["kind"] == "ModelDeployment" for owner in item["metadata"].get("ownerReferences", []))
        ],
        what="the endpoint's NetworkPolicy",
    )
    assert len(policies) == 1
    phase(kube, namespace, "Deploying")
    play_kuberay(kube, namespace, "RUNNING")
    phase(kube, namespace, "Ready")


def test_the_chart_service_account_runs_a_job_and_its_deployment(
    kube: Kube, namespace: str, identity: Identity, running_operator: InProcessOperator, clock: MovableClock
) -> None:
    # This test owns the cluster: the shared operator (an admin) pauses meanwhile.
    running_operator.stop()
    clock.reset()
    operator = InProcessOperator(identity.kubeconfig, clock)
    try:
        with CapturedLogs({"kopf": logging.INFO, "kubetune": logging.INFO}) as logs:
            operator.start()
            try:
                run_the_flow(kube, namespace)
            finally:
                operator.stop()
        denied = [line for line in logs.lines() if "forbidden" in line.lower() or " 403" in line]
        assert denied == [], "\n".join(denied)
    finally:
        running_operator.start()


# What the operator must never be able to do, wherever it runs: (verb, API group, resource, subresource,
# cluster-wide). Namespaced checks ask in a namespace of a user's.
DENIED: list[tuple[str, str, str, str, bool]] = [
    ("get", "", "secrets", "", False),
    ("get", "", "secrets", "", True),
    ("list", "", "secrets", "", False),
    ("list", "", "secrets", "", True),
    ("watch", "", "secrets", "", True),
    ("update", "", "configmaps", "", True),
    ("create", "", "pods", "", False),
    ("create", "", "pods", "exec", False),
    ("create", "rbac.authorization.k8s.io", "clusterroles", "", True),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", "", True),
    ("escalate", "rbac.authorization.k8s.io", "roles", "", False),
    ("bind", "rbac.authorization.k8s.io", "roles", "", False),
    ("escalate", "rbac.authorization.k8s.io", "clusterroles", "", True),
    ("bind", "rbac.authorization.k8s.io", "clusterroles", "", True),
    ("delete", "", "namespaces", "", True),
    ("patch", "kubetune.io", "finetunejobs", "", False),
    ("update", "kubetune.io", "finetunejobs", "", False),
    ("update", "apps", "deployments", "", False),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", "", True),
    # Another controller's leader election, in a namespace the operator works in or anywhere.
    ("update", "coordination.k8s.io", "leases", "", False),
    ("update", "coordination.k8s.io", "leases", "", True),
]  # fmt: skip


def denied_id(verb: str, resource: str, subresource: str, cluster_wide: bool) -> str:
    return f"{verb}-{resource}{'/' + subresource if subresource else ''}{'-cluster' if cluster_wide else ''}"


@pytest.mark.parametrize(
    ("verb", "group", "resource", "subresource", "cluster_wide"),
    DENIED,
    ids=[denied_id(verb, resource, sub, wide) for verb, _, resource, sub, wide in DENIED],
)
def test_the_operator_is_denied(
    kube: Kube, identity: Identity, verb: str, group: str, resource: str, subresource: str, cluster_wide: bool
) -> None:
    where = "" if cluster_wide else "team-a"
    assert not allowed(kube, identity.user, identity.groups, verb, resource, group, where, subresource)


def test_what_the_operator_is_granted_is_allowed(kube: Kube, identity: Identity) -> None:
    # The other side of the deny list: the reviews do see the chart's grants (its own objects in its namespace).
    for permission in PERMISSIONS:
        name, _, subresource = permission.resource.partition("/")
        where = identity.namespace if permission.scope == Scope.OPERATOR_NAMESPACE else "team-a"
        for verb in permission.verbs:
            assert allowed(
                kube, identity.user, identity.groups, verb, name, permission.api_group, where, subresource
            ), f"{verb} {permission.api_group}/{permission.resource}"


def bind(kube: Kube, namespace: str, user: str, cluster_role: str) -> None:
    kube.create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{user}-{cluster_role}", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
        }
    )


def test_the_user_roles_extend_view_and_edit(
    control_plane: ControlPlane, kube: Kube, namespace: str, identity: Identity
) -> None:
    if not control_plane.role_aggregation:
        pytest.skip("no ClusterRole aggregation controller runs")
    bind(kube, namespace, "editor", "edit")
    bind(kube, namespace, "viewer", "view")
    groups = ["system:authenticated"]

    def can(user: str, verb: str, resource: str = "finetunejobs", subresource: str = "") -> bool:
        return allowed(kube, user, groups, verb, resource, "kubetune.io", namespace, subresource)

    eventually(lambda: can("editor", "create"), timeout=30, what="edit to aggregate the chart's edit role")
    eventually(lambda: can("viewer", "list"), timeout=30, what="view to aggregate the chart's view role")
    for resource in ("finetunejobs", "modeldeployments"):
        for verb in ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"):
            assert can("editor", verb, resource), f"edit: {verb} {resource}"
            assert can("viewer", verb, resource) == (verb in ("get", "list", "watch")), f"view: {verb} {resource}"
        # Status is the operator's to write.
        assert can("editor", "get", resource, "status") and not can("editor", "patch", resource, "status")
    # Neither role reaches beyond its namespace.
    assert not allowed(kube, "editor", groups, "create", "finetunejobs", "kubetune.io", "team-a")


def test_the_chart_renders_its_user_roles(installed: tuple[Identity, list[Manifest]]) -> None:
    roles = {role["metadata"]["name"].rsplit("-", 1)[-1]: role for role in installed[1]}
    assert sorted(roles) == ["edit", "view"]
    assert roles["view"]["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    edit_labels = roles["edit"]["metadata"]["labels"]
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit_labels
    view_verbs = {verb for rule in roles["view"]["rules"] for verb in rule["verbs"]}
    assert view_verbs == {"get", "list", "watch"}


# (namespace, API group, resource[/subresource], verb) of a request; namespace "" for a cluster-scoped object or a
# request across all namespaces.
Call = tuple[str, str, str, str]


def audited(audit_log: Path, user: str) -> list[tuple[Call, int]]:
    """Every request `user` made, and the API server's answer (status code), from kube-apiserver's audit log."""
    calls = set()
    for line in audit_log.read_text().splitlines():
        event = json.loads(line)
        ref = event.get("objectRef")
        if event["user"]["username"] != user or not ref or not ref.get("resource"):
            continue  # another client, or discovery (no resource)
        resource = f"{ref['resource']}/{ref['subresource']}" if ref.get("subresource") else ref["resource"]
        call = (ref.get("namespace", ""), ref.get("apiGroup", ""), resource, event["verb"])
        calls.add((call, int((event.get("responseStatus") or {}).get("code", 0))))
    return sorted(calls)


def rendered_grants(docs: list[Manifest]) -> set[Call]:
    """What the rendered chart grants its operator: a ClusterRole's rules in every namespace ("*"), a Role's in its own.

    (The chart's roles for people are left out: nothing binds them to the operator.)
    """
    bound = {doc["roleRef"]["name"] for doc in docs if doc["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    grants = set()
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role") or doc["metadata"]["name"] not in bound:
            continue
        where = doc["metadata"].get("namespace", "*") if doc["kind"] == "Role" else "*"
        for rule in doc["rules"]:
            assert "resourceNames" not in rule, rule  # (the checks below read rules by resource)
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants |= {(where, group, resource, verb) for verb in rule["verbs"]}
    return grants


# Asked and refused, on purpose: with named namespaces kopf also tries to follow the cluster's namespaces, and
# goes on with the names given when it may not (permissions.py does not declare `namespaces`).
REFUSED_BY_DESIGN = {("", "", "namespaces", "list"), ("", "", "namespaces", "watch")}


def outside(calls: list[tuple[Call, int]], grants: set[Call]) -> list[tuple[Call, int]]:
    """The calls the grants do not cover (a list across all namespaces needs a cluster-wide grant)."""
    return sorted(
        (call, code)
        for call, code in calls
        if call not in REFUSED_BY_DESIGN and ("*", *call[1:]) not in grants and (call[0] == "" or call not in grants)
    )


def audit_the_flow(
    plane: ControlPlane, kube: Kube, clock: MovableClock, workdir: Path, *, watched: bool
) -> tuple[list[tuple[Call, int]], set[Call], str]:
    """The chart's operator (all namespaces, or with `watchNamespaces` naming the one it works in) runs the flow:
    its requests as the audit log has them, what the rendered chart grants it, and the namespace of the flow."""
    namespace = f"audited-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    values = ["--set", f"watchNamespaces={{{namespace}}}"] if watched else []
    identity, docs, _ = install_identity(plane, kube, workdir, *values)
    clock.reset()
    operator = InProcessOperator(identity.kubeconfig, clock, namespaces=[namespace] if watched else None)
    operator.start()
    try:
        run_the_flow(kube, namespace)
    finally:
        operator.stop()
    return audited(plane.audit_log, identity.user), rendered_grants(docs), namespace


def test_the_operator_uses_what_it_is_granted(
    control_plane: ControlPlane, running_operator: InProcessOperator, clock: MovableClock, tmp_path: Path
) -> None:
    if control_plane.external:
        pytest.skip("an existing cluster's audit log is out of reach")
    running_operator.stop()
    try:
        with ControlPlane(audit=True) as plane:
            plane.apply_crds([*KUBETUNE_CRDS, *kuberay_crds()])
            kube = Kube.connect(str(plane.kubeconfig))
            everywhere, everywhere_grants, _ = audit_the_flow(plane, kube, clock, tmp_path, watched=False)
            watched, watched_grants, namespace = audit_the_flow(plane, kube, clock, tmp_path, watched=True)
    finally:
        running_operator.start()
    for calls, grants in ((everywhere, everywhere_grants), (watched, watched_grants)):
        assert calls, "the audit log holds the operator's requests"
        # Every request is within what the chart renders, and none was refused.
        assert outside(calls, grants) == []
        assert [call for call, code in calls if code == 403 and call not in REFUSED_BY_DESIGN] == []
        # No request touches a Secret: none is granted, none is made.
        assert [call for call, _ in calls if call[2].startswith("secrets")] == []
        assert [grant for grant in grants if grant[2].startswith("secrets")] == []
    # The chart renders what permissions.py declares, and the flow uses all of it but what it cannot reach.
    declared = {(group, resource, verb) for (group, resource), verbs in verbs_by_resource().items() for verb in verbs}
    assert {grant[1:] for grant in everywhere_grants} == declared
    used = {call[1:] for call, _ in everywhere}
    assert sorted(declared - used) == sorted(set().union(*UNUSED_IN_THE_FLOW.values()))
    # With watchNamespaces, nothing is written cluster-wide: writes go to the watched namespace only.
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    assert [grant for grant in watched_grants if grant[0] == "*" and grant[3] in writes] == []
    assert sorted({call for call, _ in watched if call[3] in writes and call[0] != namespace}) == []
