"""The operator's permissions: one declaration, rendered into the chart's RBAC, and nothing more than it uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator import rbacgen
from kubetune.operator.api.finetunejob import FineTuneJob, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.builders.finetunejob import build_run
from kubetune.operator.permissions import PERMISSIONS, Permission, Scope, rules, verbs_by_resource
from kubetune.operator.planning.finetunejob import RunRequest
from kubetune.operator.settings import Settings

from ..conftest import REPO_ROOT, mutated

CHART = REPO_ROOT / "charts" / "kubetune"
GRANTED = verbs_by_resource()
# (apiVersion, kind) → the plural the API server lists it under: every kind the operator reads or writes.
ADDRESSED: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Event"): "events",
    ("v1", "Pod"): "pods",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("ray.io/v1", "RayJob"): "rayjobs",
    ("batch/v1", "Job"): "jobs",
    ("ray.io/v1", "RayService"): "rayservices",
    ("kubetune.io/v1alpha1", "FineTuneJob"): "finetunejobs",
    ("kubetune.io/v1alpha1", "ModelDeployment"): "modeldeployments",
    ("apiextensions.k8s.io/v1", "CustomResourceDefinition"): "customresourcedefinitions",
}


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


def run_objects(document: dict[str, Any]) -> list[dict[str, Any]]:
    job = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "uid-1"))
    assert isinstance(job, FineTuneJob)
    request = RunRequest(number=1, trigger=Trigger.SPEC_CHANGE, trigger_detail="", spec_generation=1, trigger_hash="h")
    run = build_run(job, request, Settings())
    return [*run.in_order(), run.ray_job, *([run.plan_job] if run.plan_job else [])]


def test_the_declaration_renders_as_rules() -> None:
    namespaced = rules(Scope.NAMESPACED)
    assert namespaced[0] == {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"], "verbs": ["list", "watch"]}
    assert sum(len(rules(scope)) for scope in Scope) == len(PERMISSIONS)
    assert rules(Scope.CLUSTER) == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    ]
    assert rules(Scope.OPERATOR_NAMESPACE) == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
    ]
    # Verbs come out in one order, whatever order they were declared in.
    rule = Permission("", "configmaps", ("patch", "get"), "a reason").rule()
    assert rule["verbs"] == ["get", "patch"]


def test_the_chart_holds_the_generated_rules() -> None:
    committed = (CHART / rbacgen.FILE).read_text()
    assert committed == rbacgen.rendered(), "regenerate with: python -m kubetune.operator.rbacgen charts/kubetune"


def test_the_generated_templates_are_the_rules() -> None:
    text = rbacgen.rendered()
    for scope, name in rbacgen.TEMPLATE_NAMES.items():
        body = text.split(f'{{{{- define "{name}" -}}}}\n', 1)[1].split("{{- end }}", 1)[0]
        assert yaml.safe_load(body) == rules(scope)
        # Every rule is preceded by its reason.
        lines = body.splitlines()
        assert all(lines[i - 1].startswith("# ") for i, line in enumerate(lines) if line.startswith("- "))


def test_the_generator_writes_into_a_chart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert rbacgen.main([str(tmp_path)]) == 0
    assert (tmp_path / rbacgen.FILE).read_text() == rbacgen.rendered()
    assert rbacgen.main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_every_permission_has_a_reason() -> None:
    for permission in PERMISSIONS:
        assert len(permission.why.split()) >= 5, f"{permission.resource}: say why"


@pytest.mark.parametrize(
    "bad",
    [
        {"verbs": ("*",)},
        {"verbs": ("escalate",)},
        {"verbs": ()},
        {"resource": "*"},
        {"why": " "},
    ],
)
def test_a_permission_must_be_narrow_and_explained(bad: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"api_group": "", "resource": "pods", "verbs": ("get",), "why": "a reason"} | bad
    with pytest.raises(ValueError, match="reason"):
        Permission(**fields)


def test_no_wildcards() -> None:
    for rule in [rule for scope in Scope for rule in rules(scope)]:
        assert "*" not in [*rule["apiGroups"], *rule["resources"], *rule["verbs"]], rule


def test_no_verb_on_secrets() -> None:
    # Even a metadata-only list needs `list`, which RBAC cannot limit to metadata: it would read every Secret.
    assert [p for p in PERMISSIONS if p.resource.partition("/")[0] == "secrets"] == []


def test_with_watched_namespaces_nothing_is_written_cluster_wide() -> None:
    # The ClusterRole of namespaced mode holds only the cluster-scoped rules, and those only read.
    for rule in rules(Scope.CLUSTER):
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule


def test_configmaps_are_patched_by_runs_never_updated() -> None:
    # patch is held only for the runs' Roles (RBAC's escalation check); get/update are not needed by anyone.
    assert GRANTED[("", "configmaps")] == {"get", "list", "watch", "create", "delete", "patch"}


def test_every_kind_the_operator_addresses_is_declared_and_no_other() -> None:
    addressed = {(group_of(api_version), plural) for (api_version, _kind), plural in ADDRESSED.items()}
    # The Lease is the leader election's (leader.py, through the kubernetes package), not the client's.
    addressed.add(("coordination.k8s.io", "leases"))
    declared = {key for key in GRANTED if "/" not in key[1]}  # CRDs too: KubeRay's are read (kuberay.py)
    assert declared == addressed


def test_the_lease_is_granted_in_the_operators_namespace_only() -> None:
    # Reading and renewing a Lease in the namespaces it watches would let the operator take over other
    # controllers' leader elections there.
    [lease] = [p for p in PERMISSIONS if p.resource == "leases"]
    assert lease.scope == Scope.OPERATOR_NAMESPACE
    elsewhere = [rule for scope in Scope if scope != Scope.OPERATOR_NAMESPACE for rule in rules(scope)]
    assert [rule for rule in elsewhere if "leases" in rule["resources"]] == []


def test_status_is_written_through_the_subresource_only() -> None:
    for plural in ("finetunejobs", "modeldeployments"):
        assert GRANTED[("kubetune.io", f"{plural}/status")] == {"patch"}
        assert GRANTED[("kubetune.io", plural)] == {"get", "list", "watch"}


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_operator_can_create_every_object_of_a_run(minimal_job: dict[str, Any], gpus: int) -> None:
    for manifest in run_objects(mutated(minimal_job, "spec.resources", {"gpusPerWorker": gpus})):
        plural = ADDRESSED[(manifest["apiVersion"], manifest["kind"])]
        assert {"create", "get"} <= GRANTED[(group_of(manifest["apiVersion"]), plural)], manifest["kind"]


def test_the_operator_holds_what_it_grants_a_run(minimal_job: dict[str, Any]) -> None:
    # Kubernetes refuses a Role (or a RoleBinding to it) that grants more than its creator holds.
    role = next(m for m in run_objects(minimal_job) if m["kind"] == "Role")
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert set(rule["verbs"]) <= GRANTED[(group, resource)], (group, resource)


def test_the_generated_rules_module_is_the_one_declaration() -> None:
    # Nothing else in the chart declares the operator's rules by hand (the user roles are for people).
    templates = [path for path in (CHART / "templates").glob("*.yaml") if path.name != "user-roles.yaml"]
    assert templates
    for path in templates:
        assert "verbs:" not in path.read_text(), f"{path.name} declares rules by hand"
