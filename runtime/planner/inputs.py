"""What a plan is made from: the model's shape, the method and the workload, as typed values."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kubetune.runtime.contract import Method, Objective, Optimizer, Precision, Sharding, Task

from .shape import ModelShape

# Objectives whose examples are pairs: each trains on two rows.
PAIRED_OBJECTIVES = frozenset({Objective.DPO, Objective.ORPO, Objective.SIMPO})


class DeviceKind(StrEnum):
    """Where the training runs; the kernels (attention, dropout masks) differ."""

    CUDA = "cuda"
    CPU = "cpu"


@dataclass(frozen=True)
class Topology:
    workers: int = 1
    gpus_per_worker: int = 1
    sharding: Sharding = Sharding.NONE

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("resources.workers must be at least 1")
        if self.gpus_per_worker < 1:
            raise ValueError("resources.gpusPerWorker must be at least 1")

    @property
    def devices(self) -> int:
        return self.workers * self.gpus_per_worker


@dataclass(frozen=True)
class PlanInput:
    """Everything the planner reads: no weights, no clock, no I/O."""

    shape: ModelShape
    task: Task
    method: Method
    batch_size: int
    sequence_length: int
    precision: Precision = Precision.FP32
    optimizer: Optimizer = Optimizer.ADAMW
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = 1
    labels: int = 2
    topology: Topology = field(default_factory=Topology)
    device: DeviceKind = DeviceKind.CUDA
    # For time and GPU-hours: tokens in the training set and passes over it.
    train_tokens: int | None = None
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("hyperparameters.batchSize must be at least 1")
        if self.sequence_length < 1:
            raise ValueError("hyperparameters.maxSequenceLength must be at least 1")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("hyperparameters.gradientAccumulationSteps must be at least 1")
        if self.labels < 1:
            raise ValueError("labels must be at least 1")

    @property
    def sequence(self) -> int:
        """Tokens per example: the patches and [CLS] for images, else the sequence length."""
        return self.shape.patches + 1 if self.shape.patches else self.sequence_length

    @property
    def rows_per_example(self) -> int:
        """Model rows per example: a preference pair runs its chosen and its rejected completion."""
        return 2 if self.method.resolved_objective in PAIRED_OBJECTIVES else 1

    @property
    def rows(self) -> int:
        """Rows in one forward pass of a micro-batch."""
        return self.batch_size * self.rows_per_example

    @property
    def tokens_per_batch(self) -> int:
        return self.rows * self.sequence
