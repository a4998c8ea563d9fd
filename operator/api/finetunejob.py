"""The FineTuneJob kind: the run contract plus cluster concerns, and its status."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from kubetune.runtime.contract import MethodType, Metric, Precision, RunSpec, Sharding
from kubetune.runtime.contract.common import (
    URI_MAX_LENGTH,
    ContractModel,
    FiniteOrNull,
    JsonObject,
    KubernetesName,
    Message,
    Quantity,
    ShortText,
    WireModel,
    cel_rule,
    check_cpu_limit,
    cpu_limit_rule,
    with_cel,
)
from kubetune.runtime.contract.decisions import Decisions
from kubetune.runtime.contract.plan import RunPlan
from kubetune.runtime.contract.report import RunProgress
from kubetune.runtime.contract.run import METRICS_MESSAGE, RUN_SPEC_RULES, allowed_metrics, metric_rule
from kubetune.runtime.contract.runconfig import SHARDED_QLORA_MESSAGE, SHARDING_DESCRIPTION
from pydantic import Field, field_validator, model_validator

from .common import (
    CPU_LIMIT_DESCRIPTION,
    CRON_PATTERN,
    PLACEMENT_RULES,
    Condition,
    HeadResources,
    Placement,
    StorageAccess,
    check_cron,
    check_object_metadata,
)
from .schedule import SCHEDULE_RULES, TIME_ZONES, check_time_zone, schedule_fires

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ("ftj",)
RETRAIN_ANNOTATION = "kubetune.io/retrain"
# Most exported variants a run record lists (a run makes at most a handful), and most metrics per model.
MAX_ARTIFACTS = 16
MAX_METRICS = 32


# Seconds a deleted training pod has to save a checkpoint: a step and a checkpoint upload of a typical
# adapter or a model of a few billion parameters; larger runs set resources.terminationGracePeriodSeconds.
DEFAULT_TERMINATION_GRACE_SECONDS = 120


class Resources(Placement):
    """Ray workers that train (one training process each) and where they run."""

    model_config = with_cel(*PLACEMENT_RULES, cpu_limit_rule("cpuPerWorker", "cpuLimitPerWorker"))

    workers: int = Field(default=1, ge=1, le=1024, description="Ray worker pods that train.")
    gpus_per_worker: int = Field(
        default=0,
        ge=0,
        le=16,
        description="GPUs per worker pod (nvidia.com/gpu); each runs one training process per GPU.",
    )
    sharding: Sharding = Field(default=Sharding.NONE, description=SHARDING_DESCRIPTION)
    cpu_per_worker: Quantity = Field(
        default="2", description="CPU request per worker (and its limit, unless cpuLimitPerWorker)."
    )
    cpu_limit_per_worker: Quantity | None = Field(default=None, description=CPU_LIMIT_DESCRIPTION)
    memory_per_worker: Quantity = Field(default="8Gi", description="Memory request and limit per worker.")
    ephemeral_storage_per_worker: Quantity = Field(
        default="20Gi", description="Ephemeral storage requested per worker (model and data caches, /tmp)."
    )
    head: HeadResources = Field(default_factory=HeadResources, description="Resources of the Ray head.")
    # Optional (None: the default) so that the run hash of a spec written before the field stays the same.
    termination_grace_period_seconds: int | None = Field(
        default=None,
        ge=10,
        le=3600,
        description=(
            "How long a deleted Ray pod of the run (node drain, spot reclaim, Kueue preemption) lives on: the "
            "workers save a checkpoint at their next optimizer step and the run resumes from it. Enough for a "
            "step and a checkpoint upload; a pod whose run is over goes at once. "
            f"Omitted: {DEFAULT_TERMINATION_GRACE_SECONDS}."
        ),
    )

    @property
    def termination_grace_seconds(self) -> int:
        """The pods' grace period in effect."""
        return self.termination_grace_period_seconds or DEFAULT_TERMINATION_GRACE_SECONDS

    @model_validator(mode="after")
    def _limit_covers_request(self) -> Resources:
        check_cpu_limit(self.cpu_per_worker, self.cpu_limit_per_worker, "cpuLimitPerWorker", "cpuPerWorker")
        return self


class ConcurrencyPolicy(StrEnum):
    """What a new trigger does while a run is active (as CronJob's concurrencyPolicy)."""

    FORBID = "Forbid"
    REPLACE = "Replace"
    QUEUE = "Queue"


class PromotionGate(ContractModel):
    """When a finished run may be promoted to the deployments that follow this job."""

    enabled: bool = Field(default=True, description="Promote runs that pass the gate.")
    metric: Metric | None = Field(
        default=None, description="Test metric the gate checks; the search metric when omitted."
    )
    min_improvement: float = Field(
        default=0.0,
        description=(
            "How much the fine-tuned model must beat the base model on the metric, in the "
            "metric's direction (accuracy 0.02 is two points; loss 0.1 is 0.1 lower)."
        ),
    )
    min_value: float | None = Field(
        default=None,
        description=(
            "Absolute bound the metric must reach (at least this for accuracy/f1, at most for loss/perplexity)."
        ),
    )
    require_compressed: bool = Field(
        default=False, description="Also require a compressed variant within compression.maxAccuracyDrop."
    )
    min_baseline_improvement: float | None = Field(
        default=None,
        description=(
            "How much the fine-tuned model must beat the run's classical baseline (TF-IDF or pixels with "
            "logistic regression, trained on the same split; status metricsBaseline) on the metric, in the "
            "metric's direction; 0 asks for at least the baseline's value. Omitted: not checked. Classification "
            "only: a causal-lm run has no baseline, so it would never pass."
        ),
    )


_GPU_RULES = (
    cel_rule(
        "!has(self.method) || self.method.type != 'qlora' || (has(self.resources) && self.resources.gpusPerWorker > 0)",
        "method qlora needs GPUs: set resources.gpusPerWorker",
        ".method.type",
    ),
    cel_rule(
        "!has(self.hyperparameters) || self.hyperparameters.precision != 'fp16'"
        " || (has(self.resources) && self.resources.gpusPerWorker > 0)",
        "precision fp16 needs GPUs: set resources.gpusPerWorker",
        ".hyperparameters.precision",
    ),
    cel_rule(
        "!has(self.resources) || !has(self.resources.gpuType) || self.resources.gpusPerWorker > 0",
        "resources.gpuType needs resources.gpusPerWorker > 0",
        ".resources.gpuType",
    ),
    cel_rule(
        "!has(self.method) || self.method.type != 'qlora' || !has(self.resources)"
        " || !has(self.resources.sharding) || self.resources.sharding != 'fsdp'",
        SHARDED_QLORA_MESSAGE,
        ".resources.sharding",
    ),
    cel_rule(
        metric_rule("promotion.metric"),
        f"promotion.metric {METRICS_MESSAGE}",
        ".promotion.metric",
    ),
)


# A cluster run writes its outputs where they outlive its pods. (Admission only: `kubetune run` takes a
# local path, and the operator checks it again before it starts a run.)
CLUSTER_OUTPUT_SCHEMES = ("s3://", "pvc://")
CLUSTER_OUTPUT_MESSAGE = (
    "output.uri must be s3:// or pvc:// on a cluster: a local path would be written to the Ray head's disk "
    "and lost with it"
)
CLUSTER_OUTPUT_RULE = cel_rule(
    " || ".join(f"self.output.uri.startsWith('{scheme}')" for scheme in CLUSTER_OUTPUT_SCHEMES),
    CLUSTER_OUTPUT_MESSAGE,
    ".output.uri",
)


def cluster_output_problem(uri: str) -> str | None:
    """Why a run on the cluster cannot write to `uri` (the admission rule, checked again); None when it can."""
    return None if uri.startswith(CLUSTER_OUTPUT_SCHEMES) else f"spec.output.uri: {CLUSTER_OUTPUT_MESSAGE}"


class FineTuneJobSpec(RunSpec):
    """A fine-tuning job: what to train (the run contract) and how to run it on the cluster."""

    model_config = with_cel(*RUN_SPEC_RULES, *_GPU_RULES, *SCHEDULE_RULES, CLUSTER_OUTPUT_RULE)

    resources: Resources = Field(default_factory=Resources, description="Workers, GPUs and placement of the run.")
    storage: StorageAccess | None = Field(default=None, description="Access to s3:// and hf:// locations.")
    queue_name: KubernetesName | None = Field(
        default=None,
        description="Kueue LocalQueue to admit runs through; runs are created suspended and Kueue starts them.",
    )
    backoff_limit: int = Field(
        default=2,
        ge=0,
        le=100,
        description="Retries of a failed run (RayJob backoffLimit); each resumes from the latest checkpoint.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Fail a run that takes longer than this (RayJob activeDeadlineSeconds); the operator's default "
        "(7 days unless its settings say otherwise) when omitted.",
    )
    schedule: str | None = Field(
        default=None,
        max_length=256,
        pattern=CRON_PATTERN,
        description="Cron schedule (e.g. '0 3 * * 0') that starts a new run; no scheduled runs when omitted.",
    )
    time_zone: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^[A-Za-z0-9_+/-]+$",
        description="IANA time zone of the schedule (e.g. Europe/Berlin); UTC when omitted.",
        json_schema_extra={"enum": list(TIME_ZONES)},
    )
    concurrency_policy: ConcurrencyPolicy = Field(
        default=ConcurrencyPolicy.FORBID,
        description=(
            "A trigger during an active run: Forbid skips it, Replace stops the active run, Queue runs it next."
        ),
    )
    suspend: bool = Field(default=False, description="While true, no new run starts; an active run continues.")
    history_limit: int = Field(default=10, ge=1, le=100, description="Finished runs kept in status.runs.")
    promotion: PromotionGate = Field(default_factory=PromotionGate, description="Quality gate for promotion.")

    @field_validator("schedule")
    @classmethod
    def _valid_cron(cls, value: str | None) -> str | None:
        return None if value is None else schedule_fires(check_cron(value))

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            check_time_zone(value)
        return value

    @model_validator(mode="after")
    def _cluster_fits_method(self) -> FineTuneJobSpec:
        gpus = self.resources.gpus_per_worker
        if self.method.type == MethodType.QLORA and gpus == 0:
            raise ValueError("method.type qlora needs GPUs: set resources.gpusPerWorker")
        if self.hyperparameters.precision == Precision.FP16 and gpus == 0:
            raise ValueError("hyperparameters.precision fp16 needs GPUs: set resources.gpusPerWorker")
        if self.method.type == MethodType.QLORA and self.resources.sharding == Sharding.FSDP:
            raise ValueError(SHARDED_QLORA_MESSAGE)
        if self.resources.gpu_type is not None and gpus == 0:
            raise ValueError("resources.gpuType needs resources.gpusPerWorker > 0")
        if self.promotion.metric is not None:
            allowed = allowed_metrics(self.model.task, self.method.resolved_objective)
            if self.promotion.metric not in allowed:
                raise ValueError(
                    f"promotion.metric {self.promotion.metric.value} does not apply to {self.model.task.value} "
                    f"with objective {self.method.resolved_objective.value}; "
                    f"use one of {', '.join(sorted(m.value for m in allowed))}"
                )
        return self


class JobPhase(StrEnum):
    # A GPU run is planned on CPU first (its memory per GPU, from the model's config.json): no RayJob yet.
    PLANNING = "Planning"
    PENDING = "Pending"
    RUNNING = "Running"
    RETRYING = "Retrying"
    WAITING = "Waiting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID = "Invalid"


ACTIVE_PHASES = frozenset(
    {JobPhase.PLANNING, JobPhase.PENDING, JobPhase.RUNNING, JobPhase.RETRYING, JobPhase.WAITING, JobPhase.SUSPENDED}
)
FINISHED_PHASES = frozenset({JobPhase.SUCCEEDED, JobPhase.FAILED})


class Trigger(StrEnum):
    """Why a run started."""

    SPEC_CHANGE = "SpecChange"
    SCHEDULE = "Schedule"
    ANNOTATION = "Annotation"


class RunFailure(StrEnum):
    """Why kubetune itself failed a run (rather than Ray or KubeRay)."""

    NAME_CONFLICT = "NameConflict"  # an object with a name the run needs exists and is not the job's
    INVALID_SPEC = "InvalidSpec"  # the run found the spec cannot work (its report names the field): no retries
    DEADLINE_EXCEEDED = "DeadlineExceeded"  # activeDeadlineSeconds passed (KubeRay stopped it)
    SUBMISSION_FAILED = "SubmissionFailed"  # KubeRay could not submit the job to its Ray cluster
    RAY_JOB_REJECTED = "RayJobRejected"  # KubeRay refused the RayJob (ValidationFailed)
    # The model hub (or its mirror) could not deliver the model, or offline mode found it in no cache:
    # retried within backoffLimit, this is how the last try ended.
    MODEL_UNAVAILABLE = "ModelUnavailable"
    # Object storage (s3://) did not answer or was busy: retried within backoffLimit, this is how the last try ended.
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    # The plan Job (CPU) failed every try: no plan, so no GPUs were requested.
    PLAN_FAILED = "PlanFailed"


class WaitReason(StrEnum):
    """Why an active run makes no progress: what it waits for."""

    UNSCHEDULABLE = "Unschedulable"  # a pod fits no node (GPU type, resources, taints)
    IMAGE_PULL_FAILED = "ImagePullFailed"  # a pod cannot pull its image
    POD_CONFIG_ERROR = "PodConfigError"  # a pod cannot start its container (a missing Secret or key)
    QUEUED = "Queued"  # suspended until Kueue admits it


class GateReason(StrEnum):
    """Why a finished run passed the promotion gate or not."""

    PASSED = "Passed"
    RUN_NOT_SUCCEEDED = "RunNotSucceeded"
    PROMOTION_DISABLED = "PromotionDisabled"
    METRIC_MISSING = "MetricMissing"
    METRIC_NOT_FINITE = "MetricNotFinite"
    IMPROVEMENT_TOO_SMALL = "ImprovementTooSmall"
    OUT_OF_BOUND = "OutOfBound"
    NO_COMPRESSED_VARIANT = "NoCompressedVariant"
    BASELINE_MISSING = "BaselineMissing"
    BASELINE_NOT_BEATEN = "BaselineNotBeaten"
    BENCHMARK_DROPPED = "BenchmarkDropped"


class GateResult(WireModel):
    """The promotion gate's verdict on a finished run."""

    passed: bool = Field(description="Whether the run may be promoted.")
    reason: GateReason = Field(description="Why it passed or not (Passed, ImprovementTooSmall, OutOfBound, ...).")
    metric: Metric | None = Field(default=None, description="The test metric the gate checked.")
    value: FiniteOrNull = Field(default=None, description="The fine-tuned model's value of the metric.")
    baseline: FiniteOrNull = Field(default=None, description="The base model's value of the metric.")
    classical_baseline: FiniteOrNull = Field(
        default=None,
        description="The classical baseline's value of the metric, when promotion.minBaselineImprovement is set.",
    )
    message: Message = Field(default="", description="The verdict in words.")


class RayJobState(WireModel):
    """The last observed status of the run's RayJob, kept because KubeRay may delete it."""

    name: ShortText = Field(description="Name of the RayJob.")
    job_status: ShortText | None = Field(
        default=None, description="RayJob status.jobStatus (PENDING, RUNNING, SUCCEEDED, ...)."
    )
    job_deployment_status: ShortText | None = Field(
        default=None, description="RayJob status.jobDeploymentStatus (Initializing, Running, Complete, ...)."
    )
    reason: ShortText | None = Field(default=None, description="RayJob status.reason.")
    message: Message | None = Field(default=None, description="RayJob status.message (cut: Ray puts driver logs here).")
    failed: int | None = Field(default=None, description="Failed attempts (RayJob status.failed).")
    succeeded: int | None = Field(default=None, description="Succeeded attempts (RayJob status.succeeded).")


class RunRecord(WireModel):
    """One run of the job: why it started, how it went, what it produced."""

    number: int = Field(ge=1, description="Run number, counting from 1.")
    ray_job_name: ShortText = Field(description="Name of the run's RayJob.")
    trigger: Trigger = Field(description="SpecChange, Schedule or Annotation.")
    trigger_detail: ShortText | None = Field(
        default=None, description="The generation, scheduled time or annotation value."
    )
    spec_generation: int = Field(ge=0, description="metadata.generation of the spec the run uses.")
    trigger_hash: ShortText | None = Field(
        default=None,
        description="Hash of the run-relevant part of that spec: a spec whose hash differs from the latest run's "
        "starts a run.",
    )
    # Kept in the schema so that the API server does not prune it from a status written before the rename:
    # read as triggerHash, never written.
    spec_hash: ShortText | None = Field(
        default=None, exclude=True, description="Deprecated: triggerHash, as operators before its rename wrote it."
    )
    phase: JobPhase = Field(
        description="Planning, Pending, Running, Retrying, Waiting, Suspended, Succeeded or Failed."
    )
    message: Message | None = Field(default=None, description="Why the run is in this phase.")
    failure: RunFailure | None = Field(
        default=None,
        description=(
            "Why the run failed, when kubetune or KubeRay says more than RunFailed (e.g. DeadlineExceeded, "
            "InvalidSpec, ModelUnavailable, StorageUnavailable, PlanFailed)."
        ),
    )
    waiting: WaitReason | None = Field(
        default=None,
        description="What an active run waits for (Unschedulable, ImagePullFailed, PodConfigError, Queued).",
    )
    start_time: datetime | None = Field(default=None, description="When the run was created.")
    completion_time: datetime | None = Field(default=None, description="When the run finished.")
    ray_job: RayJobState | None = Field(default=None, description="Last observed RayJob status.")
    plan: RunPlan | None = Field(
        default=None,
        description="What the plan made on CPU before a GPU run found: memory per GPU, fit, speed, auto values.",
    )
    progress: RunProgress | None = Field(default=None, description="Latest progress report.")
    metrics_before: dict[str, float] | None = Field(default=None, description="Base-model test metrics.")
    metrics_after: dict[str, float] | None = Field(default=None, description="Fine-tuned test metrics.")
    metrics_baseline: dict[str, float] | None = Field(
        default=None,
        description="Test metrics of the classical baseline trained on the same split (see baselineModel).",
    )
    baseline_model: ShortText | None = Field(
        default=None,
        description="The classical baseline (tfidf-logistic-regression, pixels-logistic-regression), when measured.",
    )
    baseline_skipped: Message | None = Field(
        default=None, description="Why the run has no classical baseline (a causal-lm run, say)."
    )
    not_finite: list[ShortText] | None = Field(
        default=None,
        max_length=3 * MAX_METRICS,
        description="Metrics the run reported as NaN or infinite, e.g. metricsAfter.loss (JSON cannot hold them).",
    )
    artifacts: dict[str, str] | None = Field(
        default=None, max_length=MAX_ARTIFACTS, description="Exported variant name to URI."
    )
    best_variant: ShortText | None = Field(
        default=None, description="The variant the run chose to serve (what `best` resolves to)."
    )
    manifest_uri: str | None = Field(
        default=None, max_length=URI_MAX_LENGTH, description="URI of the run's kubetune.json manifest."
    )
    best_hyperparameters: JsonObject | None = Field(
        default=None,
        description="Hyperparameters of the best search trial.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    decisions: Decisions | None = Field(
        default=None,
        description="The values the run chose for the spec's auto fields (batchSize: auto, ...), and why.",
    )
    gate: GateResult | None = Field(default=None, description="The promotion gate's verdict, once the run finished.")
    promotable: bool | None = Field(
        default=None, description="Whether the run passed the promotion gate (gate.passed)."
    )

    @model_validator(mode="before")
    @classmethod
    def _read_spec_hash(cls, data: Any) -> Any:
        """A record written before triggerHash was renamed holds it as specHash: read it as triggerHash."""
        if not isinstance(data, dict) or not {"specHash", "spec_hash"} & data.keys():
            return data
        old = data.get("specHash", data.get("spec_hash"))
        data = {key: value for key, value in data.items() if key not in ("specHash", "spec_hash")}
        if data.get("triggerHash", data.get("trigger_hash")) is None:
            data["triggerHash"] = old
        return data

    def judged(self, verdict: GateResult) -> RunRecord:
        """This record with the gate's verdict (and `promotable`, which mirrors it)."""
        return self.model_copy(update={"gate": verdict, "promotable": verdict.passed})


class FineTuneJobStatus(WireModel):
    """Observed state, computed by the operator from the runs it sees."""

    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
    phase: JobPhase | None = Field(default=None, description="Summary of the current or latest run.")
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        description="Ready, Progressing, Degraded, Succeeded and Failed conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    current_run: int | None = Field(default=None, description="Number of the active run, if any.")
    runs: list[RunRecord] | None = Field(default=None, max_length=100, description="Recent runs, newest last.")
    promoted_run: int | None = Field(default=None, description="Number of the latest run that passed the gate.")
    best_metric: ShortText | None = Field(
        default=None, description="The promoted run's gate metric, e.g. 'accuracy=0.91'."
    )
    last_schedule_time: datetime | None = Field(default=None, description="Latest scheduled time that started a run.")
    handled_retrain: ShortText | None = Field(
        default=None, description=f"Latest value of the {RETRAIN_ANNOTATION} annotation that started a run."
    )


class FineTuneJob(ContractModel):
    """A FineTuneJob fine-tunes a Hugging Face model on Ray, evaluates and compresses it, and promotes the result."""

    api_version: str = Field(default="kubetune.io/v1alpha1", description="kubetune.io/v1alpha1")
    kind: str = Field(default=KIND, description=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict, description="Standard object metadata.")
    spec: FineTuneJobSpec = Field(description="What to fine-tune and how to run it.")
    status: FineTuneJobStatus | None = Field(default=None, description="Observed state (written by the operator).")

    @field_validator("metadata")
    @classmethod
    def _valid_name(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_object_metadata(value)
