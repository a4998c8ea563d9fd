"""Training hyperparameters: the values a search may override."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from .common import ContractModel, cel_rule, with_cel


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
        )
    )

    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    epochs: int = Field(default=3, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int = Field(default=16, ge=1, le=65536, description="Examples per step on each worker.")
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
    precision: Precision = Field(
        default=Precision.FP32, description="fp32, or bf16/fp16 mixed precision (fp16 needs a GPU)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    max_sequence_length: int = Field(
        default=128, ge=8, le=131072, description="Token limit per example; longer examples are truncated."
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
        return self
