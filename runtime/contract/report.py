"""What a run reports while it works and when it ends.

On a cluster the runtime writes this model as JSON under `REPORT_KEY` in the run's
report ConfigMap (the one object the run may patch); the operator mirrors it into
the FineTuneJob's status. Locally the console reporter renders the same model.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from .common import ErrorText, FiniteOrNull, JsonObject, Message, Metrics, ShortText, WireModel
from .decisions import Decisions

REPORT_KEY = "report.json"
# Written into every report; readers accept any version and ignore fields they do not know (and values
# of `unavailable` they do not know). Fields are added with defaults, within the same version.
REPORT_SCHEMA_VERSION = 1


class Stage(StrEnum):
    LOAD = "load"
    EVALUATE_BASE = "evaluate-base"
    TRAIN = "train"
    SEARCH = "search"
    EVALUATE = "evaluate"
    COMPRESS = "compress"
    EXPORT = "export"
    DONE = "done"
    FAILED = "failed"


class Unavailable(StrEnum):
    """What a failed run could not reach. Trying again later may help: the run is retried, not stopped."""

    # The Hugging Face Hub or its mirror (HF_ENDPOINT) did not answer, answered with a server error, or
    # offline mode (HF_HUB_OFFLINE) found the model (or an hf://datasets/ dataset) in no cache.
    MODEL_HUB = "ModelHub"
    # Object storage (s3://) did not answer, timed out, or answered with a server error or "slow down".
    STORAGE = "Storage"


def _known_or_none(value: Any) -> Any:
    """A value a newer runtime added reads as None: the failure is then an ordinary one (retried too)."""
    if isinstance(value, str) and value not in {item.value for item in Unavailable}:
        return None
    return value


class VariantReport(WireModel):
    """One exported variant and its measurements."""

    uri: str = Field(description="Where the variant's Hugging Face directory was written.")
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the weights on disk.")
    latency_ms_p50: FiniteOrNull = Field(default=None, ge=0, description="CPU latency, median over a fixed batch.")
    metrics: Metrics = Field(
        default_factory=dict, description="Test metrics of this variant (null: not a finite number)."
    )
    accepted: bool = Field(default=True, description="Within compression.maxAccuracyDrop of the fine-tuned model.")
    reason: Message | None = Field(default=None, description="Why the variant was rejected, when it was.")


class BaselineReport(WireModel):
    """A classical model trained in seconds on the run's training split and tested on its test split.

    What fine-tuning has to beat: TF-IDF + logistic regression for text, logistic regression on
    downsampled pixels for images. Its metrics are computed as the fine-tuned model's are.
    """

    model: ShortText | None = Field(
        default=None,
        description="The classical model (tfidf-logistic-regression, pixels-logistic-regression); null when skipped.",
    )
    metrics: Metrics = Field(
        default_factory=dict,
        description="Its test metrics, computed as the fine-tuned model's (null: not a finite number).",
    )
    train_examples: int | None = Field(default=None, ge=0, description="Training examples it was fitted on.")
    test_examples: int | None = Field(
        default=None, ge=0, description="Test examples it was measured on: the fine-tuned model's test split."
    )
    seconds: FiniteOrNull = Field(default=None, ge=0, description="Seconds it took to fit and test.")
    skipped: Message | None = Field(
        default=None, description="Why the run has no baseline (a causal-lm run, say), when it has none."
    )


class RunProgress(WireModel):
    """How far a run is: what the operator shows of a running job."""

    stage: Stage | None = Field(
        default=None, description="Pipeline stage: load, evaluate-base, train, search, evaluate, compress, export."
    )
    step: int | None = Field(default=None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: FiniteOrNull = Field(default=None, ge=0, description="Epochs done (fractional).")
    loss: FiniteOrNull = Field(default=None, description="Latest training loss (null when not a finite number).")
    trials_completed: int | None = Field(default=None, ge=0, description="Search trials finished.")
    trials_total: int | None = Field(default=None, ge=0, description="Search trials planned.")
    message: Message | None = Field(default=None, description="Latest progress message.")
    updated_at: datetime | None = Field(default=None, description="When the report was written.")


class RunReport(RunProgress):
    """Progress and result of one run, as the runtime last wrote them.

    The report of stage `done` is the run's result: what `run_pipeline` returns, and what the
    operator (or `kubetune run`) judges the promotion gate on.
    """

    schema_version: int = Field(
        default=REPORT_SCHEMA_VERSION, ge=1, description="Version of the report format the writer used."
    )
    stage: Stage = Field(description="The pipeline stage the run is in.")
    metrics_before: Metrics | None = Field(
        default=None, description="Base-model test metrics (null: not a finite number)."
    )
    metrics_after: Metrics | None = Field(
        default=None, description="Fine-tuned test metrics (null: not a finite number)."
    )
    baseline: BaselineReport | None = Field(
        default=None,
        description="The classical baseline trained on the same split, beside the base and fine-tuned models.",
    )
    variants: dict[str, VariantReport] | None = Field(default=None, description="Exported variants by name.")
    best_variant: ShortText | None = Field(default=None, description="The variant `best` resolves to.")
    manifest_uri: str | None = Field(default=None, description="URI of the kubetune.json manifest.")
    best_hyperparameters: JsonObject | None = Field(default=None, description="Best search trial's settings.")
    benchmark_metrics: list[ShortText] | None = Field(
        default=None,
        max_length=256,
        description=(
            "The names in metricsBefore, metricsAfter and each variant's metrics that are lm-evaluation-harness "
            "task metrics (<task>.<metric>; each improves upward), when evaluation.lmEval is set."
        ),
    )
    validation: Metrics | None = Field(
        default=None, description="Best validation metrics during training (null: not a finite number)."
    )
    tensorboard_uri: str | None = Field(default=None, description="Folder of the TensorBoard event files.")
    stopped_early: bool | None = Field(default=None, description="Whether early stopping ended training.")
    resumed_from_step: int | None = Field(
        default=None, ge=0, description="Optimizer step of the checkpoint training resumed from after a failure."
    )
    spec_digest: ShortText | None = Field(
        default=None, description="sha256 (64 hex digits) of the run's canonical RunSpec JSON, as in kubetune.json."
    )
    decisions: Decisions | None = Field(
        default=None,
        description="The values the run chose for the spec's auto fields (batchSize: auto, ...), and why.",
    )
    error: ErrorText | None = Field(default=None, description="Why the run failed (stage failed).")
    invalid_field: ShortText | None = Field(
        default=None,
        description=(
            "The spec field that makes the run impossible (e.g. resources.gpusPerWorker), when the run failed "
            "its own checks: trying again cannot help, so the run is not retried."
        ),
    )
    unavailable: Annotated[Unavailable | None, BeforeValidator(_known_or_none)] = Field(
        default=None,
        description=(
            "What the run could not reach when it failed (ModelHub): trying again later may help, so the run "
            "is retried within backoffLimit; `error` names the endpoint and what to do."
        ),
    )
