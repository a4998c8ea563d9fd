"""int8 (torchao, as the runtime exports it) against fp32: size on disk, CPU p50 latency, test accuracy.

MiniLM is first fine-tuned briefly on the topics data (a plain loop: the point here is the
compressed model, not training); the fp32 model is saved, the runtime's `quantize_folder`
writes the int8 variant, and both are reloaded with transformers and measured the same way.
Latency: batch 16 x 64 tokens, both compiled with torch.compile (dynamic int8 is only fast
compiled on CPU); eager figures are printed too.

    python bench/runtime_int8.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from kubetune.runtime.compress import latency_ms_p50, quantize_folder, weights_size
from kubetune.runtime.contract import Compression, Task
from kubetune.runtime.data import Examples
from kubetune.runtime.evaluate import evaluate
from runtime_common import minilm_dir, topics

LABELS = ["cooking", "finance", "sports", "weather"]
SEQUENCE = 64
TARGETS = {"size": 0.35, "latency": 0.7, "accuracy_drop_points": 1.0}


def _examples(count: int, seed: int) -> Examples:
    records = topics(count, seed)
    return Examples([r["text"] for r in records], [LABELS.index(r["label"]) for r in records])


def fine_tuned(folder: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_dir(), num_labels=4, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train = _examples(256, seed=1)
    model.train()
    for start in range(0, len(train), 16):
        batch = tokenizer(
            train.texts[start : start + 16], padding=True, truncation=True, max_length=SEQUENCE, return_tensors="pt"
        )
        labels = torch.tensor(train.label_ids[start : start + 16])
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    test = _examples(400, seed=9)
    with tempfile.TemporaryDirectory() as root:
        fp32_folder = fine_tuned(Path(root) / "fp32")
        int8_folder = Path(root) / "int8"
        compression = Compression.model_validate(
            {"quantization": {"method": "int8-dynamic", "includeEmbeddings": True}}
        )
        quantize_folder(fp32_folder, int8_folder, Task.TEXT_CLASSIFICATION, compression)
        tokenizer = AutoTokenizer.from_pretrained(fp32_folder)
        results = {}
        for name, folder in (("fp32", fp32_folder), ("int8", int8_folder)):
            model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
            accuracy = evaluate(model, tokenizer, test, 4, SEQUENCE)["accuracy"]
            eager = latency_ms_p50(model, tokenizer, Task.TEXT_CLASSIFICATION, test, SEQUENCE, compile_model=False)
            began = time.perf_counter()
            compiled = latency_ms_p50(model, tokenizer, Task.TEXT_CLASSIFICATION, test, SEQUENCE, compile_model=True)
            compile_s = time.perf_counter() - began
            results[name] = (weights_size(folder), eager, compiled, accuracy)
            print(
                f"{name}: {results[name][0] / 1e6:.1f} MB, p50 eager {eager:.1f} ms, compiled {compiled:.1f} ms "
                f"(compile+measure {compile_s:.0f} s), accuracy {accuracy:.4f}"
            )
    (size32, eager32, compiled32, acc32), (size8, eager8, compiled8, acc8) = results["fp32"], results["int8"]
    print(f"size int8/fp32: {size8 / size32:.3f} (target <= {TARGETS['size']})")
    print(f"latency p50 int8/fp32, both compiled: {compiled8 / compiled32:.3f} (target <= {TARGETS['latency']})")
    print(f"latency p50 int8 compiled / fp32 eager: {compiled8 / eager32:.3f}; eager/eager: {eager8 / eager32:.3f}")
    print(f"accuracy drop: {(acc32 - acc8) * 100:.2f} points (target <= {TARGETS['accuracy_drop_points']})")


if __name__ == "__main__":
    main()
