"""Resolve the spec's `auto` values before the run evaluates or trains anything.

The driver reads the model's config.json and the training split's token lengths, asks the
planner for each value and why, and hands training a copy of the spec with concrete values only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kubetune.runtime.contract import AUTO, Hyperparameters, Precision, RunSpec, Task, WorkerResources
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.data.load import TaskData
from kubetune.runtime.data.model_config import UNBOUNDED_POSITIONS, read_model_config
from kubetune.runtime.data.token_lengths import MAX_MEASURED, token_lengths
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.models import ModelLocation, load_processor, locate_model
from kubetune.runtime.planner import (
    DEFAULT_QUANTILE,
    BatchResolution,
    ConfigError,
    NothingFitsError,
    PlanInput,
    Topology,
    does_not_fit_message,
    resolve_batch,
    resolve_precision,
    resolve_sequence_length,
    shape_from_config,
    suggestions,
    total_bytes,
)
from kubetune.runtime.planner.auto import CHECKPOINTING_FIELD, PRECISION_FIELD, SEQUENCE_FIELD

from .auto_device import AutoDevice, auto_device


@dataclass(frozen=True)
class Resolved:
    """The spec with every `auto` replaced by a value, and the decisions that chose them."""

    spec: RunSpec
    decisions: list[Decision]


def _sequence_length(spec: RunSpec, data: TaskData, location: ModelLocation, max_positions: int) -> Decision:
    hyper = spec.hyperparameters
    if spec.model.task == Task.IMAGE_CLASSIFICATION:
        return Decision(field=SEQUENCE_FIELD, value=128, reason="image classification reads no tokens: the default")
    tokenizer = load_processor(location, spec.model)
    lengths = token_lengths(
        tokenizer,
        spec.model.task,
        data.train.inputs,
        max_positions or UNBOUNDED_POSITIONS,
        sample=MAX_MEASURED,
        seed=hyper.seed,
    )
    if not lengths:
        raise InvalidRunError("data.train", "no training examples to measure for maxSequenceLength auto")
    return resolve_sequence_length(lengths, max_positions, hyper.sequence_length_quantile or DEFAULT_QUANTILE)


def _precision(device: AutoDevice) -> Decision:
    if device.gpu is None and device.bf16:
        return Decision(field=PRECISION_FIELD, value=Precision.BF16.value, reason=f"the {device.name} has bf16 math")
    return resolve_precision(device.gpu, device.kind)


def _checkpointing(inp: PlanInput, device: AutoDevice) -> Decision:
    """Checkpointing for a batch the spec fixes: on only when the step fits with it and not without."""
    budget = f"{device.budget_bytes / 2**30:.1f} GiB"
    if total_bytes(replace(inp, gradient_checkpointing=False)) <= device.budget_bytes:
        return Decision(field=CHECKPOINTING_FIELD, value=False, reason=f"off: batch {inp.batch_size} fits in {budget}")
    if total_bytes(replace(inp, gradient_checkpointing=True)) <= device.budget_bytes:
        return Decision(
            field=CHECKPOINTING_FIELD, value=True, reason=f"on: batch {inp.batch_size} fits in {budget} only with it"
        )
    raise NothingFitsError(f"batch {inp.batch_size} does not fit in {budget} per device, even with checkpointing")


def _nothing_fits(fields: list[str], inp: PlanInput, device: AutoDevice, error: NothingFitsError) -> InvalidRunError:
    message = str(error)
    if device.gpu is not None:
        message += f" ({does_not_fit_message(inp, device.gpu, suggestions(inp, device.gpu))})"
    return InvalidRunError(", ".join(f"hyperparameters.{name}" for name in fields), message)


def resolve_auto(
    spec: RunSpec, data: TaskData, resources: WorkerResources, settings: RuntimeSettings, processes: int
) -> Resolved:
    """`spec` with concrete values for its `auto` fields; InvalidRunError when no batch fits the device."""
    hyper = spec.hyperparameters
    fields = hyper.auto_fields()
    if not fields:
        return Resolved(spec, [])
    location = locate_model(spec.model, settings)
    try:
        shape = shape_from_config(
            read_model_config(
                location.source,
                spec.model.uri,
                from_hub=location.from_hub,
                revision=location.revision,
                cache_only=location.cache_only,
            )
        )
    except ConfigError as error:
        raise InvalidRunError("model.uri", f"auto values need the model's shape: {error}") from None
    device = auto_device(resources, processes)
    decisions: list[Decision] = []
    values: dict[str, Any] = {}
    if hyper.max_sequence_length == AUTO:
        decisions.append(_sequence_length(spec, data, location, shape.max_positions))
        values["maxSequenceLength"] = decisions[-1].value
    if hyper.precision == AUTO:
        decisions.append(_precision(device))
        values["precision"] = decisions[-1].value
    inp = PlanInput(
        shape=shape,
        task=spec.model.task,
        method=spec.method,
        batch_size=hyper.batch_size if isinstance(hyper.batch_size, int) else 1,
        sequence_length=int(values.get("maxSequenceLength", hyper.max_sequence_length)),
        precision=Precision(values.get("precision", hyper.precision)),
        optimizer=hyper.optimizer,
        gradient_checkpointing=hyper.gradient_checkpointing is True,
        gradient_accumulation_steps=hyper.gradient_accumulation_steps,
        labels=max(2, len(data.labels)),
        topology=Topology(resources.workers, max(1, resources.gpus_per_worker), resources.sharding),
        device=device.kind,
    )
    checkpointing_auto = hyper.gradient_checkpointing == AUTO
    try:
        if hyper.batch_size == AUTO:
            batch = _batch(inp, device, hyper.effective_batch_size, checkpointing_auto)
            decisions.extend(batch.decisions)
            values["batchSize"] = batch.batch_size
            values["gradientCheckpointing"] = batch.gradient_checkpointing
            if hyper.effective_batch_size is not None:
                values["gradientAccumulationSteps"] = batch.gradient_accumulation_steps
        elif checkpointing_auto:
            decisions.append(_checkpointing(inp, device))
            values["gradientCheckpointing"] = decisions[-1].value
    except NothingFitsError as error:
        raise _nothing_fits(fields, inp, device, error) from None
    wire = hyper.to_wire() | values
    wire.pop("effectiveBatchSize", None)
    wire.pop("sequenceLengthQuantile", None)
    resolved = spec.model_copy(update={"hyperparameters": Hyperparameters.model_validate(wire)})
    return Resolved(resolved, decisions)


def _batch(inp: PlanInput, device: AutoDevice, effective: int | None, checkpointing_auto: bool) -> BatchResolution:
    resolution = resolve_batch(
        inp, device.budget_bytes, effective_batch=effective, checkpointing_auto=checkpointing_auto
    )
    if effective is None:  # the spec's own accumulation stays
        resolution = resolution.model_copy(update={"gradient_accumulation_steps": inp.gradient_accumulation_steps})
    return resolution
