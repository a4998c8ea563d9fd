"""The ModelDeployment kind: serve an exported model on an autoscaling Ray Serve endpoint."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from kubetune.runtime.contract import Batching, Task, Variant
from kubetune.runtime.contract.common import (
    ContractModel,
    JsonObject,
    KubernetesName,
    Quantity,
    Uri,
    WireModel,
    cel_rule,
    check_cpu_limit,
    cpu_limit_rule,
    with_cel,
)
from kubetune.runtime.contract.serving import COMPILE_DESCRIPTION
from pydantic import Field, field_validator, model_validator

from .common import (
    CPU_LIMIT_DESCRIPTION,
    PLACEMENT_RULES,
    Condition,
    HeadResources,
    Placement,
    SecretKeyReference,
    StorageAccess,
    check_object_metadata,
)

KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ("mdep",)


class FineTuneJobReference(ContractModel):
    """Follow a FineTuneJob: serve its latest run that passed the promotion gate, or a pinned run."""

    name: KubernetesName = Field(description="Name of the FineTuneJob in the same namespace.")
    run: int | None = Field(default=None, ge=1, description="Pin this run number instead of following promotions.")
    variant: Variant = Field(default=Variant.BEST, description="Exported variant: best, full, merged, int8 or pruned.")


class ModelReference(ContractModel):
    """The model to serve: an exported directory, or a FineTuneJob's result. Exactly one."""

    model_config = with_cel(
        cel_rule("has(self.uri) != has(self.fromFineTuneJob)", "set exactly one of uri and fromFineTuneJob")
    )

    uri: Uri | None = Field(
        default=None, description="An exported model directory (Hugging Face format, with or without kubetune.json)."
    )
    from_fine_tune_job: FineTuneJobReference | None = Field(
        default=None, description="Serve what a FineTuneJob promotes."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelReference:
        if (self.uri is None) == (self.from_fine_tune_job is None):
            raise ValueError("set exactly one of uri and fromFineTuneJob")
        return self


class Autoscaling(ContractModel):
    """Ray Serve replica autoscaling."""

    model_config = with_cel(
        cel_rule("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas", ".minReplicas")
    )

    min_replicas: int = Field(default=1, ge=0, le=1000, description="Fewest replicas (0 scales to zero when idle).")
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Most replicas.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0.0, le=10000.0, description="Requests in flight per replica that autoscaling aims for."
    )
    downscale_delay_seconds: int = Field(
        default=300, ge=0, le=86400, description="How long load must stay low before replicas are removed."
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})")
        return self


class ServingHeadResources(HeadResources):
    """The Ray head pod of the endpoint: Ray's control processes, Serve's controller and an HTTP proxy; no replica.

    Its placement is its own: the replicas' node selector, tolerations and GPU type do not apply to it.
    """

    memory: Quantity = Field(default="2Gi", description="Memory request and limit of the head.")


class AutoscalerResources(ContractModel):
    """Ray's autoscaler: a second container of the head pod that adds and removes replica pods."""

    model_config = with_cel(cpu_limit_rule("cpu", "cpuLimit"))

    cpu: Quantity = Field(
        default="500m", description="CPU request of the autoscaler container (and its limit, unless cpuLimit)."
    )
    cpu_limit: Quantity | None = Field(default=None, description=CPU_LIMIT_DESCRIPTION)
    memory: Quantity = Field(default="512Mi", description="Memory request and limit of the autoscaler container.")

    @model_validator(mode="after")
    def _limit_covers_request(self) -> AutoscalerResources:
        check_cpu_limit(self.cpu, self.cpu_limit, "cpuLimit", "cpu")
        return self


class ReplicaResources(Placement):
    """Resources of each serving replica and where replicas run, and of the head pod that runs the cluster."""

    model_config = with_cel(
        *PLACEMENT_RULES,
        cel_rule("!has(self.gpuType) || self.gpus > 0", "gpuType needs gpus > 0", ".gpuType"),
        cpu_limit_rule("cpu", "cpuLimit"),
    )

    cpu: Quantity = Field(
        default="1",
        description=(
            "CPU per replica: what each replica pod requests from Kubernetes (e.g. 500m). Ray counts the pod as"
            " this many CPUs rounded up to a whole number, and the replica takes all of them: one replica per pod."
        ),
    )
    cpu_limit: Quantity | None = Field(default=None, description=CPU_LIMIT_DESCRIPTION)
    memory: Quantity = Field(default="2Gi", description="Memory per replica.")
    ephemeral_storage: Quantity = Field(
        default="10Gi", description="Ephemeral storage requested per replica pod (model cache, /tmp)."
    )
    gpus: int = Field(default=0, ge=0, le=16, description="GPUs per replica.")
    head: ServingHeadResources = Field(
        default_factory=ServingHeadResources,
        description="The head pod (one per endpoint), which takes no replica: its resources and placement.",
    )
    autoscaler: AutoscalerResources = Field(
        default_factory=AutoscalerResources,
        description="The autoscaler container KubeRay adds to the head pod (it needs these besides the head's own).",
    )

    @model_validator(mode="after")
    def _gpu_type_needs_gpus(self) -> ReplicaResources:
        if self.gpu_type is not None and self.gpus == 0:
            raise ValueError("gpuType needs gpus > 0")
        return self

    @model_validator(mode="after")
    def _limit_covers_request(self) -> ReplicaResources:
        check_cpu_limit(self.cpu, self.cpu_limit, "cpuLimit", "cpu")
        return self


class Auth(ContractModel):
    """Bearer-token authentication of the endpoint."""

    token_secret: SecretKeyReference = Field(description="Secret key holding the token clients must send.")


class ModelDeploymentSpec(ContractModel):
    """An autoscaling HTTP endpoint for a fine-tuned model."""

    model: ModelReference = Field(description="What to serve.")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling, description="Replica autoscaling.")
    resources: ReplicaResources = Field(default_factory=ReplicaResources, description="Per-replica resources.")
    batching: Batching = Field(default_factory=Batching, description="Dynamic request batching.")
    max_new_tokens: int = Field(default=128, ge=1, le=32768, description="Generation limit per request (causal-lm).")
    compile: bool | None = Field(default=None, description=COMPILE_DESCRIPTION)
    auth: Auth | None = Field(default=None, description="Require a bearer token; open when omitted.")
    storage: StorageAccess | None = Field(default=None, description="Access to s3:// and hf:// model locations.")
    route_prefix: str = Field(
        default="/", pattern=r"^/[-A-Za-z0-9_./]*$", max_length=253, description="HTTP path prefix of the endpoint."
    )
    rollout_deadline_seconds: int = Field(
        default=900,
        ge=30,
        le=86400,
        description="A new model still deploying after this long is rolled back, as one that failed.",
    )


class DeploymentPhase(StrEnum):
    PENDING = "Pending"
    DEPLOYING = "Deploying"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"
    INVALID = "Invalid"


class ServedModel(WireModel):
    """An artifact the endpoint serves (or served), and the spec its RayService is built from."""

    uri: str = Field(description="URI of the exported variant.")
    fine_tune_job: str | None = Field(default=None, description="FineTuneJob it came from.")
    run: int | None = Field(default=None, description="Run number it came from.")
    variant: str | None = Field(default=None, description="Variant name.")
    task: Task | None = Field(default=None, description="The model's task, when its FineTuneJob says it.")
    generation: int | None = Field(
        default=None, description="metadata.generation of the spec it is served with (`spec` below)."
    )
    spec: JsonObject | None = Field(
        default=None,
        description=(
            "The ModelDeployment spec it is served with, as the operator read it: a rollout that fails"
            " returns to the artifact and the spec served before it."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class RejectedModel(WireModel):
    """A rollout that failed. Its artifact is not tried again until another run is promoted; its spec (when
    only the spec changed) not until the spec changes."""

    uri: str | None = Field(default=None, description="URI of the artifact, when the rollout brought a new one.")
    run: int | None = Field(default=None, description="Run number the artifact came from.")
    generation: int | None = Field(
        default=None,
        description="metadata.generation of the spec, when the rollout changed only the spec (not the artifact).",
    )
    reason: str = Field(default="", max_length=1024, description="Why the rollout failed.")


class ModelDeploymentStatus(WireModel):
    """Observed state of the endpoint."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    phase: DeploymentPhase | None = Field(
        default=None, description="Pending, Deploying, Ready, Degraded, Failed or Invalid."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Ready, Progressing and Degraded conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    endpoint: str | None = Field(default=None, description="In-cluster URL of the endpoint.")
    ray_service_name: str | None = Field(default=None, description="Name of the RayService.")
    serving: ServedModel | None = Field(
        default=None, description="The artifact being served (or rolled out, while Progressing)."
    )
    previous: ServedModel | None = Field(default=None, description="The artifact served before, for rollback.")
    rejected: RejectedModel | None = Field(default=None, description="The latest rollout that failed.")
    rollout_start_time: datetime | None = Field(default=None, description="When the current rollout started.")
    application_status: str | None = Field(
        default=None,
        description=(
            "The Serve application's status (DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, ...), on the Ray"
            " cluster KubeRay is bringing up while it replaces the cluster, else on the one that serves."
        ),
    )
    serving_pods: int | None = Field(
        default=None,
        description=(
            "Ray pods whose Serve proxy takes the endpoint's traffic, the head's included (KubeRay's"
            " numServeEndpoints). Not a count of model replicas, which KubeRay does not report."
        ),
    )


class ModelDeployment(ContractModel):
    """A ModelDeployment serves a fine-tuned model on an autoscaling Ray Serve endpoint."""

    api_version: str = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: ModelDeploymentSpec = Field(description="What to serve and how.")
    status: ModelDeploymentStatus | None = Field(default=None, description="Observed state (written by the operator).")

    @field_validator("metadata")
    @classmethod
    def _valid_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_object_metadata(value)
