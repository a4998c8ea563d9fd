"""Operator-wide settings: defaults of the objects it builds, and how its controllers work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.metadata import version

# The Ray of the runtime extra (pyproject pins it; a unit test keeps the two equal): the runtime image of
# this release is built on it, so the image setting and this version always go together.
RAY_VERSION = "2.60.0"
RUNTIME_IMAGE_REPOSITORY = "ghcr.io/kubetune/kubetune-runtime"
DAY_SECONDS = 24 * 60 * 60
ENV_PREFIX = "KUBETUNE_"


class SettingsError(ValueError):
    """An environment variable holds a value the setting cannot take; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Every field can be set from the environment as KUBETUNE_<FIELD NAME IN CAPITALS>."""

    # What the builders use when a spec leaves it open. The runtime image must be one of this release
    # (it carries RAY_VERSION); a spec that names another image says its Ray version (resources.rayVersion).
    runtime_image: str = f"{RUNTIME_IMAGE_REPOSITORY}:{version('kubetune')}-gpu"
    # Pull secrets every Ray pod gets, comma-separated (the runs' own ServiceAccounts carry none).
    image_pull_secrets: str = ""
    finished_cluster_ttl_seconds: int = 300
    # A run without spec.activeDeadlineSeconds is stopped after this long.
    default_active_deadline_seconds: int = 7 * DAY_SECONDS
    pvc_mount_root: str = "/mnt/pvc"
    config_mount_path: str = "/etc/kubetune/run"
    # Where the pods' writable caches live (an emptyDir; the root filesystem is read-only), and the user and
    # group the Ray image runs as.
    cache_mount_path: str = "/home/ray/.cache"
    pod_user_id: int = 1000
    pod_group_id: int = 100
    # Ray's token authentication on every Ray cluster (RayJobs and RayServices), through the RayCluster's
    # authOptions of KubeRay 1.5.1 and later. While it is on, the operator reads KubeRay's CRDs and creates
    # no Ray cluster where they lack authOptions (older KubeRay): the objects say so in their status.
    kuberay_auth_options: bool = True
    # Labels of the KubeRay operator's pods (key=value, comma-separated), and the namespace it runs in: the
    # NetworkPolicies let those pods, from that namespace only, reach the Ray dashboard and its agent, which
    # KubeRay calls for job and Serve status. An empty namespace: the Ray cluster's own (a KubeRay per namespace).
    kuberay_operator_labels: str = "app.kubernetes.io/name=kuberay-operator"
    kuberay_namespace: str = "kuberay-system"
    # Who may scrape the Ray pods' metrics (Ray's on 8080, an endpoint's HAProxy on 9101) through the
    # NetworkPolicies: pods with these labels (key=value, comma-separated; empty: any pod) in this namespace
    # (empty: the Ray cluster's own). Both empty: nobody.
    ray_metrics_namespace: str = ""
    ray_metrics_pod_labels: str = ""
    # How the operator works.
    metrics_port: int = 8080  # Prometheus /metrics; 0 serves none
    workers: int = 16  # reconciles running at once, over all objects (one at a time per object)
    backoff_base_seconds: float = 0.2  # first retry of a failed reconcile; doubles with each failure
    backoff_max_seconds: float = 300.0
    # Events for an object that is being (or was just) reconciled wait until they have stopped for this long,
    # but no longer than coalesce_max_seconds: a burst of changes makes two passes, not one per change.
    coalesce_seconds: float = 0.5
    coalesce_max_seconds: float = 5.0
    # An object that waits (an active run, a missing Secret) is looked at again this often without any event.
    # A safety net only: watches deliver the changes.
    recheck_seconds: float = 300.0
    # High availability: the replicas elect a leader on a coordination.k8s.io Lease (`kubectl get lease` shows
    # its holder), and only the leader reconciles. Off, the operator reconciles alone (one replica only). The
    # Lease's namespace, when empty, is the operator's own (its pod's service account's).
    leader_election: bool = False
    leader_election_lease: str = "kubetune-operator"
    leader_election_namespace: str = ""
    # How long the Lease holds unrenewed (a follower's wait once the leader died), how long the leader tries to
    # renew it before giving up (and exiting), and how often each replica tries: controller-runtime's defaults.
    lease_duration_seconds: int = 15
    lease_renew_deadline_seconds: int = 10
    lease_retry_period_seconds: int = 2
    # What specs may ask for, comma-separated; empty allows anything. Images are glob patterns
    # (e.g. "registry.example.com/kubetune/*"); priority classes are names.
    allowed_images: str = ""
    allowed_priority_classes: str = ""
    # Taints specs may tolerate (spec.resources[.head].tolerations), comma-separated KEY or KEY:EFFECT, KEY a
    # glob pattern (e.g. "dedicated:NoSchedule,spot.example.com/*"); "*" allows any toleration, one of every
    # taint included. Empty allows none: taints keep pods off control-plane and dedicated nodes, so tolerating
    # them is the administrator's to grant. The GPU toleration kubetune gives GPU pods itself is always allowed.
    allowed_tolerations: str = ""
    # Node labels specs may select nodes by (nodeSelector and node affinity), comma-separated KEY or KEY=VALUE,
    # both glob patterns (e.g. "node-pool,topology.kubernetes.io/zone=eu-*"). Empty allows any: a selector only
    # narrows the nodes whose taints the pods tolerate, so it reaches no node that the tolerations keep out.
    allowed_node_selectors: str = ""
    # Models whose own Python code may run (model.trustRemoteCode), comma-separated glob patterns of model URIs
    # (e.g. "hf://my-org/*,s3://models/vetted/*"); "*" allows any model. Empty refuses trustRemoteCode: that
    # code runs in the pods with the run's credentials, whatever image the pods run.
    allowed_remote_code_models: str = ""

    @property
    def ray_version(self) -> str:
        """The Ray version of the runtime image."""
        return RAY_VERSION

    @property
    def pull_secret_names(self) -> tuple[str, ...]:
        return _items(self.image_pull_secrets)

    @property
    def kuberay_operator_selector(self) -> dict[str, str]:
        return _labels(self.kuberay_operator_labels)

    @property
    def ray_metrics_pod_selector(self) -> dict[str, str]:
        return _labels(self.ray_metrics_pod_labels)

    @property
    def ray_metrics_scraped(self) -> bool:
        """Whether a scraper may reach the Ray pods' metrics (a namespace or pod labels are set)."""
        return bool(self.ray_metrics_namespace.strip() or self.ray_metrics_pod_selector)

    @property
    def allowed_image_patterns(self) -> tuple[str, ...]:
        return _items(self.allowed_images)

    @property
    def allowed_priority_class_names(self) -> tuple[str, ...]:
        return _items(self.allowed_priority_classes)

    @property
    def allowed_toleration_patterns(self) -> tuple[str, ...]:
        return _items(self.allowed_tolerations)

    @property
    def allowed_node_selector_patterns(self) -> tuple[str, ...]:
        return _items(self.allowed_node_selectors)

    @property
    def allowed_remote_code_model_patterns(self) -> tuple[str, ...]:
        return _items(self.allowed_remote_code_models)

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> Settings:
        environment = os.environ if environment is None else environment
        values: dict[str, object] = {}
        for item in fields(cls):
            variable = ENV_PREFIX + item.name.upper()
            raw = environment.get(variable)
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, item.name))
            try:
                value = _boolean(raw) if kind is bool else kind(raw)
            except ValueError:
                raise SettingsError(f"{variable}={raw!r}: expected {kind.__name__}") from None
            if isinstance(value, (int, float)) and (value <= 0 if item.name == "workers" else value < 0):
                raise SettingsError(f"{variable}={raw!r}: must be {'positive' if item.name == 'workers' else '>= 0'}")
            values[item.name] = value
        return cls(**values)  # type: ignore[arg-type]


def _boolean(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _items(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _labels(value: str) -> dict[str, str]:
    """key=value pairs, comma-separated (a key without a value: the empty value)."""
    pairs = (item.partition("=") for item in _items(value))
    return {key.strip(): value.strip() for key, _, value in pairs}
