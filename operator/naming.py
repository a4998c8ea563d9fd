"""Names, labels and annotations of the objects kubetune creates. Pure functions."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "kubetune"
JOB_LABEL = "kubetune.io/finetunejob"
RUN_LABEL = "kubetune.io/run"
# On the report ConfigMap of a run: the operator watches these ConfigMaps only.
REPORT_LABEL = "kubetune.io/report"
DEPLOYMENT_LABEL = "kubetune.io/modeldeployment"
TRIGGER_ANNOTATION = "kubetune.io/trigger"
TRIGGER_DETAIL_ANNOTATION = "kubetune.io/trigger-detail"
GENERATION_ANNOTATION = "kubetune.io/spec-generation"
# On a run's RayJob: the hash of the run-relevant spec it was made for (the run record's triggerHash).
SPEC_HASH_ANNOTATION = "kubetune.io/spec-hash"
# On an endpoint's RayService: the hash of what the operator last applied. Operators before the rename
# wrote it under the RayJob's key, which is still read so that such a RayService is not rewritten.
APPLIED_HASH_ANNOTATION = "kubetune.io/applied-hash"
FORMER_APPLIED_HASH_ANNOTATION = SPEC_HASH_ANNOTATION
# On an endpoint's replica pods: the artifact their cluster was made for (see builders/modeldeployment.py).
ARTIFACT_ANNOTATION = "kubetune.io/artifact"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# The Serve application's name in an endpoint's Serve config.
SERVE_APPLICATION = "model"

# KubeRay derives RayCluster names (at most 53 characters) from RayJob and RayService
# names plus a 6-character suffix, so it rejects longer RayJob/RayService names.
MAX_RAY_NAME_LENGTH = 47


def fit(base: str, suffix: str = "", limit: int = MAX_RAY_NAME_LENGTH) -> str:
    """`base + suffix` within `limit` characters; a shortened base keeps a hash so names stay unique."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def run_name(job: str, number: int) -> str:
    """The RayJob of run `number` (and the prefix of the run's other objects)."""
    return fit(job, f"-r{number}")


def config_map_name(run: str) -> str:
    return f"{run}-config"


def report_name(run: str) -> str:
    return f"{run}-report"


def plan_job_name(run: str) -> str:
    """The Job that plans a GPU run on CPU before its RayJob is created."""
    return f"{run}-plan"


def runner_name(run: str) -> str:
    """ServiceAccount, Role and RoleBinding of the run: it may patch its report and nothing more."""
    return f"{run}-runner"


def run_labels(job: str, number: int) -> dict[str, str]:
    return {MANAGED_BY_LABEL: MANAGER, JOB_LABEL: job, RUN_LABEL: str(number)}


def controller_reference(api_version: str, kind: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The owner reference that makes the object with `metadata` the controller of a child (collected with it)."""
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def controller_uid(manifest: Mapping[str, Any]) -> str | None:
    """The UID in the object's controller owner reference: who it belongs to (None: nobody)."""
    for reference in manifest.get("metadata", {}).get("ownerReferences") or []:
        if reference.get("controller"):
            return str(reference.get("uid") or "") or None
    return None


def run_output_uri(output_uri: str, number: int) -> str:
    """Where run `number` writes: a folder of its own under spec.output.uri. Runs never overwrite each
    other's artifacts: the one an endpoint serves, or the one it would roll back to."""
    return f"{output_uri.rstrip('/')}/runs/{number}"
