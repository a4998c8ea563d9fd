"""Load an exported variant to serve it."""

from __future__ import annotations

from pathlib import Path

from kubetune.runtime.contract import Task
from kubetune.runtime.data.task_ops import auto_class
from torch import nn

from .int8 import use_int8_kernels


def load_variant(folder: Path, task: Task) -> nn.Module:
    """An exported variant, ready to serve on CPU: int8 layers run on CPU int8 kernels (see int8.use_int8_kernels)."""

    model: nn.Module = auto_class(task).from_pretrained(folder)
    model.eval()
    use_int8_kernels(model)  # a no-op for float models and for int8 weights off the CPU
    return model
