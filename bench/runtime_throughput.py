"""Training throughput of the kubetune runtime (Ray Train worker) against a plain PyTorch loop.

Both fully fine-tune MiniLM on the same examples with the same batch size, sequence length,
optimizer and thread count. The runtime's figure is what its training loop measures on the
worker (steps only, no validation or checkpoints); the baseline is timed the same way here.

    python bench/runtime_throughput.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from kubetune.runtime.contract import RunSpec, WorkerResources
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.ray_cluster import ray_cluster
from kubetune.runtime.reporting.base import Reporters
from kubetune.runtime.training.plan import TrainingPlan
from kubetune.runtime.training.train import train
from runtime_common import LABELS, minilm_dir, topic_examples

EXAMPLES = 320
BATCH = 16
SEQUENCE = 64
THREADS = 2
TARGET = 0.9


def _spec(output: Path) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": {"uri": str(minilm_dir())},
            "data": {"train": "unused.jsonl"},
            "method": {"type": "full"},
            "hyperparameters": {
                "learningRate": 5e-5,
                "epochs": 1,
                "batchSize": BATCH,
                "maxSequenceLength": SEQUENCE,
                "maxGradNorm": 1.0,
            },
            "output": {"uri": str(output)},
        }
    )


def runtime_samples_per_second(output: Path) -> float:
    spec = _spec(output)
    plan = TrainingPlan(
        spec, LABELS, topic_examples(EXAMPLES, 1), topic_examples(EXAMPLES, 2).subset(range(32)), RuntimeSettings()
    )
    with ray_cluster(num_cpus=THREADS, state_api=True):
        outcome = train(plan, WorkerResources(workers=1), output / "checkpoints", "bench", Reporters([]))
    return outcome.position.samples_per_second


def plain_samples_per_second() -> float:
    """The same training as a bare loop: tokenize, forward, cross-entropy, backward, clip, AdamW step."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(THREADS)
    torch.manual_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=len(LABELS))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    examples = topic_examples(EXAMPLES, 1)
    order = torch.randperm(len(examples)).tolist()
    seconds, samples = 0.0, 0
    for start in range(0, len(order), BATCH):
        chosen = order[start : start + BATCH]
        began = time.perf_counter()
        batch = tokenizer(
            [examples.texts[i] for i in chosen], padding=True, truncation=True, max_length=SEQUENCE, return_tensors="pt"
        )
        labels = torch.tensor([examples.label_ids[i] for i in chosen])
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - began
        samples += len(chosen)
    return samples / seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        baseline = plain_samples_per_second()
        runtime = runtime_samples_per_second(Path(folder))
    ratio = runtime / baseline
    print(f"plain PyTorch loop: {baseline:.1f} samples/s")
    print(f"kubetune runtime (Ray Train worker): {runtime:.1f} samples/s")
    print(f"ratio runtime/plain: {ratio:.2f} (target >= {TARGET})")


if __name__ == "__main__":
    main()
