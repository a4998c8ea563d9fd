"""The int8 variant: torchao int8 weights, served with torch's CPU int8 matmul kernels.

`quantize_folder` writes the variant (transformers loads it back).

torchao stores the int8 variant (per-row int8 weights, `Int8Tensor`), but on CPU its
dynamic-activation matmul multiplies in int32 (eager) or in float (compiled): slower
than the float model. torch's quantized CPU kernels (fbgemm / oneDNN) multiply uint8
activations by int8 weights with the CPU's integer dot-product instructions, quantizing
the activations inside the kernel. `use_int8_kernels` swaps, in place, every linear
layer whose weight is a dynamic-activation `Int8Tensor` for such a kernel (the same
int8 weight values, packed once), and every int8 embedding table for one that
dequantizes only the rows it looks up.

Activations are quantized per call and per tensor to the full 8 bits. (Torch's 7-bit
option, meant to rule out 16-bit overflow on CPUs without VNNI, measured far less
accurate on MiniLM than the rare overflow it prevents; the accuracy budget judges the result.)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from kubetune.runtime.contract import Compression, QuantizationMethod, Task
from kubetune.runtime.data.task_ops import auto_class
from torch import nn
from torch.nn import functional

from .export import copy_processor_files

log = logging.getLogger(__name__)


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
    # A tied output layer (tie_word_embeddings) shares the input table's weight, which transformers
    # loads, and quantizes, under the table's name only: that one tensor is int8 as a table (weight-only,
    # per row, which serves lookups and matmuls alike) or stays float with it, never a linear config.
    table_weights = {id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)}
    by_parameter: dict[str, Any] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in table_weights:
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
    with _tied_weights_saved_once(model):
        model.save_pretrained(target)
    copy_processor_files(source, target)


@contextmanager
def _tied_weights_saved_once(model: nn.Module) -> Iterator[None]:
    """While saving, leave each tied alias (lm_head.weight of a tied causal LM) out of the state dict.

    transformers drops tied aliases before writing by finding tensors that share storage, but
    torchao flattens each int8 weight into cloned parts first, so a quantized tied table was
    written twice. Reloading then found both names, compared them with `torch.equal` (which
    torchao's tensors do not implement) and failed. Written once, the alias is tied on load.
    """
    tied: dict[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    aliases = {alias for alias, shared in tied.items() if model.get_parameter(alias) is model.get_parameter(shared)}

    def drop_aliases(_module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
        for alias in aliases:
            state_dict.pop(prefix + alias, None)

    handle = model.register_state_dict_post_hook(drop_aliases)  # type: ignore[no-untyped-call]  # unannotated in torch
    try:
        yield
    finally:
        handle.remove()


# oneDNN's int8 GEMM measured a few percent faster than fbgemm's on x86 (AVX2) for
# transformer shapes; elsewhere torch's default engine is kept.
PREFERRED_ENGINE = "onednn"


@contextmanager
def _packing_engine() -> Iterator[None]:
    """Pack weights for the preferred engine; the packed weight remembers it, the global setting is restored."""
    previous = torch.backends.quantized.engine
    if PREFERRED_ENGINE in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = PREFERRED_ENGINE
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _int8_weight(module: nn.Module) -> Any | None:
    """The module's torchao int8 weight if it is one these kernels can serve, else None."""
    weight: Any = getattr(module, "weight", None)
    if type(weight).__name__ not in {"Int8Tensor", "IntxUnpackedToInt8Tensor"}:
        return None
    qdata = getattr(weight, "qdata", None)
    if qdata is None or qdata.dtype != torch.int8 or qdata.ndim != 2:
        return None
    return weight


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output row; x is quantized per call, inside the kernel (uint8, per tensor)."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qdata.shape
        scales = scale.reshape(-1).to(torch.float64)
        # The same int8 values, wrapped as a per-row quantized tensor and packed once for the kernel.
        weight = torch._make_per_channel_quantized_tensor(
            qdata.contiguous(), scales, torch.zeros_like(scales, dtype=torch.int64), 0
        )
        float_bias = None if bias is None else bias.detach().to(torch.float32)
        with _packing_engine():
            self.packed = torch.ops.quantized.linear_prepack(weight, float_bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = torch.ops.quantized.linear_dynamic(inputs.to(torch.float32), self.packed, False)
        return output.to(inputs.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int8Embedding(nn.Module):
    """An embedding table kept as int8 rows with a scale (and zero point) per row."""

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, source: nn.Embedding, weight: Any) -> None:
        super().__init__()
        self.padding_idx = source.padding_idx
        self.register_buffer("qdata", weight.qdata.contiguous())
        self.register_buffer("scale", weight.scale.reshape(-1, 1).to(torch.float32))
        zero_point = getattr(weight, "zero_point", None)
        zeros = torch.zeros_like(self.scale) if zero_point is None else zero_point.reshape(-1, 1).to(torch.float32)
        self.register_buffer("zero_point", zeros)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = functional.embedding(ids, self.qdata).to(torch.float32)
        return (rows - functional.embedding(ids, self.zero_point)) * functional.embedding(ids, self.scale)


@functools.cache
def kernels_available() -> bool:
    """Whether this torch build has int8 linear kernels for this CPU (probed once per process)."""
    try:
        probe = Int8Linear(torch.ones(8, 8, dtype=torch.int8), torch.ones(8), None)
        probe(torch.ones(2, 8))
    except (RuntimeError, AttributeError, NotImplementedError) as error:
        log.info("CPU int8 kernels unavailable (%s); int8 layers stay as torchao computes them", error)
        return False
    return True


def use_int8_kernels(model: nn.Module) -> int:
    """Swap the model's torchao int8 layers (on CPU) for CPU int8 kernels; returns how many were swapped.

    Weight-only int8 linears keep float activations by definition and stay as they are.
    """
    swappable = []
    for name, module in model.named_modules():
        weight = _int8_weight(module)
        if weight is None or weight.qdata.device.type != "cpu":
            continue
        if (isinstance(module, nn.Linear) and _is_dynamic_activation(weight)) or isinstance(module, nn.Embedding):
            swappable.append((name, module, weight))
    if not swappable or not kernels_available():
        return 0
    for name, module, weight in swappable:
        replacement: nn.Module = (
            Int8Linear(weight.qdata, weight.scale, module.bias)
            if isinstance(module, nn.Linear)
            else Int8Embedding(module, weight)
        )
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attribute, replacement)
    return len(swappable)


def _is_dynamic_activation(weight: Any) -> bool:
    """A per-row symmetric weight whose activations torchao quantizes per call, with no static or smoothing scale."""
    return (
        type(weight).__name__ == "Int8Tensor"
        and getattr(weight, "act_quant_kwargs", None) is not None
        and getattr(weight, "act_quant_scale", None) is None
        and getattr(weight, "act_pre_scale", None) is None
        and weight.scale.numel() == weight.qdata.shape[0]
    )
