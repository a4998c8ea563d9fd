"""Write, compress and measure every variant of a fine-tuned model.

`full` is the model as trained (for adapter methods: the peft adapter); `merged` folds
the adapter into the base weights; `int8` and `pruned` are compressed from the plain
model (merged or full). Each is measured from what was written to disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .compress import (
    judge,
    latency_ms_p50,
    load_variant,
    prune_folder,
    quantize_folder,
    weights_size,
)
from .contract import MethodType, PruningMethod, QuantizationMethod, RunSpec
from .data import TaskData
from .evaluate import evaluate_task
from .export import VARIANTS_FOLDER, ExportedVariant, VariantFormat, export_variants, merged_copy, wants_merged

EVALUATION_BATCH_SIZE = 32
COMPRESSED = frozenset({"int8", "pruned"})


@dataclass(frozen=True)
class VariantContext:
    spec: RunSpec
    data: TaskData
    reference: dict[str, float]  # test metrics of the fine-tuned model


def _metrics(model: nn.Module, processor: Any, context: VariantContext) -> dict[str, float]:
    spec = context.spec
    return evaluate_task(
        model,
        processor,
        spec.model.task,
        context.data.test,
        len(context.data.labels),
        spec.hyperparameters.max_sequence_length,
        EVALUATION_BATCH_SIZE,
    )


def _measure(
    variant: ExportedVariant, model: nn.Module, processor: Any, context: VariantContext, metrics: dict[str, float]
) -> None:
    spec = context.spec
    variant.metrics = metrics
    variant.size_bytes = weights_size(variant.folder)
    variant.latency_ms_p50 = latency_ms_p50(
        model, processor, spec.model.task, context.data.test, spec.hyperparameters.max_sequence_length
    )
    if variant.name in COMPRESSED:
        verdict = judge(spec.model.task, context.reference, metrics, spec.compression.max_accuracy_drop)
        variant.accepted, variant.reason = verdict.accepted, verdict.reason


def _reloaded(variant: ExportedVariant, context: VariantContext) -> nn.Module:
    return load_variant(variant.folder, context.spec.model.task)


def build_variants(model: nn.Module, processor: Any, root: Path, context: VariantContext) -> list[ExportedVariant]:
    """Export `full` (and `merged`), then the compressed variants the spec asks for; measure them all."""
    spec = context.spec
    merged = merged_copy(model) if wants_merged(spec) else None
    variants = export_variants(model, processor, spec, root, merged)
    full = variants[0]
    _measure(full, model, processor, context, context.reference)
    plain = full
    if merged is not None:
        plain = variants[1]
        reloaded = _reloaded(plain, context)
        _measure(plain, reloaded, processor, context, _metrics(reloaded, processor, context))
    if spec.method.type == MethodType.QLORA:
        return variants  # a 4-bit base has no plain float model to compress
    compression = spec.compression
    base = root / VARIANTS_FOLDER
    if compression.quantization.method != QuantizationMethod.NONE:
        int8 = ExportedVariant("int8", base / "int8", VariantFormat.TORCHAO)
        quantize_folder(plain.folder, int8.folder, spec.model.task, compression)
        reloaded = _reloaded(int8, context)
        _measure(int8, reloaded, processor, context, _metrics(reloaded, processor, context))
        variants.append(int8)
    if compression.pruning.method == PruningMethod.MAGNITUDE:
        pruned = ExportedVariant("pruned", base / "pruned", VariantFormat.HF)
        prune_folder(plain.folder, pruned.folder, spec.model.task, compression.pruning.amount)
        reloaded = _reloaded(pruned, context)
        _measure(pruned, reloaded, processor, context, _metrics(reloaded, processor, context))
        variants.append(pruned)
    return variants
