"""Which parameters a method loads, adds and trains, as the runtime applies it (kubetune.runtime.models)."""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.runtime.contract import Method, MethodType, Task

from .shape import DEFAULT_LORA_TARGETS, Linear, ModelShape

FP32_BYTES = 4
# bitsandbytes 4-bit: half a byte per weight, plus one absmax per 64-weight block: an fp32 constant,
# or with double quantization an 8-bit one plus an fp32 constant per 256 blocks.
NF4_BYTES = 0.5
NF4_CONSTANT_BYTES = 4 / 64
NF4_DOUBLE_QUANT_CONSTANT_BYTES = 1 / 64 + 4 / (64 * 256)


@dataclass(frozen=True)
class Parameters:
    """Parameter counts and bytes of the model as the method leaves it."""

    total: int
    weight_bytes: int
    adapter_parameters: int
    adapter_bytes: int
    trainable: int
    trainable_bytes: int
    # Layers whose weights train (freeze: the top ones; full: all; adapters: none of the base weights).
    trainable_layers: int
    # Whether gradients flow through every layer (full and adapters) or only through the top ones (freeze).
    gradient_layers: int
    # The adapted linears of one layer (adapter methods).
    targets: tuple[Linear, ...]
    # Whether the head's weights train (and so its input is saved for the backward pass).
    head_trains: bool


def _matches(name: str, key: str) -> bool:
    # peft matches a target against the end of a module's dotted name.
    return name == key or name.endswith("." + key) or key.endswith("." + name)


def lora_targets(shape: ModelShape, method: Method) -> tuple[Linear, ...]:
    """The layer linears the adapters wrap: the spec's targetModules, or peft's defaults for the model type."""
    keys = method.lora_options.target_modules or list(DEFAULT_LORA_TARGETS[shape.family])
    targets = tuple(linear for linear in shape.layer_linears if any(_matches(linear.name, key) for key in keys))
    if not targets:
        names = ", ".join(linear.name for linear in shape.layer_linears)
        raise ValueError(f"method.lora.targetModules: {keys} match no linear of a {shape.model_type} layer ({names})")
    return targets


def _saved_head(shape: ModelShape, task: Task, labels: int) -> tuple[Linear, ...]:
    """The head modules peft keeps trainable beside the adapters (modules_to_save): the classifier."""
    if task == Task.CAUSAL_LM:
        return ()
    return tuple(linear for linear in shape.head_linears(task, labels) if not linear.name.startswith("pooler"))


def method_parameters(shape: ModelShape, method: Method, task: Task, labels: int) -> Parameters:
    """Counts and bytes of the loaded model, the adapters the method adds, and what trains."""
    total = shape.total_parameters(task, labels)
    head = shape.head_parameters(task, labels)
    layer = shape.layer_parameters
    if method.type == MethodType.QLORA:
        return _qlora(shape, method, task, labels, total)
    weight_bytes = total * shape.weight_bytes
    if method.type == MethodType.FULL:
        return Parameters(
            total, weight_bytes, 0, 0, total, weight_bytes, shape.layers, shape.layers, (), head_trains=True
        )
    if method.type == MethodType.FREEZE:
        top = min(method.freeze_options.trainable_layers, shape.layers)
        head_trainable = head
        if task == Task.CAUSAL_LM and shape.tied_embeddings:
            head_trainable = shape.vocab * shape.hidden  # the lm_head trains the embedding it shares
        trainable = top * layer + head_trainable
        return Parameters(
            total,
            weight_bytes,
            0,
            0,
            trainable,
            trainable * shape.weight_bytes,
            top,
            top,
            (),
            head_trains=True,
        )
    return _adapters(shape, method, task, labels, total, weight_bytes)


def _adapter_counts(shape: ModelShape, method: Method, task: Task, labels: int) -> tuple[tuple[Linear, ...], int, int]:
    """(targets, adapter matrix parameters, head copy parameters)."""
    targets = lora_targets(shape, method)
    rank = method.lora_options.rank
    per_layer = sum(rank * (t.inputs + t.outputs) for t in targets)
    if method.type == MethodType.DORA:
        per_layer += sum(t.outputs for t in targets)  # DoRA's magnitude vector
    saved = sum(linear.parameters for linear in _saved_head(shape, task, labels))
    return targets, shape.layers * per_layer, saved


def _adapters(shape: ModelShape, method: Method, task: Task, labels: int, total: int, weight_bytes: int) -> Parameters:
    targets, matrices, saved = _adapter_counts(shape, method, task, labels)
    # peft keeps adapters in fp32 (autocast_adapter_dtype) and copies the saved head in the weights' dtype.
    adapter_bytes = matrices * FP32_BYTES + saved * shape.weight_bytes
    return _adapted(shape, total, weight_bytes, targets, matrices + saved, adapter_bytes, bool(saved))


def _qlora(shape: ModelShape, method: Method, task: Task, labels: int, total: int) -> Parameters:
    """A 4-bit base: the layers' linears quantized; prepare_model_for_kbit_training casts the rest to fp32."""
    quantized = shape.layers * sum(linear.inputs * linear.outputs for linear in shape.layer_linears)
    constants = NF4_DOUBLE_QUANT_CONSTANT_BYTES if method.qlora_options.double_quant else NF4_CONSTANT_BYTES
    weight_bytes = round(quantized * (NF4_BYTES + constants)) + (total - quantized) * FP32_BYTES
    targets, matrices, saved = _adapter_counts(shape, method, task, labels)
    adapter_bytes = (matrices + saved) * FP32_BYTES
    return _adapted(shape, total, weight_bytes, targets, matrices + saved, adapter_bytes, bool(saved))


def _adapted(
    shape: ModelShape,
    total: int,
    weight_bytes: int,
    targets: tuple[Linear, ...],
    adapters: int,
    adapter_bytes: int,
    head_trains: bool,
) -> Parameters:
    """An adapted model: only the adapters (and the saved head) train; gradients flow through every layer."""
    return Parameters(
        total=total,
        weight_bytes=weight_bytes,
        adapter_parameters=adapters,
        adapter_bytes=adapter_bytes,
        trainable=adapters,
        trainable_bytes=adapter_bytes,
        trainable_layers=0,
        gradient_layers=shape.layers,
        targets=targets,
        head_trains=head_trains,
    )
