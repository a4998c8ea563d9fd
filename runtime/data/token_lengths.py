"""How many tokens each training example has, untruncated: what `auto` sequence lengths and plans read."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from kubetune.runtime.contract import Task

# Examples measured at most: a quantile of a few thousand lengths is as good as of all of them.
MAX_MEASURED = 5000


def token_length(tokenizer: Any, task: Task, example: Any, limit: int) -> int:
    """The tokens of one example as training encodes it (causal-LM: prompt and completion, up to `limit`;
    a preference pair: its longer row)."""
    if task == Task.CAUSAL_LM and isinstance(example, dict) and ("chosen" in example or "label" in example):
        from kubetune.runtime.data.causal import fitted
        from kubetune.runtime.data.preference import preference_rows

        rows = preference_rows(tokenizer, example)
        return max(len(fitted(row.prompt_ids, row.completion_ids, limit)[0]) for row in rows)
    if task == Task.CAUSAL_LM:
        from kubetune.runtime.data.task_ops import encode_causal

        ids, _ = encode_causal(tokenizer, example, limit)
        return len(ids)
    return len(tokenizer(str(example), truncation=False)["input_ids"])


def token_lengths(
    tokenizer: Any, task: Task, examples: Sequence[Any], limit: int, *, sample: int | None = None, seed: int = 0
) -> list[int]:
    """The token lengths of `examples`, or of a seeded sample of `sample` of them when there are more."""
    chosen = examples
    if sample is not None and len(examples) > sample:
        chosen = [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), sample))]
    return [token_length(tokenizer, task, example, limit) for example in chosen]
