"""Write, compress and measure every variant of a fine-tuned model.

`full` is the model as trained (for adapter methods: the peft adapter); `merged` folds
the adapter into the base weights; `int8` and `pruned` are compressed from the plain
model (merged or full). Each is measured from what was written to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.runtime.benchmarks import benchmark_metrics
from kubetune.runtime.contract import MethodType, PruningMethod, QuantizationMethod, RunSpec
from kubetune.runtime.data.load import TaskData
from kubetune.runtime.evaluate import evaluate_task
from kubetune.runtime.io.settings import RuntimeSettings
from torch import nn

from .export import ExportedVariant, VariantFormat, export_variants, merged_copy, variant_folder, wants_merged
from .int8 import quantize_folder
from .load import load_variant
from .measure import judge, latency_ms_p50, weights_size
from .pruning import prune_folder

EVALUATION_BATCH_SIZE = 32
COMPRESSED = frozenset({"int8", "pruned"})


@dataclass(frozen=True)
class VariantContext:
    spec: RunSpec
    data: TaskData
    reference: dict[str, float]  # test metrics of the fine-tuned model
    settings: RuntimeSettings | None = None  # where a benchmark task folder is read from
    # Told about each variant once it is written and measured (the console shows compression as it goes).
    measured: Callable[[ExportedVariant], None] = field(default=lambda variant: None)


def test_metrics(
    model: nn.Module, processor: Any, spec: RunSpec, data: TaskData, settings: RuntimeSettings | None
) -> dict[str, float]:
    """The model's metrics on the test split, as every stage of the run measures them, and its benchmark
    metrics (evaluation.lmEval) beside them."""
    metrics = evaluate_task(
        model,
        processor,
        spec.model.task,
        data.test,
        len(data.labels),
        spec.hyperparameters.resolved_max_sequence_length,
        EVALUATION_BATCH_SIZE,
        spec.method.resolved_objective,
    )
    if spec.lm_eval is not None:
        metrics |= benchmark_metrics(model, processor, spec.lm_eval, settings)
    return metrics


def planned_variants(spec: RunSpec) -> list[str]:
    """The variants a run of `spec` exports, in order."""
    names = ["full", *(["merged"] if wants_merged(spec) else [])]
    if spec.method.type == MethodType.QLORA:
        return names  # a 4-bit base has no plain float model to compress
    if spec.compression.quantization.method != QuantizationMethod.NONE:
        names.append("int8")
    if spec.compression.pruning.method == PruningMethod.MAGNITUDE:
        names.append("pruned")
    return names


def _measure(
    variant: ExportedVariant, model: nn.Module, processor: Any, context: VariantContext, metrics: dict[str, float]
) -> None:
    spec = context.spec
    variant.metrics = metrics
    variant.size_bytes = weights_size(variant.folder)
    variant.latency_ms_p50 = latency_ms_p50(
        model,
        processor,
        spec.model.task,
        context.data.test,
        spec.hyperparameters.resolved_max_sequence_length,
        spec.method.resolved_objective,
    )
    if variant.name in COMPRESSED:
        verdict = judge(spec.model.task, context.reference, metrics, spec.compression.max_accuracy_drop)
        variant.accepted, variant.reason = verdict.accepted, verdict.reason
    context.measured(variant)


def _measure_reloaded(variant: ExportedVariant, processor: Any, context: VariantContext) -> None:
    """Measure a written variant as it loads back (and is served)."""
    reloaded = load_variant(variant.folder, context.spec.model.task)
    _measure(
        variant,
        reloaded,
        processor,
        context,
        test_metrics(reloaded, processor, context.spec, context.data, context.settings),
    )


def build_variants(model: nn.Module, processor: Any, root: Path, context: VariantContext) -> list[ExportedVariant]:
    """Export `full` (and `merged`), then the compressed variants the spec asks for; measure them all."""
    spec = context.spec
    planned = planned_variants(spec)
    merged = merged_copy(model) if "merged" in planned else None
    variants = export_variants(model, processor, spec, root, merged)
    full = variants[0]
    _measure(full, model, processor, context, context.reference)
    plain = full
    if merged is not None:
        plain = variants[1]
        _measure_reloaded(plain, processor, context)
    if "int8" in planned:
        int8 = ExportedVariant("int8", variant_folder(root, "int8", spec.output.uri), VariantFormat.TORCHAO)
        quantize_folder(plain.folder, int8.folder, spec.model.task, spec.compression)
        _measure_reloaded(int8, processor, context)
        variants.append(int8)
    if "pruned" in planned:
        pruned = ExportedVariant("pruned", variant_folder(root, "pruned", spec.output.uri), VariantFormat.HF)
        prune_folder(plain.folder, pruned.folder, spec.model.task, spec.compression.pruning.amount)
        _measure_reloaded(pruned, processor, context)
        variants.append(pruned)
    return variants
