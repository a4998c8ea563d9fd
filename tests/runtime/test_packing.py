"""Padding-free packing of causal-LM SFT (`data.packing`): rows, the packed loss, and a packed run."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import Hyperparameters
from kubetune.runtime.data.causal import IGNORE_INDEX
from kubetune.runtime.data.load import Examples
from kubetune.runtime.data.packing import pack_encoded, pack_examples, pack_rows
from kubetune.runtime.data.task_ops import CausalLanguageModeling, encode_causal
from kubetune.runtime.evaluate import forward_logits
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.training.batches import PackedTrainingBatches, check_packed_attention, training_batches
from torch import nn

from .conftest import fast_options, finite, make_spec
from .topics import make_examples, write_jsonl

pytestmark = pytest.mark.runtime


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def _records(count: int, seed: int = 11) -> list[dict[str, Any]]:
    """Prompt/completion pairs whose prompts vary in length (one to four texts of the topics data)."""
    rng = random.Random(seed)
    examples = make_examples(count * 4, seed=seed)
    records = []
    for index in range(count):
        parts = examples[4 * index : 4 * index + rng.randint(1, 4)]
        records.append({"prompt": "topics of: " + " ".join(p["text"] for p in parts), "completion": parts[0]["label"]})
    return records


def test_rows_hold_every_example_once_within_the_budget() -> None:
    rng = random.Random(3)
    lengths = [rng.randint(16, 160) for _ in range(500)]
    rows = pack_rows(lengths, 160, seed=1)
    assert sorted(index for row in rows for index in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 160 for row in rows)
    assert rows == pack_rows(lengths, 160, seed=1)  # every worker and every resumed run packs the same
    assert rows != pack_rows(lengths, 160, seed=2)
    assert sum(lengths) / (160 * len(rows)) > 0.9  # best fit leaves little of a row empty
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([161], 160, seed=0)


def test_packed_batches_count_examples_and_restart_positions(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    packed = pack_examples(tokenizer, _records(40), max_length=64, rows_per_batch=4, seed=0)
    assert sum(packed.examples(b) for b in range(len(packed))) == 40
    inputs = packed.inputs(0)
    assert set(inputs) == {"input_ids", "position_ids", "labels"}  # no attention mask: the positions bound it
    assert inputs["input_ids"].shape[0] <= 4 and inputs["input_ids"].shape[1] <= 64
    first_row = packed.batches[0][0]
    starts = [0]
    for index in first_row:
        starts.append(starts[-1] + len(packed.encoded[index][0]))
    positions = inputs["position_ids"][0].tolist()
    assert [positions[s] for s in starts[:-1]] == [0] * len(first_row)
    # Each example's labels are its own (completion only); the first is ignored, so no example
    # learns to predict the start of the next.
    labels = inputs["labels"][0].tolist()
    for start, end, index in zip(starts, starts[1:], first_row, strict=False):
        assert labels[start] == IGNORE_INDEX
        assert labels[start + 1 : end] == packed.encoded[index][1][1:]


def _tiny_llama(folder: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    model.train()  # no dropout in the tiny Llama: training mode only proves none is switched on
    return model, AutoTokenizer.from_pretrained(folder)


def test_the_packed_loss_is_the_unpacked_loss(tiny_llama_dir: Path) -> None:
    model, tokenizer = _tiny_llama(tiny_llama_dir)
    records = _records(12)
    ops = CausalLanguageModeling()
    padded = ops.encode(tokenizer, Examples(records, []), 64)
    assert (padded["attention_mask"] == 0).any()  # the unpacked batch does hold padding
    unpacked = ops.loss(forward_logits(model, padded), padded["labels"])

    encoded = [encode_causal(tokenizer, record, 64) for record in records]
    packed = pack_encoded(encoded, row_tokens=64, rows_per_batch=len(records), seed=5, pad_id=tokenizer.pad_token_id)
    assert len(packed) == 1 and len(packed.batches[0]) < len(records)  # one batch of fewer, fuller rows
    inputs = packed.inputs(0)
    packed_loss = ops.loss(forward_logits(model, inputs, use_cache=False), inputs["labels"])
    assert float(packed_loss.detach()) == pytest.approx(float(unpacked.detach()), rel=1e-4)
    # The gradients agree as well: packing changes no training step.
    unpacked.backward()  # type: ignore[no-untyped-call]
    unpacked_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    packed_loss.backward()  # type: ignore[no-untyped-call]
    packed_grads = [p.grad for p in model.parameters() if p.grad is not None]
    for expected, got in zip(unpacked_grads, packed_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)

    # With a KV cache (a causal LM's default) transformers skips the per-example mask: examples would
    # attend to the ones before them. The loop turns the cache off, and this is why.
    crossing = ops.loss(forward_logits(model, inputs), inputs["labels"])
    assert abs(float(crossing.detach()) - float(unpacked.detach())) > 1e-3


class _PositionsDropped(nn.Module):
    """A causal LM that ignores position ids: packed examples would attend across their boundaries."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return self.model(input_ids=input_ids, use_cache=False)


def test_a_model_that_attends_across_examples_is_refused(tiny_llama_dir: Path) -> None:
    model, tokenizer = _tiny_llama(tiny_llama_dir)
    packed = pack_examples(tokenizer, _records(8), max_length=64, rows_per_batch=2, seed=0)
    check_packed_attention(model, packed, torch.device("cpu"))
    assert model.training  # the check leaves the training mode as it was
    with pytest.raises(InvalidRunError, match=r"data\.packing: .*crosses the boundaries"):
        check_packed_attention(_PositionsDropped(model), packed, torch.device("cpu"))


def test_packing_shortens_the_epoch(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    hp = Hyperparameters(batch_size=4, max_sequence_length=64)
    examples = Examples(_records(40), [])
    unpacked = training_batches(examples, tokenizer, CausalLanguageModeling(), hp, packing=False)
    packed = training_batches(examples, tokenizer, CausalLanguageModeling(), hp, packing=True)
    assert isinstance(packed, PackedTrainingBatches) and packed.units_per_batch == 1
    assert packed.units < unpacked.units / unpacked.units_per_batch  # fewer steps for the same examples
    assert sum(packed.inputs([b])[1] for b in range(packed.units)) == 40


def test_packed_sft_lowers_the_loss(ray_session: str, tiny_llama_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "sft.jsonl", _records(120))
    spec = make_spec(
        tiny_llama_dir,
        train,
        tmp_path / "out",
        model={"uri": str(tiny_llama_dir), "task": "causal-lm"},
        data={"train": str(train), "format": "jsonl", "packing": True},
        method={"type": "full"},
        hyperparameters={"epochs": 2, "batchSize": 4, "learningRate": 1e-2, "maxSequenceLength": 64},
    )
    # Two workers: each trains its share of the packed batches, the same number of steps.
    result = run_pipeline(spec, fast_options(tmp_path / "out", workers=2))
    before, after = finite(result.metrics_before), finite(result.metrics_after)
    assert after["loss"] < before["loss"] * 0.7, (before, after)
