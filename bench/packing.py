"""Causal-LM SFT training tokens/s with `data.packing` against the same examples padded, as the runtime does both.

A length-skewed data set made here (lengths uniform in 16..160 tokens, a 10x spread; the first
half of each example is its prompt, the rest the learned completion) trains a tiny, randomly
initialised Llama (4 layers, 128 wide, sdpa attention). Each side runs the runtime's own steps
over the same examples, so the same real tokens: padded, `batchSize` examples a batch padded to
the longest (`pad_causal`, as `CausalLanguageModeling.encode`); packed, rows of up to
`maxSequenceLength` tokens, `batchSize` rows a batch (`pack_encoded`, as the training loop).
A step is what the loop times: collate, forward, loss, backward, clip, AdamW step. The two sides
are timed in interleaved rounds (a busy machine slows both alike); the figures are medians, with
the spread (min..max) of the rounds.

    python bench/packing.py [--rounds 5] [--examples 192]
"""

from __future__ import annotations

import argparse
import functools
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from kubetune.runtime.data.packing import EncodedExample, pack_encoded
from kubetune.runtime.data.task_ops import IGNORE_INDEX, CausalLanguageModeling, pad_causal
from kubetune.runtime.evaluate import forward_logits
from torch import nn

BATCH = 8
SEQUENCE = 160
LENGTHS = (16, 160)
VOCABULARY = 2000
THREADS = 2
TARGET = 1.5
PAD = 0


def skewed_examples(count: int, seed: int) -> list[EncodedExample]:
    """Random token ids with lengths uniform in LENGTHS; labels on the second half (the completion)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(*LENGTHS)
        ids = [rng.randrange(1, VOCABULARY) for _ in range(length)]
        prompt = length // 2
        examples.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCABULARY,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQUENCE,
        pad_token_id=PAD,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config)
    model.train()
    return model


# One side: the batches of an epoch, each as (collate, forward options).
Batch = tuple[Callable[[], dict[str, torch.Tensor]], dict[str, object]]


def padded_batches(examples: list[EncodedExample], seed: int) -> list[Batch]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # as the sampler does: batches of neighbours in a shuffle
    groups = [order[start : start + BATCH] for start in range(0, len(order), BATCH)]
    return [(functools.partial(pad_causal, [examples[i] for i in group], PAD), {}) for group in groups]


def packed_batches(examples: list[EncodedExample], seed: int) -> list[Batch]:
    packed = pack_encoded(examples, SEQUENCE, BATCH, seed, PAD)
    return [(functools.partial(packed.inputs, batch), {"use_cache": False}) for batch in range(len(packed))]


class Side:
    """A model with its optimizer, trained on one side's batches."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.model = tiny_llama()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.ops = CausalLanguageModeling()

    def epoch_seconds(self) -> float:
        seconds = 0.0
        for collate, options in self.batches:
            began = time.perf_counter()
            inputs = collate()
            loss = self.ops.loss(forward_logits(self.model, inputs, **options), inputs["labels"])
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            seconds += time.perf_counter() - began
        return seconds

    def slots(self) -> int:
        """Token positions the model computes over in an epoch (real and padding)."""
        return sum(collate()["input_ids"].numel() for collate, _ in self.batches)


def cpu_flags() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return f"{model}; {' '.join(flag for flag in wanted if flag in flags) or 'none of ' + ' '.join(wanted)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=192)
    arguments = parser.parse_args()
    torch.set_num_threads(THREADS)
    examples = skewed_examples(arguments.examples, seed=1)
    tokens = sum(len(ids) for ids, _ in examples)
    sides = {"padded": Side(padded_batches(examples, seed=2)), "packed": Side(packed_batches(examples, seed=2))}
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {THREADS} threads")
    print(
        f"{len(examples)} examples, {tokens} real tokens (lengths {LENGTHS[0]}..{LENGTHS[1]}); batch {BATCH}, "
        f"maxSequenceLength {SEQUENCE}"
    )
    for name, side in sides.items():
        slots = side.slots()
        print(f"{name}: {len(side.batches)} steps an epoch, {slots} token slots ({tokens / slots:.0%} real)")
    for side in sides.values():
        side.epoch_seconds()  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in sides}
    ratios = []
    for round_number in range(arguments.rounds):
        order = list(sides) if round_number % 2 == 0 else list(reversed(sides))
        seconds = {name: sides[name].epoch_seconds() for name in order}
        for name in sides:
            rates[name].append(tokens / seconds[name])
        ratios.append(rates["packed"][-1] / rates["padded"][-1])
    for name, values in rates.items():
        print(
            f"{name}: median {statistics.median(values):.0f} real tokens/s "
            f"(spread {min(values):.0f}..{max(values):.0f} over {arguments.rounds} rounds)"
        )
    ratio = statistics.median(rates["packed"]) / statistics.median(rates["padded"])
    print(f"ratio packed/padded: {ratio:.2f} (rounds {min(ratios):.2f}..{max(ratios):.2f}; target >= {TARGET})")


if __name__ == "__main__":
    main()
