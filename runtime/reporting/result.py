"""What a finished run produced: metrics before and after, every variant, and where each artifact lives."""

from __future__ import annotations

from typing import Any

from kubetune.runtime.contract.report import VariantReport
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class RunResult(BaseModel):
    """The outcome of `run_pipeline`, in the shape the operator copies into the run's status."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    metrics_before: dict[str, float] = Field(description="Test metrics of the base model.")
    metrics_after: dict[str, float] = Field(description="Test metrics of the fine-tuned model.")
    validation: dict[str, float] = Field(default_factory=dict, description="Best validation metrics in training.")
    artifacts: dict[str, str] = Field(description="Exported variant name to URI.")
    variants: dict[str, VariantReport] = Field(
        default_factory=dict, description="Every exported variant: size, latency, metrics, accepted or why not."
    )
    best_variant: str | None = Field(default=None, description="The variant serving's `best` resolves to.")
    manifest_uri: str = Field(description="URI of the kubetune.json manifest.")
    tensorboard_uri: str | None = Field(default=None, description="Folder of the TensorBoard event files.")
    spec_digest: str = Field(description="sha256 (64 hex digits) of the canonical RunSpec JSON.")
    steps: int = Field(default=0, description="Optimizer steps taken.")
    epochs: float = Field(default=0.0, description="Epochs trained (fractional when stopped early).")
    stopped_early: bool = Field(default=False, description="Whether early stopping ended training.")
    resumed_from_step: int | None = Field(
        default=None, description="Optimizer step of the checkpoint training resumed from after a failure."
    )
    trials: int | None = Field(default=None, description="Search trials run, when the spec has a search.")
    best_hyperparameters: dict[str, Any] | None = Field(default=None, description="The best trial's settings.")
