"""Training FLOPs per token, and step time, tokens/s and GPU-hours against a GPU's peak.

A matmul of an n-wide input into m outputs costs 2·n·m FLOPs per token forward; backward
costs as much again for the input's gradient (where a gradient flows) and again for the
weight's gradient (where the weight trains). Attention adds 2·2·S·(heads·head_dim) per
token and layer forward (scores and the weighted sum, counted over the full S x S square).
Checkpointed layers run their forward twice; dpo and kto add forward passes of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.runtime.contract import Objective

from .gpus import GpuType
from .inputs import PlanInput
from .memory import checkpointing
from .parameters import Parameters

# Model-FLOPs utilisation assumed when none is given: what well-tuned fine-tuning reaches on tensor cores.
DEFAULT_MFU = 0.4


NO_GRAD_FORWARDS = {Objective.DPO: 1, Objective.KTO: 3}


@dataclass(frozen=True)
class Flops:
    forward: int
    backward: int
    recompute: int

    @property
    def per_token(self) -> int:
        return self.forward + self.backward + self.recompute


def flops_per_token(inp: PlanInput, params: Parameters) -> Flops:
    s = inp.shape
    layer_matmul = sum(linear.inputs * linear.outputs for linear in s.layer_linears)
    head_matmul = sum(linear.inputs * linear.outputs for linear in s.head_linears(inp.task, inp.labels))
    attention = 2 * 2 * inp.sequence * s.heads * s.head_dim
    rank = inp.method.lora_options.rank
    adapter = sum(rank * (t.inputs + t.outputs) for t in params.targets)
    layer_forward = 2 * (layer_matmul + adapter) + attention
    forward = s.layers * layer_forward + 2 * head_matmul
    through = params.gradient_layers
    # Input gradients through every layer a gradient reaches, and the head; weight gradients where weights train.
    backward = through * (2 * layer_matmul + 2 * attention) + 2 * head_matmul
    backward += params.trainable_layers * 2 * layer_matmul + 2 * head_matmul * params.head_trains
    backward += through * 2 * 2 * adapter
    recompute = through * layer_forward if checkpointing(inp) else 0
    # Forward passes without gradients: dpo's reference; kto's reference and both models on mismatched pairs.
    recompute += NO_GRAD_FORWARDS.get(inp.method.resolved_objective, 0) * forward
    return Flops(forward, backward, recompute)


@dataclass(frozen=True)
class Speed:
    step_seconds: float
    tokens_per_second: float
    gpu_hours: float | None


def speed(inp: PlanInput, flops: Flops, gpu: GpuType, mfu: float) -> Speed | None:
    """Time of one optimizer step (all accumulated micro-batches), cluster tokens/s, GPU-hours of the run.

    None when the GPU has no math for the precision (bf16 before Ampere).
    """
    peak = gpu.peak_tflops(inp.precision)
    if peak is None:
        return None
    achieved = peak * 1e12 * mfu
    tokens_per_step = inp.tokens_per_batch * inp.gradient_accumulation_steps
    step_seconds = tokens_per_step * flops.per_token / achieved
    tokens_per_second = inp.topology.devices * tokens_per_step / step_seconds
    gpu_hours = None
    if inp.train_tokens is not None:
        tokens = inp.train_tokens * inp.rows_per_example
        gpu_hours = tokens * inp.epochs * flops.per_token / achieved / 3600
    return Speed(step_seconds, tokens_per_second, gpu_hours)
