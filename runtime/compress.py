"""Compressed variants of the fine-tuned model: int8 (torchao), magnitude pruning; and how to measure one.

Every variant is written as a Hugging Face folder and measured from what was written:
size on disk, latency on CPU as served (median over a fixed batch) and the test metrics of the
reloaded model. A variant is accepted only within `compression.maxAccuracyDrop`.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .contract import Compression, QuantizationMethod, Task
from .contract.report import VariantReport
from .data import Examples
from .evaluate import forward_logits
from .models import auto_class
from .tasks import task_ops

# The fixed batch latency is measured on, and how often.
LATENCY_BATCH = 16
LATENCY_WARMUP = 3
LATENCY_RUNS = 10
# Weight files copied next to a variant's weights so it loads on its own.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


def copy_processor_files(source: Path, target: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


def int8_config(compression: Compression, model: nn.Module) -> Any:
    """The torchao config of the spec's int8 method for `model`'s linear (and embedding) weights.

    Keys are parameter names: keyed by module, a reloaded model would also load biases as int8.
    """
    from torchao.quantization import (  # type: ignore[import-untyped]
        FqnToConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerAxis  # type: ignore[import-untyped]

    quantization = compression.quantization
    linear: Any = (
        Int8DynamicActivationInt8WeightConfig()
        if quantization.method == QuantizationMethod.INT8_DYNAMIC
        else Int8WeightOnlyConfig()
    )
    # Embedding tables are often half of a small model; one scale per row keeps lookups accurate.
    embedding = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    by_parameter: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            by_parameter[f"{name}.weight"] = linear
        elif isinstance(module, nn.Embedding) and quantization.include_embeddings:
            by_parameter[f"{name}.weight"] = embedding
    return FqnToConfig(by_parameter)


def quantize_folder(source: Path, target: Path, task: Task, compression: Compression) -> None:
    """Write an int8 copy of the model in `source` to `target`, in a form transformers loads back.

    Quantizing in memory and saving fails for torchao tensors; loading through transformers'
    TorchAoConfig records the quantization in config.json, so `from_pretrained(target)` works.
    """
    from transformers import AutoConfig, TorchAoConfig

    auto = auto_class(task)
    with torch.device("meta"):  # module names only: no weights are read or allocated
        layout = auto.from_config(AutoConfig.from_pretrained(source))
    config = TorchAoConfig(int8_config(compression, layout), include_input_output_embeddings=True)
    model = auto.from_pretrained(source, quantization_config=config, dtype=torch.float32)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    copy_processor_files(source, target)


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


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a variant folder."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})


def latency_batch(examples: Examples) -> Examples:
    """The fixed batch: the first LATENCY_BATCH examples, repeated when there are fewer."""
    indices = [i % len(examples) for i in range(LATENCY_BATCH)]
    return examples.subset(indices)


def load_variant(folder: Path, task: Task) -> nn.Module:
    """An exported variant, ready to serve on CPU: int8 layers run on CPU int8 kernels (see int8_kernels)."""
    from .int8_kernels import use_int8_kernels

    model: nn.Module = auto_class(task).from_pretrained(folder)
    model.eval()
    use_int8_kernels(model)  # a no-op for float models and for int8 weights off the CPU
    return model


@torch.no_grad()
def latency_ms_p50(model: nn.Module, processor: Any, task: Task, examples: Examples, max_length: int) -> float:
    """Median milliseconds of one forward pass over the fixed batch, on the model's device.

    That is the CPU, as served, for every variant but a QLoRA adapter, whose 4-bit base stays on its GPU.
    """
    device = next(model.parameters()).device
    encoded = task_ops(task, 2).encode(processor, latency_batch(examples), max_length)
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
