"""Optimizer and learning-rate schedule from the spec's hyperparameters."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from kubetune.runtime.contract import Hyperparameters, LrSchedule, Optimizer
from torch import nn

# Parameters whose names contain these are not decayed: shrinking biases and
# normalisation scales towards zero only hurts.
NO_DECAY_MARKERS = ("bias", "LayerNorm", "layernorm", "layer_norm", "norm.weight", "ln_")


def _decays(name: str, parameter: nn.Parameter) -> bool:
    return parameter.ndim > 1 and not any(marker in name for marker in NO_DECAY_MARKERS)


def build_optimizer(model: nn.Module, hp: Hyperparameters) -> torch.optim.Optimizer:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for name, p in trainable if _decays(name, p)], "weight_decay": hp.weight_decay},
        {"params": [p for name, p in trainable if not _decays(name, p)], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if hp.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, lr=hp.learning_rate, momentum=0.9)
    if hp.optimizer == Optimizer.ADAM:
        # Adam's weight_decay is L2 in the gradient; AdamW decouples it (the usual choice).
        return torch.optim.Adam(groups, lr=hp.learning_rate)
    return torch.optim.AdamW(groups, lr=hp.learning_rate)


def warmup_steps(hp: Hyperparameters, total_steps: int) -> int:
    if hp.warmup_steps is not None:
        return min(hp.warmup_steps, total_steps)
    return math.ceil(hp.warmup_ratio * total_steps)


def schedule_factor(hp: Hyperparameters, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at each optimizer step: warm-up, then the decay."""
    warmup = warmup_steps(hp, total_steps)
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / decay_steps)
        if hp.lr_schedule == LrSchedule.LINEAR:
            return 1.0 - progress
        if hp.lr_schedule == LrSchedule.COSINE:
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, hp: Hyperparameters, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(hp, total_steps))
