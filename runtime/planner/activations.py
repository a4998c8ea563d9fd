"""Activation memory: what autograd keeps from the forward pass for the backward pass, layer by layer.

Each term is a tensor the module's backward needs, as PyTorch saves it: a linear keeps its
input only when its weight trains; a norm keeps its input and statistics when a gradient
flows through it; attention keeps q, k, v, its output and the log-sum-exp (fused kernels),
or the probabilities and the dropout mask (the math kernel, which CPU attention with dropout
uses). Under autocast a matmul's saved tensors are in the compute dtype, while norms keep
fp32. Dropout keeps a mask: one byte per element on CUDA, the input's dtype on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.runtime.contract import MethodType, Precision, Task

from .inputs import DeviceKind, PlanInput
from .parameters import Parameters
from .shape import ROBERTA_HEADS, Family, ModelShape

FP32 = 4
STATS = 4  # per token: a norm's mean or inverse RMS, in fp32


@dataclass(frozen=True)
class Widths:
    """Bytes per element of the saved tensors of one training configuration."""

    compute: int  # matmul inputs and outputs (the autocast dtype, else the weights')
    residual: int  # the residual stream and norm inputs
    mask: int  # a dropout mask

    @staticmethod
    def of(inp: PlanInput) -> Widths:
        autocast = inp.precision != Precision.FP32
        compute = 2 if autocast else inp.shape.weight_bytes
        # Autocast runs LayerNorm in fp32, so after the first norm BERT's and ViT's residual stream is fp32;
        # Llama's RMSNorm casts back to the weights' dtype.
        layer_norm_fp32 = autocast and inp.shape.family != Family.DECODER
        residual = FP32 if layer_norm_fp32 else inp.shape.weight_bytes
        mask = 1 if inp.device == DeviceKind.CUDA else compute
        return Widths(compute, residual, mask)


def _math_attention(shape: ModelShape, inp: PlanInput) -> bool:
    """Whether attention runs the math kernel: on CPU when attention dropout is on (the fused CPU kernel has none)."""
    return inp.device == DeviceKind.CPU and shape.attention_dropout > 0


def attention_bytes(inp: PlanInput, w: Widths) -> int:
    """What scaled-dot-product attention saves in one layer."""
    s = inp.shape
    b, n, tokens = inp.rows, inp.sequence, inp.tokens_per_batch
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    if _math_attention(s, inp):
        scores = b * s.heads * n * n
        # Scaled q and k, v, the softmax output, the dropout mask and the dropped probabilities;
        # the output is copied back to (tokens, hidden) for the output projection.
        return tokens * q * w.compute * 4 + scores * (2 * w.compute + w.mask)
    # Fused kernels: q, k, v, the output (the output projection reads it in place) and the log-sum-exp.
    return tokens * (2 * q + 2 * kv) * w.compute + b * s.heads * n * FP32


def _dropout(p: float, elements: int, w: Widths) -> int:
    return elements * w.mask if p > 0 else 0


def _lora_branches(inp: PlanInput, params: Parameters, w: Widths) -> int:
    """Per layer: each adapter keeps its (dropped-out) input, the dropout mask, and the rank-wide middle."""
    tokens, rank = inp.tokens_per_batch, inp.method.lora_options.rank
    total = 0
    for target in params.targets:
        total += tokens * (target.inputs + rank) * w.compute
        total += _dropout(inp.method.lora_options.dropout, tokens * target.inputs, w)
        if inp.method.type == MethodType.DORA:
            total += 2 * tokens * target.outputs * w.compute  # the base output and the scaled adapter output
    return total


def layer_bytes(inp: PlanInput, params: Parameters, weights_train: bool) -> int:
    """What one transformer layer saves; `weights_train` says whether its own weights train (else adapters)."""
    s, w = inp.shape, Widths.of(inp)
    t, h, i = inp.tokens_per_batch, s.hidden, s.intermediate
    attention = attention_bytes(inp, w)
    if _math_attention(s, inp) and not weights_train:
        attention -= t * s.heads * s.head_dim * w.compute  # the copied output feeds a frozen projection
    if s.family == Family.DECODER:
        # RMSNorm upcasts to fp32: x (for the square) with its statistic, and, when the norm's weight
        # trains, the normalised x and the output the next linear reads.
        rms = t * h * FP32 + t * STATS + (t * h * FP32 + t * h * w.compute if weights_train else 0)
        mlp = (4 if weights_train else 3) * t * i * w.compute  # gate, SiLU(gate), up, and their product
        total = 2 * rms + attention + mlp
    else:
        # Two LayerNorms (input and statistics), the two linears that read their outputs (BERT: the next
        # layer's attention and the MLP; ViT: attention and the MLP), GELU's input and output, dropout masks.
        norm = t * h * w.residual + 2 * t * STATS
        linear_inputs = 2 * t * h * w.compute if weights_train else 0
        gelu = (2 if weights_train else 1) * t * i * w.compute
        total = 2 * norm + linear_inputs + attention + gelu + 2 * _dropout(s.hidden_dropout, t * h, w)
    if not weights_train:
        total += _lora_branches(inp, params, w)
    return total


def _full(params: Parameters) -> bool:
    return params.trainable == params.total and not params.targets


def embedding_bytes(inp: PlanInput, params: Parameters) -> int:
    """BERT's embedding LayerNorm and dropout, in a full fine-tune; the others save indices only."""
    s, w = inp.shape, Widths.of(inp)
    if s.family != Family.ENCODER or not _full(params):
        return 0
    t = inp.tokens_per_batch
    return t * s.hidden * w.residual + 2 * t * STATS + _dropout(s.hidden_dropout, t * s.hidden, w)


def head_bytes(inp: PlanInput, params: Parameters) -> int:
    """What the last norm and the head keep of the last hidden states."""
    s, w = inp.shape, Widths.of(inp)
    t, h = inp.tokens_per_batch, s.hidden
    head_input = t * h * w.compute if params.head_trains else 0
    gradient_below = params.gradient_layers > 0
    if s.family == Family.DECODER:
        rms = t * h * FP32 + t * STATS if gradient_below else 0
        return rms + (t * h * FP32 if _full(params) else 0) + head_input
    if s.family == Family.VISION:
        return (t * h * w.residual + 2 * t * STATS if gradient_below else 0) + head_input
    # BERT's pooler reads [CLS] of the last layer's output and trains unless adapters are used;
    # RoBERTa's classifier reads it directly and always trains.
    pooler_trains = not params.targets or s.model_type in ROBERTA_HEADS
    return t * h * w.compute if pooler_trains else 0


def logits_bytes(inp: PlanInput) -> int:
    """The loss's transient peak: for causal LMs the logits, their shifted copy and the log-softmax (fp32)."""
    if inp.task != Task.CAUSAL_LM:
        return 0
    return 3 * inp.tokens_per_batch * inp.shape.vocab * FP32


def backward_transient_bytes(inp: PlanInput) -> int:
    """What one layer's backward pass adds at its widest: the gradient of its widest activation (the MLP's,
    or the attention scores' with the math kernel), while the saved input it replaces is freed, and the
    gradients of the hidden states flowing in and out."""
    s, w = inp.shape, Widths.of(inp)
    t = inp.tokens_per_batch
    widest = t * s.intermediate
    if _math_attention(s, inp):
        widest = max(widest, inp.rows * s.heads * inp.sequence**2)
    return (widest + 2 * t * s.hidden) * w.compute
