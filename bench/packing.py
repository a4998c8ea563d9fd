"""Causal-LM SFT training tokens/s with `data.packing` against the same examples padded, as the runtime does both.

A length-skewed data set made here (lengths uniform in 16..160 tokens, a 10x spread; the first
half of each example is its prompt, the rest the learned completion) trains a tiny, randomly
initialised Llama (4 layers, 128 wide, sdpa attention). Each side runs the runtime's own steps
over the same examples, so the same real tokens: padded, `batchSize` examples a batch padded to
the longest (`pad_causal`, as `CausalLanguageModeling.encode`); packed, rows of up to
`maxSequenceLength` tokens, `batchSize` rows a batch (`pack_encoded`, as the training loop).
A step is what the loop times: collate, forward, loss, backward, clip, AdamW step. The two sides
are timed step by step in turns (a busy machine slows both alike), for a number of epochs (rounds);
the figures are medians, with the spread (min..max) of the rounds, in wall-clock tokens/s and, as a
check on a shared machine, in tokens per CPU-second of this process.

    python bench/packing.py [--rounds 5] [--examples 192]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import time
from collections.abc import Callable

import torch
from kubetune.runtime.data.causal import IGNORE_INDEX, pad_causal
from kubetune.runtime.data.packing import EncodedExample, pack_encoded
from kubetune.runtime.data.task_ops import CausalLanguageModeling
from kubetune.runtime.evaluate import forward_logits
from runtime_common import cpu_flags
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

    def step(self, batch: int) -> tuple[float, float]:
        """Wall and CPU seconds (this process's, every thread) of one training step."""
        collate, options = self.batches[batch]
        began, began_cpu = time.perf_counter(), time.process_time()
        inputs = collate()
        loss = self.ops.loss(forward_logits(self.model, inputs, **options), inputs["labels"])
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - began, time.process_time() - began_cpu

    def slots(self) -> int:
        """Token positions the model computes over in an epoch (real and padding)."""
        return sum(collate()["input_ids"].numel() for collate, _ in self.batches)


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
    epoch(sides)  # warm-up
    rounds = [epoch(sides) for _ in range(arguments.rounds)]
    for name in sides:
        rates = [tokens / seconds[name][0] for seconds in rounds]
        cpu_rates = [tokens / seconds[name][1] for seconds in rounds]
        print(
            f"{name}: median {statistics.median(rates):.0f} real tokens/s (spread {min(rates):.0f}..{max(rates):.0f}"
            f" over {len(rounds)} rounds); {statistics.median(cpu_rates):.0f} per CPU-second"
        )
    ratios = [seconds["padded"][0] / seconds["packed"][0] for seconds in rounds]
    cpu_ratios = [seconds["padded"][1] / seconds["packed"][1] for seconds in rounds]
    print(
        f"ratio packed/padded tokens/s: median {statistics.median(ratios):.2f} "
        f"(spread {min(ratios):.2f}..{max(ratios):.2f}; target >= {TARGET}); "
        f"per CPU-second {statistics.median(cpu_ratios):.2f} ({min(cpu_ratios):.2f}..{max(cpu_ratios):.2f})"
    )


def epoch(sides: dict[str, Side]) -> dict[str, tuple[float, float]]:
    """One epoch of every side, their steps interleaved: the side least far through its epoch goes next,
    so a load that comes and goes on the machine slows both alike. Wall and CPU seconds per side."""
    done = dict.fromkeys(sides, 0)
    seconds = dict.fromkeys(sides, (0.0, 0.0))
    while any(done[name] < len(side.batches) for name, side in sides.items()):
        name = min((n for n in sides if done[n] < len(sides[n].batches)), key=lambda n: done[n] / len(sides[n].batches))
        wall, cpu = sides[name].step(done[name])
        seconds[name] = (seconds[name][0] + wall, seconds[name][1] + cpu)
        done[name] += 1
    return seconds


if __name__ == "__main__":
    main()
