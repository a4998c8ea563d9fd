"""The `auto` values a plan resolves: sequence length, precision, batch size and gradient checkpointing.

Each resolver is pure and returns the value with a `Decision` that says why, so the run report
and the job's status can record it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from kubetune.runtime.contract import ContractModel, MethodType, Precision
from kubetune.runtime.contract.decisions import Decision
from pydantic import Field

from .gpus import GpuType
from .inputs import DeviceKind, PlanInput
from .plan import plan

DEFAULT_QUANTILE = 0.95
# Sequence lengths are padded to a multiple of this (tensor-core tiles), and never shorter.
SEQUENCE_MULTIPLE = 8
# The largest batch the search tries (the contract's own limit is far above what fits).
MAX_AUTO_BATCH = 1024

SEQUENCE_FIELD = "spec.hyperparameters.maxSequenceLength"
PRECISION_FIELD = "spec.hyperparameters.precision"
BATCH_FIELD = "spec.hyperparameters.batchSize"
ACCUMULATION_FIELD = "spec.hyperparameters.gradientAccumulationSteps"
CHECKPOINTING_FIELD = "spec.hyperparameters.gradientCheckpointing"


def quantile(values: Sequence[int], q: float) -> int:
    """The nearest-rank quantile: the smallest value with at least a fraction `q` of the values at or below it."""
    if not values:
        raise ValueError("no token lengths to take a quantile of")
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def resolve_sequence_length(lengths: Sequence[int], max_positions: int, q: float = DEFAULT_QUANTILE) -> Decision:
    """The `q` quantile of the training examples' token lengths, rounded up to a multiple of 8, within the model."""
    seen = quantile(lengths, q)
    value = max(SEQUENCE_MULTIPLE, math.ceil(seen / SEQUENCE_MULTIPLE) * SEQUENCE_MULTIPLE)
    reason = f"p{q * 100:g} of {len(lengths):,} training texts is {seen:,} tokens"
    if value != seen:
        reason += f", rounded up to a multiple of {SEQUENCE_MULTIPLE}"
    if max_positions and value > max_positions:
        value = max_positions
        reason += f"; capped at the model's {max_positions:,} positions"
    return Decision(field=SEQUENCE_FIELD, value=value, reason=reason)


def resolve_precision(gpu: GpuType | None, device: DeviceKind) -> Decision:
    """bf16 where the device has bf16 math, else fp32; fp16 (which needs loss scaling) is never chosen."""
    if device == DeviceKind.CPU:
        return Decision(field=PRECISION_FIELD, value=Precision.FP32.value, reason="training on CPUs runs in fp32")
    if gpu is None:
        return Decision(
            field=PRECISION_FIELD, value=Precision.FP32.value, reason="the GPU type is unknown: fp32 runs on any GPU"
        )
    if gpu.supports_bf16:
        return Decision(
            field=PRECISION_FIELD,
            value=Precision.BF16.value,
            reason=f"the {gpu.name} has bf16 tensor cores ({gpu.bf16_tflops:g} TFLOPS)",
        )
    return Decision(
        field=PRECISION_FIELD, value=Precision.FP32.value, reason=f"the {gpu.name} has no bf16 math (before Ampere)"
    )


def total_bytes(inp: PlanInput) -> int:
    """What one device must hold for the input's step (tensors' peak and the framework's overhead)."""
    return plan(inp, gpus=()).memory.total_bytes


def fits(inp: PlanInput, budget_bytes: int) -> bool:
    return total_bytes(inp) <= budget_bytes


def largest_batch(inp: PlanInput, budget_bytes: int, cap: int = MAX_AUTO_BATCH) -> int:
    """The largest batch up to `cap` whose step fits the budget (0 when not even one example fits).

    Powers of two until one does not fit, then a binary search between the last that did and it:
    memory grows with the batch, so the first failure bounds the answer.
    """
    if cap < 1 or not fits(replace(inp, batch_size=1), budget_bytes):
        return 0
    low, high = 1, 2
    while high <= cap and fits(replace(inp, batch_size=high), budget_bytes):
        low, high = high, high * 2
    high = min(high, cap + 1)  # the smallest batch known not to fit (or past the cap)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(replace(inp, batch_size=middle), budget_bytes):
            low = middle
        else:
            high = middle
    return low


class BatchResolution(ContractModel):
    """The batch, accumulation and checkpointing a plan chose, with their decisions."""

    batch_size: int = Field(ge=1, description="Examples per step on each device.")
    gradient_accumulation_steps: int = Field(ge=1, description="Micro-batches summed per optimizer update.")
    gradient_checkpointing: bool = Field(description="Whether activations are recomputed in the backward pass.")
    decisions: list[Decision] = Field(description="Why each value was chosen.")


class NothingFitsError(ValueError):
    """Not even one example per device fits the budget, with checkpointing or without."""


def resolve_batch(
    inp: PlanInput,
    budget_bytes: int,
    *,
    effective_batch: int | None = None,
    checkpointing_auto: bool = True,
    cap: int = MAX_AUTO_BATCH,
) -> BatchResolution:
    """The largest batch that fits, with accumulation keeping `effective_batch` and checkpointing only when needed.

    Gradient checkpointing (when left to the plan) stays off unless batch 1 fits only with it: it costs
    a third more compute, so a smaller batch without it is preferred. With an effective batch the
    per-device batch never exceeds it, and gradientAccumulationSteps = ceil(effective / (batch x devices)).
    """
    devices = inp.topology.devices
    if effective_batch is not None:
        if effective_batch < 1:
            raise ValueError("the effective batch must be at least 1")
        cap = min(cap, math.ceil(effective_batch / devices))
    budget = f"{budget_bytes / 2**30:.1f} GiB"
    # Left to the plan, checkpointing starts off; qlora's k-bit preparation turns it on regardless.
    qlora = inp.method.type == MethodType.QLORA
    checkpointing = qlora or (inp.gradient_checkpointing and not checkpointing_auto)
    # Planned without accumulation first: accumulation adds the summed gradients, checked below.
    base = replace(inp, gradient_accumulation_steps=1)
    batch = largest_batch(replace(base, gradient_checkpointing=checkpointing), budget_bytes, cap)
    checkpoint_reason = (
        "on: qlora's k-bit preparation turns it on" if qlora else "off: the batch fits without recomputing activations"
    )
    if batch == 0 and checkpointing_auto and not checkpointing:
        checkpointing = True
        batch = largest_batch(replace(base, gradient_checkpointing=True), budget_bytes, cap)
        checkpoint_reason = f"on: without it not even batch 1 fits in {budget}"
    while batch > 0:
        steps = math.ceil(effective_batch / (batch * devices)) if effective_batch is not None else 1
        candidate = replace(
            inp, batch_size=batch, gradient_accumulation_steps=steps, gradient_checkpointing=checkpointing
        )
        if fits(candidate, budget_bytes):
            break
        batch -= 1
    if batch == 0:
        raise NothingFitsError(f"not even batch 1 fits in {budget} per device")
    capped = " (the effective batch's share)" if effective_batch is not None and batch == cap else ""
    decisions = [
        Decision(
            field=BATCH_FIELD,
            value=batch,
            reason=f"the largest batch up to {cap}{capped} whose step fits in {budget} per device: "
            f"{total_bytes(candidate) / 2**30:.1f} GiB",
        )
    ]
    if effective_batch is not None:
        decisions.append(
            Decision(
                field=ACCUMULATION_FIELD,
                value=steps,
                reason=f"keeps the effective batch of {effective_batch}: ceil({effective_batch} / "
                f"({batch} x {devices} device{'s' if devices > 1 else ''})) = {steps}",
            )
        )
    if checkpointing_auto:
        decisions.append(Decision(field=CHECKPOINTING_FIELD, value=checkpointing, reason=checkpoint_reason))
    return BatchResolution(
        batch_size=batch, gradient_accumulation_steps=steps, gradient_checkpointing=checkpointing, decisions=decisions
    )
