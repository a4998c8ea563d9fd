"""Operator-wide settings: defaults of the objects it builds, and how its controllers work.

Every field is read from the environment as KUBETUNE_<FIELD NAME IN CAPITALS> (an empty variable keeps the
default). docs/configuration.md and the chart's env block are generated from this class
(`python -m kubetune.operator.settingsgen`); what the runtime image fixes is in `images`, not here.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import version
from typing import Self

from kubetune.operator.images import RAY_VERSION, RUNTIME_IMAGE_REPOSITORY
from pydantic import Field, ValidationError
from pydantic.config import JsonDict
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as SourceError
from pydantic_settings.sources.utils import parse_env_vars

DAY_SECONDS = 24 * 60 * 60
ENV_PREFIX = "KUBETUNE_"


class SettingsError(ValueError):
    """An environment variable holds a value the setting cannot take; the message names it."""


def chart_value(key: str) -> JsonDict:
    """Field metadata: the chart value (under `operator:` in values.yaml) the chart passes as this setting."""
    return {"chart_value": key}


class OperatorSettings(BaseSettings):
    """What the operator builds by default, what specs may ask for, and how its controllers work."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True, extra="ignore")

    # What the builders use when a spec leaves it open.
    runtime_image: str = Field(
        default=f"{RUNTIME_IMAGE_REPOSITORY}:{version('kubetune')}-gpu",
        min_length=1,
        description=(
            "Image of the Ray pods when a spec names none. It must be a runtime image of this release (built on "
            f"Ray {RAY_VERSION}); a spec that names another image says its Ray version (resources.rayVersion)."
        ),
        json_schema_extra={**chart_value("runtimeImage"), "shown_default": f"{RUNTIME_IMAGE_REPOSITORY}:VERSION-gpu"},
    )
    image_pull_secrets: str = Field(
        default="",
        description="Pull secrets every Ray pod gets, comma-separated (the runs' own ServiceAccounts carry none).",
        json_schema_extra=chart_value("imagePullSecrets"),
    )
    finished_cluster_ttl_seconds: int = Field(
        default=300,
        ge=0,
        description="How long KubeRay keeps a finished run's Ray cluster, in seconds.",
        json_schema_extra=chart_value("finishedClusterTtlSeconds"),
    )
    default_active_deadline_seconds: int = Field(
        default=7 * DAY_SECONDS,
        gt=0,
        description="A run without spec.activeDeadlineSeconds is stopped after this many seconds.",
        json_schema_extra=chart_value("defaultActiveDeadlineSeconds"),
    )
    kuberay_auth_options: bool = Field(
        default=True,
        description=(
            "Ray's token authentication on every Ray cluster (RayJobs and RayServices), through the RayCluster's "
            "authOptions of KubeRay 1.5.1 and later. While it is on, the operator reads KubeRay's CRDs and creates "
            "no Ray cluster where they lack authOptions (older KubeRay): the objects say so in their status."
        ),
        json_schema_extra=chart_value("kuberayAuthOptions"),
    )
    kuberay_operator_labels: str = Field(
        default="app.kubernetes.io/name=kuberay-operator",
        description=(
            "Labels of the KubeRay operator's pods (key=value, comma-separated): the NetworkPolicies let those pods, "
            "from kuberay_namespace only, reach the Ray dashboard and its agent, which KubeRay calls for job and "
            "Serve status."
        ),
        json_schema_extra=chart_value("kuberayOperatorLabels"),
    )
    kuberay_namespace: str = Field(
        default="kuberay-system",
        description="Namespace the KubeRay operator runs in; empty: the Ray cluster's own (a KubeRay per namespace).",
        json_schema_extra=chart_value("kuberayNamespace"),
    )
    ray_metrics_namespace: str = Field(
        default="",
        description=(
            "Namespace of who may scrape the Ray pods' metrics (Ray's on 8080, an endpoint's HAProxy on 9101) "
            "through the NetworkPolicies; empty: the Ray cluster's own. This and ray_metrics_pod_labels both "
            "empty: nobody."
        ),
        json_schema_extra=chart_value("rayMetricsScraper.namespace"),
    )
    ray_metrics_pod_labels: str = Field(
        default="",
        description=(
            "Labels of the pods that may scrape the Ray pods' metrics (key=value, comma-separated); empty: any pod "
            "(when ray_metrics_namespace is set)."
        ),
        json_schema_extra=chart_value("rayMetricsScraper.podLabels"),
    )
    # How the operator works.
    metrics_port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description="Port of the operator's Prometheus /metrics; 0 serves none. The chart sets it from metrics.*.",
    )
    workers: int = Field(
        default=16,
        gt=0,
        description="Reconciles running at once, over all objects (one at a time per object).",
        json_schema_extra=chart_value("workers"),
    )
    backoff_base_seconds: float = Field(
        default=0.2, ge=0, description="First retry of a failed reconcile, in seconds; doubles with each failure."
    )
    backoff_max_seconds: float = Field(
        default=300.0, ge=0, description="Longest wait between retries of a failed reconcile, in seconds."
    )
    coalesce_seconds: float = Field(
        default=0.5,
        ge=0,
        description=(
            "Events for an object that is being (or was just) reconciled wait until they have stopped for this "
            "long, but no longer than coalesce_max_seconds: a burst of changes makes two passes, not one per change."
        ),
    )
    coalesce_max_seconds: float = Field(
        default=5.0, ge=0, description="Longest wait of coalesced events, in seconds (see coalesce_seconds)."
    )
    recheck_seconds: float = Field(
        default=300.0,
        ge=0,
        description=(
            "An object that waits (an active run, a missing Secret) is looked at again this often without any "
            "event. A safety net only: watches deliver the changes."
        ),
    )
    # High availability.
    leader_election: bool = Field(
        default=False,
        description=(
            "The replicas elect a leader on a coordination.k8s.io Lease (`kubectl get lease` shows its holder), and "
            "only the leader reconciles. Off, the operator reconciles alone (one replica only). The chart sets it "
            "from leaderElection.enabled."
        ),
    )
    leader_election_lease: str = Field(
        default="kubetune-operator",
        description="Name of the Lease the replicas elect a leader on. The chart passes the release's full name.",
    )
    leader_election_namespace: str = Field(
        default="",
        description="Namespace of the Lease; empty: the operator's own (its pod's service account's).",
    )
    lease_duration_seconds: int = Field(
        default=10,
        gt=0,
        description=(
            "How long the Lease holds unrenewed: a follower's wait once the leader died. Must exceed "
            "lease_renew_deadline_seconds plus two lease_retry_period_seconds. The chart sets it from "
            "leaderElection.leaseDurationSeconds."
        ),
    )
    lease_renew_deadline_seconds: int = Field(
        default=6,
        gt=0,
        description=(
            "How long the leader tries to renew the Lease before giving up (and exiting). The chart sets it from "
            "leaderElection.renewDeadlineSeconds."
        ),
    )
    lease_retry_period_seconds: int = Field(
        default=1,
        description=(
            "How often each replica tries to take or renew the Lease. The chart sets it from "
            "leaderElection.retryPeriodSeconds."
        ),
    )
    # What specs may ask for.
    allowed_images: str = Field(
        default="",
        description=(
            "Images specs may name, comma-separated glob patterns (e.g. registry.example.com/kubetune/*); "
            "empty allows any."
        ),
        json_schema_extra=chart_value("allowedImages"),
    )
    allowed_priority_classes: str = Field(
        default="",
        description="Priority classes specs may name, comma-separated; empty allows any.",
        json_schema_extra=chart_value("allowedPriorityClasses"),
    )
    allowed_tolerations: str = Field(
        default="",
        description=(
            "Taints specs may tolerate (spec.resources[.head].tolerations), comma-separated KEY or KEY:EFFECT, KEY a "
            "glob pattern (e.g. dedicated:NoSchedule,spot.example.com/*); * allows any toleration, one of every "
            "taint included. Empty allows none: taints keep pods off control-plane and dedicated nodes, so "
            "tolerating them is the administrator's to grant. The GPU toleration kubetune gives GPU pods itself "
            "is always allowed."
        ),
        json_schema_extra=chart_value("allowedTolerations"),
    )
    allowed_node_selectors: str = Field(
        default="",
        description=(
            "Node labels specs may select nodes by (nodeSelector and node affinity), comma-separated KEY or "
            "KEY=VALUE, both glob patterns (e.g. node-pool,topology.kubernetes.io/zone=eu-*). Empty allows any: a "
            "selector only narrows the nodes whose taints the pods tolerate."
        ),
        json_schema_extra=chart_value("allowedNodeSelectors"),
    )
    allowed_remote_code_models: str = Field(
        default="",
        description=(
            "Models whose own Python code may run (model.trustRemoteCode), comma-separated glob patterns of model "
            "URIs (e.g. hf://my-org/*,s3://models/vetted/*); * allows any model. Empty refuses trustRemoteCode: "
            "that code runs in the pods with the run's credentials, whatever image the pods run."
        ),
        json_schema_extra=chart_value("allowedRemoteCodeModels"),
    )

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> Self:
        """The settings of `environment` (this process's by default); a bad value raises SettingsError naming
        its variable."""
        try:
            if environment is None:
                return cls()
            # Only the mapping: defaults for what it leaves out, whatever this process's environment holds
            # (arguments win over the environment).
            defaults = {name: field.get_default(call_default_factory=True) for name, field in cls.model_fields.items()}
            return cls(**{**defaults, **MappingSource(cls, environment)()})
        except ValidationError as error:
            raise SettingsError("; ".join(_problem(problem) for problem in error.errors())) from None
        except SourceError as error:
            raise SettingsError(str(error)) from None

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


class MappingSource(EnvSettingsSource):
    """Environment variables from a mapping instead of os.environ, read exactly as pydantic-settings reads them."""

    def __init__(self, settings_cls: type[BaseSettings], environment: Mapping[str, str]) -> None:
        self.environment = environment
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self.environment, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str)


# The name the operator's modules import; one class.
Settings = OperatorSettings


def _problem(problem: object) -> str:
    """One validation problem as `VARIABLE='raw': what is wrong`."""
    assert isinstance(problem, dict)
    location = problem.get("loc") or ("?",)
    variable = ENV_PREFIX + str(location[0]).upper()
    return f"{variable}={problem.get('input')!r}: {problem.get('msg')}"


def _items(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _labels(value: str) -> dict[str, str]:
    """key=value pairs, comma-separated (a key without a value: the empty value)."""
    pairs = (item.partition("=") for item in _items(value))
    return {key.strip(): value.strip() for key, _, value in pairs}
