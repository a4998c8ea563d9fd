"""Training hyperparameters: the values a search may override."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, StrictBool, WithJsonSchema, model_validator

from .common import ContractModel, cel_rule, with_cel

# The value of a field left to kubetune: the runtime resolves it before training (see `Decision`).
AUTO = "auto"
Auto = Literal["auto"]
_T = TypeVar("_T")
# Fields that take `auto`, by alias: what a resolved spec must no longer hold.
AUTO_FIELDS = ("batchSize", "maxSequenceLength", "precision", "gradientCheckpointing")


def _int_or_auto(minimum: int, maximum: int) -> WithJsonSchema:
    """CRD schema of a whole number or `auto`: int-or-string, the bounds for the number, the pattern for the text."""
    return WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "minimum": minimum,
            "maximum": maximum,
            "pattern": "^auto$",
        }
    )


# true, false or auto. The API server has no bool-or-string type, and no CEL rule on a field without one:
# the value is kept as written, and the enum admits exactly those three.
_BOOL_OR_AUTO_SCHEMA = WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True, "enum": [True, False, AUTO]})


class Optimizer(StrEnum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGD = "sgd"


class LrSchedule(StrEnum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


_PRECISION_OR_AUTO_SCHEMA = WithJsonSchema({"type": "string", "enum": [*(p.value for p in Precision), AUTO]})


class UnresolvedAutoError(ValueError):
    """A field still `auto` where a concrete value is needed: the runtime resolves every one before training."""

    def __init__(self, alias: str) -> None:
        self.field = f"hyperparameters.{alias}"
        super().__init__(f"{self.field} is still auto: it is resolved before training, and was not")


def _concrete(alias: str, value: _T | Auto, kind: type[_T]) -> _T:
    if isinstance(value, kind) and value != AUTO:
        return value
    raise UnresolvedAutoError(alias)


class EarlyStopping(ContractModel):
    """Stop training when the validation metric stops improving."""

    patience: int = Field(
        default=2, ge=1, le=1000, description="Evaluations without improvement before training stops."
    )
    min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest change of the metric that counts as an improvement."
    )


class Hyperparameters(ContractModel):
    """Optimisation settings of one training run."""

    model_config = with_cel(
        cel_rule(
            "!(has(self.warmupSteps) && has(self.warmupRatio) && self.warmupRatio > 0.0)",
            "set warmupSteps or warmupRatio, not both",
            ".warmupSteps",
        ),
        cel_rule(
            "!has(self.effectiveBatchSize) || (has(self.batchSize) && type(self.batchSize) == string)",
            "effectiveBatchSize applies to batchSize auto only",
            ".effectiveBatchSize",
        ),
        cel_rule(
            "!has(self.sequenceLengthQuantile)"
            " || (has(self.maxSequenceLength) && type(self.maxSequenceLength) == string)",
            "sequenceLengthQuantile applies to maxSequenceLength auto only",
            ".sequenceLengthQuantile",
        ),
    )

    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the training data.")
    batch_size: Annotated[int, Field(ge=1, le=65536)] | Auto = Field(
        default=16,
        description="Examples per step on each worker, or auto: the largest batch that fits the device's memory.",
        json_schema_extra=_int_or_auto(1, 65536).json_schema,
    )
    effective_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1048576,
        description=(
            "With batchSize auto: examples per optimizer update that gradientAccumulationSteps keeps, whatever "
            "batch fits (accumulation = ceil(effectiveBatchSize / (batch x devices)))."
        ),
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Steps whose gradients are summed before each optimizer update.",
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Decoupled weight decay (not applied to biases and norms)."
    )
    warmup_ratio: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Fraction of the optimizer steps spent warming up the learning rate."
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, description="Warm-up length in optimizer steps; instead of warmupRatio."
    )
    optimizer: Optimizer = Field(default=Optimizer.ADAMW, description="adamw, adam or sgd.")
    lr_schedule: LrSchedule = Field(
        default=LrSchedule.LINEAR, description="Decay after warm-up: constant, linear or cosine."
    )
    max_grad_norm: float | None = Field(
        default=1.0, gt=0.0, description="Clip gradients to this global norm; omit to disable."
    )
    precision: Annotated[Precision | Auto, _PRECISION_OR_AUTO_SCHEMA] = Field(
        default=Precision.FP32,
        description="fp32, or bf16/fp16 mixed precision (fp16 needs a GPU), or auto: bf16 where the GPU has it.",
    )
    gradient_checkpointing: Annotated[StrictBool | Auto, _BOOL_OR_AUTO_SCHEMA] = Field(
        default=False,
        description=(
            "Recompute activations in the backward pass to save memory: true, false, or auto (on only when "
            "without it not even batch 1 fits)."
        ),
    )
    max_sequence_length: Annotated[int, Field(ge=8, le=131072)] | Auto = Field(
        default=128,
        description=(
            "Token limit per example; longer examples are truncated. auto: a quantile of the training "
            "examples' token lengths (sequenceLengthQuantile), within the model's positions."
        ),
        json_schema_extra=_int_or_auto(8, 131072).json_schema,
    )
    sequence_length_quantile: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="With maxSequenceLength auto: the share of training examples it covers untruncated (default 0.95).",
    )
    early_stopping: EarlyStopping | None = Field(
        default=None,
        description="Stop early when the search/validation metric stops improving.",
    )
    evaluations_per_epoch: int = Field(
        default=1, ge=1, le=100, description="Validation passes (and checkpoints) per epoch."
    )
    seed: int = Field(default=42, ge=0, description="Seed for weight initialisation, shuffling and dropout.")

    @model_validator(mode="after")
    def _one_warmup(self) -> Hyperparameters:
        if self.warmup_steps is not None and self.warmup_ratio > 0.0:
            raise ValueError("set warmupSteps or warmupRatio, not both")
        if self.effective_batch_size is not None and self.batch_size != AUTO:
            raise ValueError("effectiveBatchSize applies to batchSize auto only")
        if self.sequence_length_quantile is not None and self.max_sequence_length != AUTO:
            raise ValueError("sequenceLengthQuantile applies to maxSequenceLength auto only")
        return self

    # What training reads: the concrete values, after the runtime resolved `auto` (see `auto_fields`).
    @property
    def resolved_batch_size(self) -> int:
        return _concrete("batchSize", self.batch_size, int)

    @property
    def resolved_max_sequence_length(self) -> int:
        return _concrete("maxSequenceLength", self.max_sequence_length, int)

    @property
    def resolved_precision(self) -> Precision:
        return _concrete("precision", self.precision, Precision)

    @property
    def resolved_gradient_checkpointing(self) -> bool:
        return _concrete("gradientCheckpointing", self.gradient_checkpointing, bool)

    def auto_fields(self) -> list[str]:
        """The aliases of the fields left to kubetune (`auto`), in AUTO_FIELDS' order."""
        wire: dict[str, Any] = self.model_dump(by_alias=True)
        return [alias for alias in AUTO_FIELDS if wire[alias] == AUTO]
