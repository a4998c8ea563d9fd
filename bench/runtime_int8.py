"""int8 (torchao, as the runtime exports and serves it) against fp32: size on disk, CPU p50 latency, test accuracy.

MiniLM is first fine-tuned briefly on the topics data (a plain loop: the point here is the
compressed model, not training); the fp32 model is saved, the runtime's `quantize_folder`
writes the int8 variants, and all are loaded back the way the runtime measures and serves
them (`load_variant`: torchao's int8 weights, on CPU int8 kernels) and measured the same
way. Latency: batch 16 x 64 tokens, eager, timed in interleaved rounds. The script says
whether this CPU has VNNI or AMX (int8 dot products in one instruction; without them int8
gains less).

    python bench/runtime_int8.py
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from kubetune.runtime.contract import Compression, Task
from kubetune.runtime.evaluate import evaluate, predict
from kubetune.runtime.variants.int8 import quantize_folder
from kubetune.runtime.variants.load import load_variant
from kubetune.runtime.variants.measure import weights_size
from runtime_common import LABELS, minilm_dir, topic_examples

SEQUENCE = 64
TARGETS = {"size": 0.35, "latency": 0.7, "accuracy_drop_points": 1.0}


def fine_tuned(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=4, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train = topic_examples(256, seed=1)
    model.train()
    for start in range(0, len(train), 16):
        batch = tokenizer(
            train.texts[start : start + 16], padding=True, truncation=True, max_length=SEQUENCE, return_tensors="pt"
        )
        labels = torch.tensor(train.label_ids[start : start + 16])
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


THREADS = (1, 2)
ROUNDS = 8  # fp32 and int8 are timed in turns, so a busy machine slows both alike
RUNS_PER_ROUND = 5


@torch.no_grad()
def _timings(models: dict[str, Any], inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median milliseconds of one forward pass per model, measured in interleaved rounds."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        for _ in range(3):  # warm-up (and compilation)
            model(**inputs)
    for _ in range(ROUNDS):
        for name, model in models.items():
            for _ in range(RUNS_PER_ROUND):
                began = time.perf_counter()
                model(**inputs)
                samples[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(values) for name, values in samples.items()}


def _has_int8_instructions() -> bool:
    """Whether the CPU has VNNI or AMX; without them torch's int8 x int8 matmul takes a slow path."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_tile"))


def main() -> None:
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    test = topic_examples(400, seed=9)
    with tempfile.TemporaryDirectory() as root:
        fp32_folder = fine_tuned(Path(root) / "fp32")
        folders = {"fp32": fp32_folder}
        for name, method in (("int8", "int8-dynamic"), ("int8-weight-only", "int8-weight-only")):
            folders[name] = Path(root) / name
            compression = Compression.model_validate({"quantization": {"method": method, "includeEmbeddings": True}})
            quantize_folder(fp32_folder, folders[name], Task.TEXT_CLASSIFICATION, compression)
        tokenizer = AutoTokenizer.from_pretrained(fp32_folder)
        models = {name: load_variant(folder, Task.TEXT_CLASSIFICATION) for name, folder in folders.items()}
        sizes = {name: weights_size(folder) for name, folder in folders.items()}
    accuracy = {name: evaluate(model, tokenizer, test, 4, SEQUENCE)["accuracy"] for name, model in models.items()}
    # This test split is easy (the fp32 model may score 1.0): agreement with fp32 says more.
    labels = {name: predict(model, tokenizer, test, SEQUENCE).label_ids for name, model in models.items()}
    agreement = {
        name: sum(a == b for a, b in zip(labels[name], labels["fp32"], strict=True)) / len(test) for name in models
    }
    # The design's fixed batch: 16 examples padded to 64 tokens.
    inputs = dict(
        tokenizer(test.texts[:16], padding="max_length", max_length=SEQUENCE, truncation=True, return_tensors="pt")
    )
    for name in models:
        print(
            f"{name}: {sizes[name] / 1e6:.1f} MB, test accuracy {accuracy[name]:.4f}, "
            f"same prediction as fp32 {agreement[name]:.2%}"
        )
    print(f"size int8/fp32: {sizes['int8'] / sizes['fp32']:.3f} (target <= {TARGETS['size']})")
    # One thread is a serving replica's default (Ray gives an actor one CPU); two use this machine.
    for threads in THREADS:
        torch.set_num_threads(threads)
        latency = _timings(models, inputs)
        print(
            f"{threads} thread(s): p50 "
            + ", ".join(f"{name} {ms:.1f} ms" for name, ms in latency.items())
            + f"; int8/fp32 {latency['int8'] / latency['fp32']:.3f} (target <= {TARGETS['latency']}), "
            f"int8-weight-only/fp32 {latency['int8-weight-only'] / latency['fp32']:.3f}"
        )
    print(f"CPU int8 dot-product instructions (VNNI/AMX) available: {_has_int8_instructions()}")
    drop = (accuracy["fp32"] - accuracy["int8"]) * 100
    print(f"accuracy drop: {drop:.2f} points (target <= {TARGETS['accuracy_drop_points']})")


if __name__ == "__main__":
    main()
