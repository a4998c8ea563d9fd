"""The pruned variant: global magnitude pruning of the linear weights."""

from __future__ import annotations

from pathlib import Path

import torch
from kubetune.runtime.contract import Task
from kubetune.runtime.data.task_ops import auto_class
from torch import nn

from .export import copy_processor_files


def prune_folder(source: Path, target: Path, task: Task, amount: float) -> None:
    """Write a copy of `source` with the smallest `amount` of all linear weights (one global ranking) zeroed."""
    from torch.nn.utils import prune

    model = auto_class(task).from_pretrained(source, dtype=torch.float32)
    linears = [(module, "weight") for module in model.modules() if isinstance(module, nn.Linear)]
    prune.global_unstructured(linears, pruning_method=prune.L1Unstructured, amount=amount)
    for module, name in linears:
        prune.remove(module, name)  # type: ignore[no-untyped-call]  # make the zeros permanent: plain weights, no masks
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    copy_processor_files(source, target)


def sparsity(model: nn.Module) -> float:
    """Fraction of the linear-layer weights that are exactly zero."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total if total else 0.0
