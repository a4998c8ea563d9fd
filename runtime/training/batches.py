"""What each training step reads: batches of examples, or packed rows of them (`data.packing`).

The loop's sampler hands out "units": example indices (unpacked, `batchSize` a batch) or packed batch
indices (one a batch). Either way the number of batches of an epoch is known before training starts,
so the schedule's total steps, the progress and the resume position keep their meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from kubetune.runtime.contract import Hyperparameters
from kubetune.runtime.data.load import Examples
from kubetune.runtime.data.packing import EncodedExample, PackedBatches, collate_packed, pack_examples
from kubetune.runtime.data.task_ops import TaskOps
from kubetune.runtime.io.errors import InvalidRunError
from torch import nn

# How far the logits of an example packed behind another may stray from its logits alone, relative to
# their largest magnitude: rounding moves them far less, attention across the boundary far more.
PACKED_ATTENTION_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2
# Tokens of each example the packed-attention check feeds the model.
PROBE_TOKENS = 8


class TrainingBatches(Protocol):
    """The batches of one training set."""

    @property
    def units(self) -> int:
        """How many indices the sampler shares out."""

    @property
    def units_per_batch(self) -> int: ...

    @property
    def forward_options(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward pass besides the inputs."""

    def inputs(self, units: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """Model inputs (with `labels`) of one batch, and how many examples it holds."""


@dataclass(frozen=True)
class ExampleBatches:
    """Unpacked: `batch_size` examples a batch, each padded to the longest."""

    examples: Examples
    processor: Any
    ops: TaskOps
    max_length: int
    batch_size: int
    forward_options: dict[str, Any] = field(default_factory=dict)

    @property
    def units(self) -> int:
        return len(self.examples)

    @property
    def units_per_batch(self) -> int:
        return self.batch_size

    def inputs(self, units: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        return self.ops.encode(self.processor, self.examples.subset(units), self.max_length), len(units)


@dataclass(frozen=True)
class PackedTrainingBatches:
    """Packed: the sampler hands out whole packed batches, one at a time."""

    packed: PackedBatches
    # Without a KV cache: transformers builds the per-example (block-diagonal) causal mask from the
    # restarting position ids only when no cache is in use, and a causal LM makes one by default.
    forward_options: dict[str, Any] = field(default_factory=lambda: {"use_cache": False})

    @property
    def units(self) -> int:
        return len(self.packed)

    @property
    def units_per_batch(self) -> int:
        return 1

    def inputs(self, units: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        (batch,) = units
        return self.packed.inputs(batch), self.packed.examples(batch)


def training_batches(
    examples: Examples, processor: Any, ops: TaskOps, hp: Hyperparameters, packing: bool
) -> ExampleBatches | PackedTrainingBatches:
    max_length, batch_size = hp.resolved_max_sequence_length, hp.resolved_batch_size
    if not packing:
        return ExampleBatches(examples, processor, ops, max_length, batch_size)
    return PackedTrainingBatches(pack_examples(processor, examples.inputs, max_length, batch_size, hp.seed))


def _probe_examples(packed: PackedBatches) -> tuple[EncodedExample, EncodedExample]:
    first, second = (packed.encoded[i % len(packed.encoded)] for i in range(2))
    return (first[0][:PROBE_TOKENS], first[1][:PROBE_TOKENS]), (second[0][:PROBE_TOKENS], second[1][:PROBE_TOKENS])


@torch.no_grad()
def check_packed_attention(model: nn.Module, packed: PackedBatches, device: torch.device) -> None:
    """Refuse packing (InvalidRunError on data.packing) for a model whose attention crosses packed examples.

    The second example's logits behind the first must equal its logits alone. A model (or attention
    implementation) that ignores the restarting position ids would let it attend to the first one.
    Every worker runs it (a sharded model gathers its weights in each forward pass).
    """
    first, second = _probe_examples(packed)
    was_training = model.training
    model.eval()
    try:
        alone = collate_packed([[second]], packed.pad_id)
        together = collate_packed([[first, second]], packed.pad_id)
        alone_logits = model(
            input_ids=alone["input_ids"].to(device), position_ids=alone["position_ids"].to(device), use_cache=False
        ).logits.float()
        packed_logits = model(
            input_ids=together["input_ids"].to(device),
            position_ids=together["position_ids"].to(device),
            use_cache=False,
        ).logits.float()[:, len(first[0]) :]
    finally:
        model.train(was_training)
    dtype = next(model.parameters()).dtype
    tolerance = PACKED_ATTENTION_TOLERANCE.get(dtype, LOW_PRECISION_TOLERANCE)
    drift = float((packed_logits - alone_logits).abs().max())
    scale = float(alone_logits.abs().max()) or 1.0
    if drift > tolerance * scale:
        config = getattr(getattr(model, "module", model), "config", None)  # under DDP, the wrapped model's
        attention = getattr(config, "_attn_implementation", "unknown")
        raise InvalidRunError(
            "data.packing",
            f"this model's attention ({attention}) crosses the boundaries of packed examples (logits moved by "
            f"{drift:.3g} of {scale:.3g}); train it unpacked",
        )
