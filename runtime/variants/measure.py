"""How a variant is measured and judged: size on disk, CPU latency as served, the accuracy budget.

Every variant is written as a Hugging Face folder and measured from what was written:
size on disk, latency on CPU as served (median over a fixed batch) and the test metrics of the
reloaded model. A variant is accepted only within `compression.maxAccuracyDrop`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from kubetune.runtime.contract import Objective, Task
from kubetune.runtime.contract.report import VariantReport
from kubetune.runtime.data.load import Examples
from kubetune.runtime.data.task_ops import task_ops
from kubetune.runtime.evaluate import forward_logits
from torch import nn

# The fixed batch latency is measured on, and how often.
LATENCY_BATCH = 16
LATENCY_WARMUP = 3
LATENCY_RUNS = 10


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a variant folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})


def latency_batch(examples: Examples) -> Examples:
    """The fixed batch: the first LATENCY_BATCH examples, repeated when there are fewer."""
    indices = [i % len(examples) for i in range(LATENCY_BATCH)]
    return examples.subset(indices)


@torch.no_grad()
def latency_ms_p50(
    model: nn.Module,
    processor: Any,
    task: Task,
    examples: Examples,
    max_length: int,
    objective: Objective = Objective.SFT,
) -> float:
    """Median milliseconds of one forward pass over the fixed batch, on the model's device.

    That is the CPU, as served, for every variant but a QLoRA adapter, whose 4-bit base stays on its GPU.
    """
    device = next(model.parameters()).device
    encoded = task_ops(task, 2, objective).encode(processor, latency_batch(examples), max_length)
    inputs = {name: value.to(device) for name, value in encoded.items()}
    model.eval()

    def forward() -> None:
        forward_logits(model, inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # CUDA runs asynchronously: time the work, not its launch

    for _ in range(LATENCY_WARMUP):
        forward()
    timings = []
    for _ in range(LATENCY_RUNS):
        start = time.perf_counter()
        forward()
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str | None = None


def judge(task: Task, reference: dict[str, float], metrics: dict[str, float], max_drop: float) -> Verdict:
    """Accept a compressed variant within `max_drop`: accuracy points, or relative perplexity growth (causal LM)."""
    if task == Task.CAUSAL_LM:
        growth = metrics["perplexity"] / reference["perplexity"] - 1.0
        if growth > max_drop:
            return Verdict(False, f"perplexity grew by {growth:.2%}, more than maxAccuracyDrop {max_drop:.2%}")
        return Verdict(True)
    drop = reference["accuracy"] - metrics["accuracy"]
    if drop > max_drop + 1e-9:
        return Verdict(
            False, f"accuracy dropped by {drop * 100:.2f} points, more than maxAccuracyDrop {max_drop * 100:.2f}"
        )
    return Verdict(True)


# A compressed variant that serves this much slower than the uncompressed model is not
# the one to deploy, however small (e.g. weight-only int8, whose matmuls dequantize first).
MAX_SLOWDOWN = 1.5


def best_variant(variants: dict[str, VariantReport], compressed: Collection[str]) -> str:
    """The smallest accepted compressed variant that is not much slower than the uncompressed model.

    Else the merged model, else the fine-tuned one.
    """
    reference = "merged" if "merged" in variants else "full"
    base = variants[reference].latency_ms_p50 if reference in variants else None

    def fast_enough(name: str) -> bool:
        latency = variants[name].latency_ms_p50
        return base is None or latency is None or latency <= base * MAX_SLOWDOWN

    candidates = [name for name in variants if name in compressed and variants[name].accepted and fast_enough(name)]
    if candidates:
        return min(candidates, key=lambda name: variants[name].size_bytes or 0)
    return reference
