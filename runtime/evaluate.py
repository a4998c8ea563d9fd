"""Batched evaluation of any task's model, and classification metrics from counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .contract import Objective, Task
from .data.load import Examples
from .data.task_ops import NOT_MODEL_INPUTS, TaskOps, classification_metrics_from_totals, task_ops, totals_size


@dataclass
class ConfusionCounts:
    """Per-class true positives, false positives and false negatives, plus loss totals.

    Counts from several workers add up (see `as_tensor`/`from_tensor`), so metrics over
    a sharded validation set equal those over the whole set.
    """

    true_positive: list[float]
    false_positive: list[float]
    false_negative: list[float]
    loss_sum: float = 0.0
    examples: float = 0.0

    @classmethod
    def empty(cls, num_labels: int) -> ConfusionCounts:
        return cls([0.0] * num_labels, [0.0] * num_labels, [0.0] * num_labels)

    def add(self, predicted: Sequence[int], expected: Sequence[int], loss_sum: float = 0.0) -> None:
        for guess, truth in zip(predicted, expected, strict=True):
            if guess == truth:
                self.true_positive[truth] += 1
            else:
                self.false_positive[guess] += 1
                self.false_negative[truth] += 1
        self.loss_sum += loss_sum
        self.examples += len(expected)

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor(
            [*self.true_positive, *self.false_positive, *self.false_negative, self.loss_sum, self.examples],
            dtype=torch.float64,
        )

    @classmethod
    def from_tensor(cls, values: torch.Tensor, num_labels: int) -> ConfusionCounts:
        items = values.tolist()
        n = num_labels
        return cls(items[:n], items[n : 2 * n], items[2 * n : 3 * n], items[3 * n], items[3 * n + 1])

    def metrics(self) -> dict[str, float]:
        return classification_metrics_from_totals(self.as_tensor(), len(self.true_positive))


def classification_metrics(predicted: Sequence[int], expected: Sequence[int], num_labels: int) -> dict[str, float]:
    """accuracy and macro-F1 of predictions against the expected label ids."""
    counts = ConfusionCounts.empty(num_labels)
    counts.add(predicted, expected)
    metrics = counts.metrics()
    return {"accuracy": metrics["accuracy"], "f1": metrics["f1"]}


def forward_logits(model: nn.Module, inputs: dict[str, torch.Tensor], **options: Any) -> torch.Tensor:
    """The model's logits for encoded inputs (without the labels, so the model computes no loss of its own);
    `options` go to the forward pass as they are."""
    features = {name: value for name, value in inputs.items() if name not in NOT_MODEL_INPUTS}
    logits: torch.Tensor = model(**features, **options).logits
    return logits


@dataclass(frozen=True)
class Evaluation:
    """Summed totals (see `TaskOps.totals`), the metrics from them, and predicted label ids."""

    totals: torch.Tensor
    metrics: dict[str, float]
    predictions: list[int]


@torch.no_grad()
def run_evaluation(
    model: nn.Module,
    processor: Any,
    ops: TaskOps,
    examples: Examples,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | None = None,
    size: int | None = None,
) -> Evaluation:
    """Evaluate `model` on `examples` in batches, in eval mode (restoring the training mode after)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    totals: torch.Tensor | None = None
    predictions: list[int] = []
    for start in range(0, len(examples), batch_size):
        batch = ops.encode(processor, examples.subset(range(start, min(start + batch_size, len(examples)))), max_length)
        batch = {name: value.to(device) for name, value in batch.items()}
        logits = forward_logits(model, batch)
        part = ops.totals(logits, batch)
        totals = part if totals is None else totals + part
        predictions.extend(ops.predictions(logits))
    model.train(was_training)
    if totals is None:  # no examples (an empty shard): totals that add nothing
        totals = torch.zeros(size or 0, dtype=torch.float64)
    return Evaluation(totals, ops.metrics(totals) if len(examples) else {}, predictions)


def evaluate_task(
    model: nn.Module,
    processor: Any,
    task: Task,
    examples: Examples,
    num_labels: int,
    max_length: int,
    batch_size: int = 32,
    objective: Objective = Objective.SFT,
) -> dict[str, float]:
    """Test metrics of `model` for `task`: accuracy, f1, loss (classification) or loss, perplexity (causal LM),
    and for a preference objective also preferenceAccuracy and rewardMargin."""
    ops = task_ops(task, num_labels, objective)
    return run_evaluation(
        model, processor, ops, examples, max_length, batch_size, size=totals_size(task, num_labels, objective)
    ).metrics


@dataclass(frozen=True)
class Predictions:
    label_ids: list[int]
    loss_sum: float


def predict(
    model: nn.Module,
    tokenizer: Any,
    examples: Examples,
    max_length: int,
    batch_size: int = 32,
    device: torch.device | None = None,
) -> Predictions:
    """Predicted label ids of a text classifier for every example, and the summed cross-entropy."""
    config: Any = getattr(model, "config", None)
    num_labels = int(config.num_labels) if config is not None else 2
    ops = task_ops(Task.TEXT_CLASSIFICATION, num_labels)
    result = run_evaluation(model, tokenizer, ops, examples, max_length, batch_size, device)
    loss_sum = float(result.totals[3 * num_labels]) if len(result.totals) else 0.0
    return Predictions(result.predictions, loss_sum)


def evaluate(
    model: nn.Module, tokenizer: Any, examples: Examples, num_labels: int, max_length: int, batch_size: int = 32
) -> dict[str, float]:
    """accuracy, f1 and loss of a text classifier on `examples`."""
    return evaluate_task(model, tokenizer, Task.TEXT_CLASSIFICATION, examples, num_labels, max_length, batch_size)
