"""The plan: memory per device with its breakdown, fit per GPU type, speed and GPU-hours (wire-ready)."""

from __future__ import annotations

from collections.abc import Sequence

from kubetune.runtime.contract import ContractModel
from pydantic import Field

from .gpus import GIB, GPU_TYPES, GpuType
from .inputs import DeviceKind, PlanInput
from .memory import estimate_memory
from .parameters import method_parameters
from .throughput import DEFAULT_MFU, flops_per_token, speed

# What a CUDA process holds besides its tensors: the context and kernels (~0.5 GiB), and the
# caching allocator's slack, taken as a tenth of the tensors' peak.
CUDA_CONTEXT_BYTES = GIB // 2
ALLOCATOR_SLACK = 0.1


class MemoryPlan(ContractModel):
    """Peak memory of one device during a training step, by part."""

    weights_bytes: int = Field(
        ge=0,
        description=(
            "The model's weights (quantized for qlora; a shard with FSDP), and for dpo or kto without adapters "
            "the frozen reference copy."
        ),
    )
    adapter_bytes: int = Field(ge=0, description="Parameters the method adds: LoRA/DoRA matrices, saved head copies.")
    gradient_bytes: int = Field(ge=0, description="Gradients of the trainable parameters.")
    optimizer_bytes: int = Field(ge=0, description="Optimizer state (Adam's moments, SGD's momentum).")
    activation_bytes: int = Field(
        ge=0, description="Activations kept for the backward pass, with the largest transient of the step."
    )
    overhead_bytes: int = Field(ge=0, description="Framework overhead: CUDA context and allocator slack (0 on CPU).")
    peak_bytes: int = Field(ge=0, description="Peak bytes of tensors during a step (without the overhead).")
    total_bytes: int = Field(ge=0, description="Peak plus overhead: what the device must hold.")
    peak_phase: str = Field(description="Where the peak falls: backward (its start) or optimizer-step.")


class GpuEstimate(ContractModel):
    """The plan on one GPU type."""

    gpu: str = Field(description="GPU type name.")
    memory_bytes: int = Field(ge=0, description="The GPU's memory.")
    fits: bool = Field(description="Whether the total fits in the GPU's memory.")
    step_seconds: float | None = Field(
        default=None, description="One optimizer step (all accumulated micro-batches); absent without the precision."
    )
    tokens_per_second: float | None = Field(default=None, description="Training tokens per second, all devices.")
    gpu_hours: float | None = Field(default=None, description="GPU-hours of the run (when the token count is known).")
    source: str = Field(description="Datasheet of the GPU's figures.")


class Plan(ContractModel):
    """What a training run needs before it starts: memory per device, speed and GPU-hours."""

    parameters: int = Field(ge=0, description="Parameters of the loaded model.")
    trainable_parameters: int = Field(ge=0, description="Parameters that train (adapters included).")
    devices: int = Field(ge=1, description="Devices the run trains on (workers x GPUs per worker).")
    memory: MemoryPlan = Field(description="Peak memory per device and its breakdown.")
    flops_per_token: int = Field(ge=0, description="Training FLOPs per token (forward, backward, recomputation).")
    mfu: float = Field(gt=0, le=1, description="Model-FLOPs utilisation assumed for the speed estimates.")
    gpus: list[GpuEstimate] = Field(description="Fit and speed per GPU type.")


def plan(inp: PlanInput, gpus: Sequence[GpuType] = GPU_TYPES, mfu: float = DEFAULT_MFU) -> Plan:
    """The plan of a training run; pure: no I/O, no clock."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    params = method_parameters(inp.shape, inp.method, inp.task, inp.labels)
    memory = estimate_memory(inp, params)
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * memory.peak) if inp.device == DeviceKind.CUDA else 0
    total = memory.peak + overhead
    flops = flops_per_token(inp, params)
    estimates = []
    for gpu in gpus:
        timing = speed(inp, flops, gpu, mfu)
        estimates.append(
            GpuEstimate(
                gpu=gpu.name,
                memory_bytes=gpu.memory_bytes,
                fits=total <= gpu.memory_bytes,
                step_seconds=timing.step_seconds if timing else None,
                tokens_per_second=timing.tokens_per_second if timing else None,
                gpu_hours=timing.gpu_hours if timing else None,
                source=gpu.source,
            )
        )
    return Plan(
        parameters=params.total + params.adapter_parameters,
        trainable_parameters=params.trainable,
        devices=inp.topology.devices,
        memory=MemoryPlan(
            weights_bytes=memory.weights,
            adapter_bytes=memory.adapters,
            gradient_bytes=memory.gradients,
            optimizer_bytes=memory.optimizer,
            activation_bytes=memory.activations,
            overhead_bytes=overhead,
            peak_bytes=memory.peak,
            total_bytes=total,
            peak_phase=memory.peak_phase,
        ),
        flops_per_token=flops.per_token,
        mfu=mfu,
        gpus=estimates,
    )
