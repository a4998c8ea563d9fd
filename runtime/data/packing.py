"""Padding-free packing of causal-LM training examples (`data.packing`).

Whole examples are packed into rows of at most `maxSequenceLength` tokens, and `batchSize` rows make
one batch: a step's token budget is batchSize x maxSequenceLength, as unpacked, but filled with real
tokens instead of padding. Within a row, transformers' `DataCollatorWithFlattening` concatenates the
examples and restarts the position ids at each one; the model then attends only within an example
(see `kubetune.runtime.training.batches.check_packed_attention`), so the loss equals the unpacked one.

The rows are packed once per run from a seeded shuffle, so every worker, every epoch and every resumed
run sees the same batches (the epochs shuffle their order): the steps of an epoch are known before
training starts, and a checkpoint's batch position means the same batches after a restart.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .causal import IGNORE_INDEX
from .task_ops import encode_causal

# An encoded example: (token ids, labels with IGNORE_INDEX over the prompt).
EncodedExample = tuple[list[int], list[int]]


def pack_rows(lengths: Sequence[int], row_tokens: int, seed: int) -> list[list[int]]:
    """Example indices in rows of at most `row_tokens` tokens: best fit, over a seeded shuffle.

    Each example goes into the open row it fills most tightly (the one with the least room that still
    holds it), or starts a new row; the shuffle mixes the examples of a row, as unpacked batches do.
    """
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the first that holds an example fits best
    for index in order:
        need = lengths[index]
        if need > row_tokens:
            raise ValueError(f"an example of {need} tokens does not fit a row of {row_tokens}")
        place = bisect.bisect_left(room, (need, -1))
        if place < len(room):
            free, row = room.pop(place)
        else:
            free, row = row_tokens, len(rows)
            rows.append([])
        rows[row].append(index)
        if free - need > 0:
            bisect.insort(room, (free - need, row))
    return rows


def _flatten(row: list[EncodedExample]) -> dict[str, list[int]]:
    """One row by transformers' padding-free collator: ids and labels concatenated, positions restarting.

    The collator also makes each example's first label IGNORE_INDEX, so the last token of one example is
    never asked to predict the first of the next.
    """
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": ids, "labels": labels} for ids, labels in row]
    flat = DataCollatorWithFlattening(return_tensors="pt")(features)  # type: ignore[no-untyped-call]
    return {name: flat[name][0].tolist() for name in ("input_ids", "labels", "position_ids")}


def collate_packed(rows: list[list[EncodedExample]], pad_id: int) -> dict[str, torch.Tensor]:
    """Model inputs of packed rows: `input_ids`, `position_ids` and `labels`, with no attention mask.

    Rows shorter than the longest are padded at the end; the padding's positions restart at 0, so it
    is a sequence of its own that no example attends to, and its labels are ignored.
    """
    flat = [_flatten(row) for row in rows]
    width = max(len(row["input_ids"]) for row in flat)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for index, row in enumerate(flat):
        length = len(row["input_ids"])
        input_ids[index, :length] = torch.tensor(row["input_ids"])
        labels[index, :length] = torch.tensor(row["labels"])
        position_ids[index, :length] = torch.tensor(row["position_ids"])
        position_ids[index, length:] = torch.arange(width - length)
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


@dataclass(frozen=True)
class PackedBatches:
    """The training set encoded once and packed: batch -> rows -> example indices."""

    encoded: list[EncodedExample]
    batches: list[list[list[int]]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.batches)

    def examples(self, batch: int) -> int:
        return sum(len(row) for row in self.batches[batch])

    def tokens(self, batch: int) -> int:
        return sum(len(self.encoded[index][0]) for row in self.batches[batch] for index in row)

    def inputs(self, batch: int) -> dict[str, torch.Tensor]:
        return collate_packed([[self.encoded[index] for index in row] for row in self.batches[batch]], self.pad_id)


def pack_encoded(
    encoded: list[EncodedExample], row_tokens: int, rows_per_batch: int, seed: int, pad_id: int
) -> PackedBatches:
    rows = pack_rows([len(ids) for ids, _ in encoded], row_tokens, seed)
    batches = [rows[start : start + rows_per_batch] for start in range(0, len(rows), rows_per_batch)]
    return PackedBatches(encoded, batches, pad_id)


def pack_examples(
    tokenizer: Any, examples: Sequence[dict[str, Any]], max_length: int, rows_per_batch: int, seed: int
) -> PackedBatches:
    """Encode causal-LM examples (as unpacked: completion-only labels) and pack them."""
    encoded = [encode_causal(tokenizer, example, max_length) for example in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return pack_encoded(encoded, max_length, rows_per_batch, seed, pad_id)
