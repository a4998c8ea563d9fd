"""Peak memory per device of one training step, by part, as the runtime trains.

The runtime (kubetune.runtime.training.loop) keeps the weights in the checkpoint's dtype,
runs bf16/fp16 under autocast, clears gradients to None after each optimizer step and
steps a foreach AdamW, Adam or SGD (momentum) over the trainable parameters. From the
second step on the optimizer's state lives throughout, so the step's peak is the larger of

- the backward pass's start: weights, optimizer state, every saved activation, and the
  largest transient (a causal LM's logits and log-softmax, or one layer's activation gradients);
- the optimizer step: weights, optimizer state, all gradients and the update's temporary.

With gradient accumulation the gradients summed so far are alive through the later micro-batches.

With several data-parallel devices DDP keeps a second copy of the gradients in its buckets;
FSDP divides weights, gradients and optimizer state among the devices and gathers one
layer's weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.runtime.contract import MethodType, Optimizer, Precision, Sharding

from .activations import backward_transient_bytes, embedding_bytes, head_bytes, layer_bytes, logits_bytes
from .inputs import DeviceKind, PlanInput
from .parameters import Parameters

# Optimizer state per trainable parameter, in the parameter's dtype: Adam's two moments, SGD's momentum.
OPTIMIZER_STATES = {Optimizer.ADAMW: 2, Optimizer.ADAM: 2, Optimizer.SGD: 1}
# Autocast's compute dtype: the copies of fp32 weights a matmul keeps for the backward pass.
AUTOCAST_BYTES = 2
# The cuBLAS/cuBLASLt workspaces PyTorch takes from its caching allocator at the first matmul
# (32 MiB on Hopper; less on older GPUs): tensors' memory like any other on CUDA.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Memory:
    """Bytes per device."""

    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    # The larger of the backward pass's start and the optimizer step, excluding the framework's overhead.
    peak: int
    peak_phase: str


def checkpointing(inp: PlanInput) -> bool:
    """Gradient checkpointing in effect: asked for, or turned on by peft's k-bit preparation (qlora)."""
    return inp.gradient_checkpointing or inp.method.type == MethodType.QLORA


def saved_activations(inp: PlanInput, params: Parameters) -> tuple[int, int]:
    """(kept through the backward pass, added while one layer's backward runs).

    Without checkpointing every layer keeps its activations and a layer's backward adds its gradients'
    transient; with checkpointing each layer keeps only its input, and its backward first recomputes it.
    """
    per_layer = layer_bytes(inp, params, params.trainable_layers > 0)
    around = embedding_bytes(inp, params) + head_bytes(inp, params)
    transient = backward_transient_bytes(inp) if params.gradient_layers else 0
    if checkpointing(inp):
        inputs = params.gradient_layers * inp.tokens_per_batch * inp.shape.hidden * inp.shape.weight_bytes
        return around + inputs, (per_layer + transient if params.gradient_layers else 0)
    return around + params.gradient_layers * per_layer, transient


def autocast_weight_copies(inp: PlanInput, params: Parameters) -> int:
    """Under autocast, every matmul that a gradient passes through keeps a half-precision copy of its fp32 weight."""
    if inp.precision == Precision.FP32 or inp.shape.weight_bytes == AUTOCAST_BYTES:
        return 0
    if inp.method.type == MethodType.QLORA:
        return 0  # 4-bit weights are dequantized per use, not cached
    layer = sum(linear.inputs * linear.outputs for linear in inp.shape.layer_linears)
    head = sum(linear.inputs * linear.outputs for linear in inp.shape.head_linears(inp.task, inp.labels))
    return (params.gradient_layers * layer + head) * AUTOCAST_BYTES


def optimizer_temporary(inp: PlanInput, params: Parameters) -> int:
    """Foreach Adam/AdamW computes sqrt(v) for a whole parameter group at once; SGD updates in place."""
    return params.trainable_bytes if OPTIMIZER_STATES[inp.optimizer] == 2 else 0


def estimate_memory(inp: PlanInput, params: Parameters) -> Memory:
    devices = inp.topology.devices
    shard = devices if inp.topology.sharding == Sharding.FSDP else 1
    weights = params.weight_bytes // shard
    if inp.method.keeps_frozen_reference:
        weights += params.weight_bytes  # dpo and kto keep a whole frozen copy when there are no adapters to disable
    adapters = params.adapter_bytes // shard
    gradients = params.trainable_bytes // shard
    optimizer = OPTIMIZER_STATES[inp.optimizer] * params.trainable_bytes // shard
    persistent = weights + adapters + optimizer
    if inp.device == DeviceKind.CUDA:
        persistent += CUBLAS_WORKSPACE_BYTES
    if inp.topology.sharding == Sharding.FSDP and devices > 1:
        # The current layer's weights, gathered in full, and the next one prefetched.
        persistent += 2 * inp.shape.layer_parameters * inp.shape.weight_bytes
    elif devices > 1:
        persistent += gradients  # DDP's gradient buckets
    kept, layer_backward = saved_activations(inp, params)
    # The loss's logits are gone before the first layer's backward starts.
    activations = kept + autocast_weight_copies(inp, params) + max(logits_bytes(inp), layer_backward)
    backward = persistent + activations
    if inp.gradient_accumulation_steps > 1:
        backward += gradients  # later micro-batches run with the summed gradients alive
    step = persistent + gradients + optimizer_temporary(inp, params) // shard
    phase = "backward" if backward >= step else "optimizer-step"
    return Memory(weights, adapters, gradients, optimizer, activations, max(backward, step), phase)
