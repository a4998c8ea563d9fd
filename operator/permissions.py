"""What the operator may do in the API: the one declaration the chart's RBAC is generated from.

Each permission names the code that needs it. Nothing here is granted "just in case": a
verb the operator does not call is not declared (the escalation verbs below are the one
kind of exception, and they say why). `rules()` renders the declaration as the rules of a
ClusterRole (cluster-wide mode) or of a Role per watched namespace plus a ClusterRole for
the cluster-scoped remainder (namespaced mode, where that remainder only reads), and the
operator's own objects as a Role in its namespace;
`python -m kubetune.operator.rbacgen` writes them into the chart.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from kubetune.operator.api.common import GROUP

# Read verbs first, then writes: the order rules are written in (stable, so the chart does not drift).
VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


class Scope(StrEnum):
    # Granted in each watched namespace (or cluster-wide when all namespaces are watched).
    NAMESPACED = "namespaced"
    # Cluster-scoped objects: always a ClusterRole.
    CLUSTER = "cluster"
    # The operator's own objects, in the namespace it runs in: a Role there, in either mode.
    OPERATOR_NAMESPACE = "operator-namespace"


@dataclass(frozen=True)
class Permission:
    """Verbs on one resource (`kind/subresource` for a subresource) of one API group ("" is core)."""

    api_group: str
    resource: str
    verbs: tuple[str, ...]
    why: str
    scope: Scope = Scope.NAMESPACED

    def __post_init__(self) -> None:
        unknown = [verb for verb in self.verbs if verb not in VERBS]
        if unknown or not self.verbs or "*" in self.resource or not self.why.strip():
            raise ValueError(f"{self.api_group}/{self.resource}: verbs from {VERBS} and a reason are required")

    def rule(self) -> dict[str, Any]:
        verbs = [verb for verb in VERBS if verb in self.verbs]
        return {"apiGroups": [self.api_group], "resources": [self.resource], "verbs": verbs}


RAY = "ray.io"
RBAC = "rbac.authorization.k8s.io"
NETWORKING = "networking.k8s.io"
APIEXTENSIONS = "apiextensions.k8s.io"
COORDINATION = "coordination.k8s.io"
BATCH = "batch"

PERMISSIONS: tuple[Permission, ...] = (
    # kubetune's own kinds.
    Permission(GROUP, "finetunejobs", ("list", "watch"),
               "kopf watches FineTuneJobs and enqueues them (handlers/finetunejob.py on_job_event)"),
    Permission(GROUP, "finetunejobs", ("get",),
               "each pass reads its job, and a deployment the job it follows (reconcile/*.py)"),
    Permission(GROUP, "finetunejobs/status", ("patch",),
               "status is written as a merge patch of the status subresource (reconcile patch_status)"),
    Permission(GROUP, "modeldeployments", ("list", "watch"),
               "kopf watches ModelDeployments and enqueues them (handlers/modeldeployment.py)"),
    Permission(GROUP, "modeldeployments", ("get",),
               "each pass reads its deployment (reconcile/modeldeployment.py)"),
    Permission(GROUP, "modeldeployments/status", ("patch",),
               "status is written as a merge patch of the status subresource (reconcile patch_status)"),
    # Training runs.
    Permission(RAY, "rayjobs", ("list", "watch"),
               "the runs' cache: an informer selected by kubetune's labels (handlers/finetunejob.py RUNS)"),
    Permission(RAY, "rayjobs", ("get", "create", "delete"),
               "a run's RayJob is created, read when not cached yet or its name is taken, and deleted "
               "when the run is stopped or leaves the history (reconcile/finetunejob.py)"),
    Permission(BATCH, "jobs", ("get", "create", "delete"),
               "a GPU run's plan Job (CPU) is created before its RayJob, read while the run is planned, and "
               "deleted with the run (reconcile/finetunejob.py)"),
    Permission("", "configmaps", ("list", "watch"),
               "the runs' reports: an informer selected by kubetune's labels (handlers/finetunejob.py REPORTS)"),
    Permission("", "configmaps", ("get", "create", "delete"),
               "a run's config and report ConfigMaps are created, checked when their name is taken, and "
               "deleted with the run (reconcile/finetunejob.py)"),
    Permission("", "configmaps", ("patch",),
               "granted to each run's Role on its report, by name (builders/finetunejob.py): Kubernetes lets "
               "a Role grant only what its creator holds, so the operator holds this verb itself, though it "
               "never patches a ConfigMap. The one write on a core kind it does not use"),
    Permission("", "serviceaccounts", ("get", "create", "delete"),
               "each run's own ServiceAccount, the identity of the pod that reports (reconcile/finetunejob.py)"),
    Permission(RBAC, "roles", ("get", "create", "delete"),
               "each run's Role: write access to its own report only (reconcile/finetunejob.py)"),
    Permission(RBAC, "rolebindings", ("get", "create", "delete"),
               "binds each run's Role to its ServiceAccount (reconcile/finetunejob.py)"),
    Permission("", "pods", ("list", "watch"),
               "why a run or an endpoint waits (unschedulable, image pull): informers of the runs' and the "
               "endpoints' pods selected by kubetune's labels (handlers/finetunejob.py, handlers/modeldeployment.py "
               "PODS)"),
    # Serving.
    Permission(RAY, "rayservices", ("list", "watch"),
               "the endpoints' cache: an informer selected by kubetune's labels (handlers/modeldeployment.py)"),
    Permission(RAY, "rayservices", ("get", "create", "patch"),
               "an endpoint's RayService is created, checked when its name is taken, and patched to roll "
               "out a new model (reconcile/modeldeployment.py)"),
    Permission(NETWORKING, "networkpolicies", ("get", "create", "patch", "delete"),
               "closes each run's and each endpoint's Ray cluster to other pods; read on every pass while the "
               "cluster runs, made again if deleted and patched back if changed (reconcile apply_owned); "
               "deleted with a run the history forgets"),
    # Shared.
    Permission("", "events", ("create",),
               "every transition is recorded as an Event on its object (kube.py Kube.event)"),
    # kopf.
    Permission(APIEXTENSIONS, "customresourcedefinitions", ("list", "watch"),
               "kopf follows the CRDs of the kinds it serves (discovery itself needs no grant); KubeRay's are "
               "listed by name to see whether they have authOptions (kuberay.py)", Scope.CLUSTER),
    # High availability.
    Permission(COORDINATION, "leases", ("get", "create", "update"),
               "the replicas elect their leader on a Lease: each reads it, creates it when missing, and "
               "renews or takes it over by replacing it (leader.py, kubernetes' leader election)",
               Scope.OPERATOR_NAMESPACE),
)  # fmt: skip
# Not declared, on purpose: `namespaces` (with named namespaces kopf falls back to the names given when it
# may not list them), and `secrets`: no verb on them at all. A Secret a spec names is passed to the pods by
# reference; when it is missing, the pods cannot start their containers and the run or endpoint shows
# PodConfigError with the kubelet's message naming the Secret (planning/pods.py). Granting list/watch, even
# for a metadata-only informer, would let the operator read every Secret's data.


def rules(scope: Scope, permissions: tuple[Permission, ...] = PERMISSIONS) -> list[dict[str, Any]]:
    """The RBAC rules of one scope, one per permission, in declaration order."""
    return [permission.rule() for permission in permissions if permission.scope == scope]


def verbs_by_resource(permissions: tuple[Permission, ...] = PERMISSIONS) -> dict[tuple[str, str], set[str]]:
    """(API group, resource) → every verb granted on it, over all permissions."""
    granted: dict[tuple[str, str], set[str]] = {}
    for permission in permissions:
        granted.setdefault((permission.api_group, permission.resource), set()).update(permission.verbs)
    return granted
