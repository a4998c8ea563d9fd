"""Fully sharded training (`resources.sharding: fsdp`): FSDP2 across all Ray Train workers.

Each transformer block is sharded on its own, then the root (embeddings, head and the rest),
so a worker holds only its shard of every weight, gradient and optimizer state and gathers
one block at a time to compute. Checkpoints are sharded too: torch.distributed.checkpoint
writes every worker's shard into the same Ray Train checkpoint folder (Ray gives all
workers one folder name), and a resumed run reads its own shards back. The trained
weights leave as one full state dict, gathered on rank 0, in the layout DDP exports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from kubetune.runtime.contract import Precision
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as load_checkpoint
from torch.distributed.checkpoint.state_dict_saver import save as save_checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

# torch.distributed.checkpoint's index of a checkpoint, written by rank 0 beside the shards.
SHARDS_INDEX = ".metadata"
# Groups of a sharded checkpoint: the current trainable weights, the optimizer, the best weights.
MODEL, OPTIMIZER, BEST = "model", "optimizer", "best"

ShardedWeights = dict[str, torch.Tensor]  # this worker's shards (DTensors) of the trainable weights, by name


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the classes Hugging Face keeps whole (`_no_split_modules`) that sit in a
    ModuleList, or every ModuleList element of a model that names none. Embeddings stay with the root, so
    weights tied to the output head are sharded in one group."""
    named: set[str] = set()
    for module in model.modules():
        named.update(getattr(module, "_no_split_modules", None) or ())
    in_lists = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    blocks = [block for block in in_lists if type(block).__name__ in named]
    return blocks or in_lists


def shard_model(model: nn.Module, device: torch.device, precision: Precision) -> nn.Module:
    """Shard `model` (built whole, on CPU) across every training process: each block, then the root."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 computes in bf16 and reduces gradients in fp32; the sharded weights stay in fp32.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if precision == Precision.BF16
        else MixedPrecisionPolicy()
    )
    model.to(device)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradients' reduce-scatter while accumulating (FSDP2's twin of DDP's `no_sync`)."""
    if enabled or not isinstance(model, FSDPModule):
        yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _trainable_names(model: nn.Module) -> set[str]:
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def _trainable_tensors(model: nn.Module, state: dict[str, Any]) -> dict[str, torch.Tensor]:
    names = _trainable_names(model)
    return {name: value for name, value in state.items() if name in names and isinstance(value, torch.Tensor)}


def sharded_weights(model: nn.Module) -> ShardedWeights:
    """This worker's shards of the trainable weights (frozen ones come back from the base model)."""
    return _trainable_tensors(model, get_model_state_dict(model))


def snapshot(model: nn.Module) -> ShardedWeights:
    """Copies of this worker's shards of the trainable weights: the best weights so far."""
    return {name: value.detach().clone() for name, value in sharded_weights(model).items()}


def save_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, best: ShardedWeights | None) -> None:
    """Write this worker's shards of the weights and optimizer state (and of the best weights, when they are
    not the current ones) into `folder`; every worker calls it with a folder of its own, which Ray Train
    then gathers into one checkpoint."""
    state: dict[str, Any] = {MODEL: sharded_weights(model), OPTIMIZER: get_optimizer_state_dict(model, optimizer)}
    if best is not None:
        state[BEST] = best
    save_checkpoint(state, checkpoint_id=str(folder))


def has_shards(folder: Path) -> bool:
    return (folder / SHARDS_INDEX).is_file()


def load_shards(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> ShardedWeights | None:
    """Load this worker's shards of a checkpoint into the sharded model and its optimizer; returns the best
    weights' shards when the checkpoint stored them apart (None: the current weights were the best)."""
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    weights = sharded_weights(model)
    state: dict[str, Any] = {MODEL: weights, OPTIMIZER: get_optimizer_state_dict(model, optimizer)}
    best = None
    if any(key.startswith(f"{BEST}.") for key in stored):
        best = state[BEST] = {name: torch.empty_like(value) for name, value in weights.items()}
    load_checkpoint(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state[MODEL], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, state[OPTIMIZER])
    return best


def gathered_weights(model: nn.Module, best: ShardedWeights | None) -> dict[str, torch.Tensor]:
    """The full trainable weights (the best ones when given) on rank 0, on CPU; empty on the other ranks.

    Every worker must call it: the shards are gathered with collectives. It leaves the model holding `best`.
    """
    if best is not None:
        set_model_state_dict(model, dict(best), options=StateDictOptions(strict=False))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _trainable_tensors(model, get_model_state_dict(model, options=options))
