"""Training throughput of the kubetune runtime (its Ray Train worker loop) against a plain PyTorch loop.

Cases (`--cases`, all by default):

- classification: MiniLM text classification, full fine-tune; batch 16, up to 64 tokens (the topic sentences);
- sft: causal-LM SFT of the tiny Llama (examples/prepare.py) on prompt/completion records (one to six topic
  sentences as the completion), full fine-tune; batch 16, up to 128 tokens, each batch padded to its longest;
- sft-packed: the same with `data.packing: true`: rows of up to 128 tokens, 16 rows a step;
- dpo: `method.objective: dpo` (sigmoid loss, beta 0.1) with LoRA on the tiny Llama, prompt/chosen/rejected
  pairs; 8 pairs (16 rows) a step, up to 128 tokens.

Runtime side: one whole `train()` on a local Ray started for it (2 CPUs, one worker, so 2 torch threads) and
stopped after. Its figure is the worker loop's own `position.samples_per_second`: the training steps only
(building the batch, forward, loss, backward, clipping, optimizer and schedule step, the progress relay), not
Ray's start, model loading, validation or checkpoints.

Plain side: a fresh process per sample (as each training is a fresh Ray worker), timing the same steps the
same way: the same model loaded the same way (transformers, and peft's LoRA with the same options for dpo),
the same examples in the same order (torch's DistributedSampler with the run's seed, as the runtime's), the
same batch size and sequence length, AdamW with the linear decay, clipping at norm 1.0, 2 torch threads.
Batches are built by kubetune's own encoders on both sides, so both train on identical tensors: per step
(`task_ops(...).encode`, as the runtime tokenizes each batch), and for sft-packed once before the steps
(`pack_examples`, as the runtime packs before training; a step then collates its packed rows). The step
itself is written out plainly: cross-entropy of the labels or of the completion tokens; for dpo the policy's
forward over the chosen and rejected rows, the reference forward with the adapters disabled (no gradients),
and the sigmoid DPO loss of the log-ratios.

A sample is one epoch over the case's examples, sized for roughly half a minute of steps on 2 cores (each
case prints its seconds of steps a sample; the runtime's start, about as long again, is not timed). The
sides alternate (runtime, plain, runtime, plain, ...) for `--repeats` rounds, so load that comes and goes
on the machine slows both alike. Printed per case: the median samples/s (pairs/s for dpo) with the spread
(min..max), real tokens/s for the causal-LM cases (prompt and completion tokens, no padding), the ratio
runtime/plain of the medians, the target and PASS or FAIL. `--quick` trains on 1/16 of the examples for
2 rounds: a smoke test, its figures mean nothing.

    python bench/runtime_throughput.py [--cases classification,sft,sft-packed,dpo] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kubetune.runtime.contract import Objective, RunSpec, Task, WorkerResources
from kubetune.runtime.data.load import Examples
from kubetune.runtime.data.packing import pack_examples
from kubetune.runtime.data.task_ops import NOT_MODEL_INPUTS, task_ops
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.ray_cluster import ray_cluster
from kubetune.runtime.reporting.base import Reporters
from kubetune.runtime.training.plan import TrainingPlan
from kubetune.runtime.training.train import train
from runtime_common import (
    LABELS,
    completion_records,
    cpu_flags,
    minilm_dir,
    preference_pairs,
    spread,
    tiny_llama,
    topic_examples,
)
from torch import nn
from torch.nn import functional

THREADS = 2
SEED = 42
MAX_GRAD_NORM = 1.0
DPO_BETA = 0.1
LORA: dict[str, Any] = {"rank": 8, "alpha": 16.0, "dropout": 0.05, "targetModules": ["q_proj", "v_proj", "lm_head"]}
VALIDATION = 16  # examples the runtime validates on after its epoch (not timed)
QUICK_SHARE = 16  # --quick trains on 1/16 of the examples
TARGET = 0.9

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One training setup, run by both sides."""

    name: str
    examples: int  # per sample: one epoch over them
    batch: int
    sequence: int
    learning_rate: float
    method: dict[str, Any] = field(default_factory=lambda: {"type": "full"})
    packing: bool = False

    @property
    def task(self) -> Task:
        return Task.TEXT_CLASSIFICATION if self.name == "classification" else Task.CAUSAL_LM

    @property
    def objective(self) -> Objective:
        return Objective(self.method.get("objective", "sft"))

    def spec(self, model: Path, output: Path) -> RunSpec:
        return RunSpec.model_validate(
            {
                "model": {"uri": str(model), "task": self.task.value},
                "data": {"train": "unused.jsonl", **({"packing": True} if self.packing else {})},
                "method": self.method,
                "hyperparameters": {
                    "learningRate": self.learning_rate,
                    "epochs": 1,
                    "batchSize": self.batch,
                    "maxSequenceLength": self.sequence,
                    "maxGradNorm": MAX_GRAD_NORM,
                    "seed": SEED,
                },
                "output": {"uri": str(output)},
            }
        )

    def data(self, count: int) -> Examples:
        if self.task == Task.TEXT_CLASSIFICATION:
            return topic_examples(count, 1)
        records = preference_pairs(count, 1) if self.objective == Objective.DPO else completion_records(count, 1)
        return Examples(list(records), [])


DPO_METHOD = {"type": "lora", "lora": LORA, "objective": "dpo", "preference": {"beta": DPO_BETA}}
CASES = {
    case.name: case
    for case in (
        Case("classification", 1536, 16, 64, 5e-5),
        Case("sft", 1536, 16, 128, 1e-3),
        Case("sft-packed", 1536, 16, 128, 1e-3, packing=True),
        Case("dpo", 512, 8, 128, 1e-3, DPO_METHOD),
    )
}


def runtime_samples_per_second(case: Case, model: Path, examples: Examples, scratch: Path) -> float:
    """One whole training by the runtime; the worker loop's own samples/s."""
    output = Path(tempfile.mkdtemp(dir=scratch))
    labels = LABELS if case.task == Task.TEXT_CLASSIFICATION else []
    validation = examples.subset(range(VALIDATION))
    plan = TrainingPlan(case.spec(model, output), labels, examples, validation, RuntimeSettings())
    with ray_cluster(num_cpus=THREADS, state_api=True):
        outcome = train(plan, WorkerResources(workers=1), output / "checkpoints", "bench", Reporters([]))
    if outcome.position.train_samples != len(examples):
        raise RuntimeError(f"{case.name}: the runtime trained {outcome.position.train_samples} of {len(examples)}")
    return outcome.position.samples_per_second


def plain_samples_per_second(case: Case, model: Path, count: int) -> float:
    """One epoch of the plain loop, in a fresh process of its own."""
    command = [sys.executable, __file__, "--plain", case.name, str(count), str(model)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the plain {case.name} loop failed:\n{done.stderr[-4000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["samples_per_second"])


def _sampled(units: int) -> list[int]:
    """The runtime's order of an epoch: torch's DistributedSampler, one replica, the run's seed, epoch 0."""
    indices: Any = range(units)
    return list(torch.utils.data.DistributedSampler(indices, num_replicas=1, rank=0, shuffle=True, seed=SEED))


def plain_batches(case: Case, tokenizer: Any, examples: Examples) -> list[Callable[[], Batch]]:
    """Each step's batch, built when the step runs, with kubetune's encoders (see the module's docstring)."""
    if case.packing:
        packed = pack_examples(tokenizer, examples.inputs, case.sequence, case.batch, SEED)
        return [functools.partial(packed.inputs, index) for index in _sampled(len(packed))]
    ops = task_ops(case.task, len(LABELS), case.objective)
    order = _sampled(len(examples))
    groups = [order[start : start + case.batch] for start in range(0, len(order), case.batch)]
    return [functools.partial(ops.encode, tokenizer, examples.subset(group), case.sequence) for group in groups]


def plain_model(case: Case, folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(SEED)
    if case.task == Task.TEXT_CLASSIFICATION:
        classifier: nn.Module = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABELS))
        return classifier
    model: nn.Module = AutoModelForCausalLM.from_pretrained(folder)
    if case.objective != Objective.DPO:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=LORA["rank"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targetModules"],
    )
    adapted: nn.Module = get_peft_model(model, config)
    return adapted


def _logits(model: nn.Module, inputs: Batch, **options: Any) -> torch.Tensor:
    logits: torch.Tensor = model(**{k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}, **options).logits
    return logits


def _completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its completion tokens (position t predicts token t+1)."""
    targets = labels[:, 1:]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logps = torch.gather(log_probs, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * (targets != -100)).sum(dim=1)


def plain_loss(case: Case, model: nn.Module, inputs: Batch) -> torch.Tensor:
    labels = inputs["labels"]
    if case.task == Task.TEXT_CLASSIFICATION:
        return functional.cross_entropy(_logits(model, inputs).float(), labels)
    if case.objective == Objective.SFT:
        logits = _logits(model, inputs, **({"use_cache": False} if case.packing else {}))
        shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        return functional.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100)
    policy = _completion_logps(_logits(model, inputs), labels)  # the chosen rows, then the rejected ones
    with torch.no_grad(), model.disable_adapter():  # type: ignore[operator]
        reference = _completion_logps(_logits(model, inputs), labels)
    ratios, pairs = policy - reference, len(policy) // 2
    return -functional.logsigmoid(DPO_BETA * (ratios[:pairs] - ratios[pairs:])).mean()


def plain_run(case: Case, folder: Path, count: int) -> float:
    """The plain loop's samples/s over one epoch's steps (the timed part, as the runtime times it)."""
    from transformers import AutoTokenizer

    torch.set_num_threads(THREADS)
    random.seed(SEED)
    examples = case.data(count)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = plain_model(case, folder)
    model.train()
    steps = plain_batches(case, tokenizer, examples)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=case.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / len(steps))
    seconds = 0.0
    for build in steps:
        began = time.perf_counter()
        loss = plain_loss(case, model, build())
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - began
    return len(examples) / seconds


def real_tokens(case: Case, folder: Path, examples: Examples) -> int:
    """Prompt and completion tokens of an epoch, as kubetune encodes each example (packing drops none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ops = task_ops(case.task, len(LABELS), case.objective)
    encode = functools.partial(ops.encode, tokenizer, max_length=case.sequence)
    return sum(int(encode(examples.subset([i]))["attention_mask"].sum()) for i in range(len(examples)))


@dataclass
class Measured:
    case: Case
    examples: int
    tokens: int | None  # real tokens of an epoch (causal LM)
    runtime: list[float] = field(default_factory=list)  # samples/s, one per round
    plain: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        unit = "pairs/s" if self.case.objective == Objective.DPO else "samples/s"
        ratio = statistics.median(self.runtime) / statistics.median(self.plain)
        rounds = [r / p for r, p in zip(self.runtime, self.plain, strict=True)]
        lines = [f"{self.case.name} ({self.examples} examples a sample, median of {len(self.runtime)} rounds):"]
        for side, rates in (("runtime (Ray Train worker)", self.runtime), ("plain PyTorch loop", self.plain)):
            line = f"  {side}: {spread(rates)} {unit}"
            if self.tokens is not None:
                line += f", {spread([rate * self.tokens / self.examples for rate in rates], 0)} tokens/s"
            seconds = self.examples / statistics.median(rates)
            lines.append(f"{line}; {seconds:.1f} s of steps a sample")
        lines.append(
            f"  ratio runtime/plain of the medians: {ratio:.2f} (by round {min(rounds):.2f}..{max(rounds):.2f}); "
            f"target >= {TARGET}: {'PASS' if ratio >= TARGET else 'FAIL'}"
        )
        return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, help="rounds of both sides, interleaved (default 5; --quick 2)")
    parser.add_argument("--quick", action="store_true", help=f"a smoke test: 1/{QUICK_SHARE} of the examples")
    parser.add_argument("--plain", nargs=3, help=argparse.SUPPRESS)  # one plain sample, in its own process
    arguments = parser.parse_args()
    if arguments.plain:
        name, count, folder = arguments.plain
        print(json.dumps({"samples_per_second": plain_run(CASES[name], Path(folder), int(count))}))
        return
    unknown = set(arguments.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    cases = [CASES[name] for name in arguments.cases.split(",")]
    repeats = arguments.repeats or (2 if arguments.quick else 5)
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {THREADS} threads", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        llama = tiny_llama(Path(scratch) / "tiny-llama") if any(c.task == Task.CAUSAL_LM for c in cases) else None
        measured, models = {}, {}
        for case in cases:
            count = max(4 * case.batch, case.examples // QUICK_SHARE) if arguments.quick else case.examples
            models[case.name] = llama if llama is not None and case.task == Task.CAUSAL_LM else minilm_dir()
            tokens = real_tokens(case, models[case.name], case.data(count)) if case.task == Task.CAUSAL_LM else None
            measured[case.name] = Measured(case, count, tokens)
        for round_ in range(repeats):
            for case in cases:
                result, model, data = measured[case.name], models[case.name], case.data(measured[case.name].examples)
                print(f"round {round_ + 1}/{repeats}: {case.name}, runtime then plain", flush=True)
                result.runtime.append(runtime_samples_per_second(case, model, data, Path(scratch)))
                result.plain.append(plain_samples_per_second(case, model, len(data)))
    print(f"CPU: {cpu_flags()}; torch {torch.__version__}, {THREADS} threads")
    for result in measured.values():
        print("\n".join(result.lines()))


if __name__ == "__main__":
    main()
