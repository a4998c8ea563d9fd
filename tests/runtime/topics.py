"""A small, seeded text-classification dataset: short sentences about four topics.

Each class has its own vocabulary of subjects, verbs and objects, and sentences come
from shared templates, so a model must read the words (not the sentence shape) to
tell the topics apart.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

TOPICS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": ["the striker", "the goalkeeper", "our team", "the coach", "the runner", "the tennis player"],
        "verb": ["scored", "won", "trained for", "defended", "sprinted through", "celebrated"],
        "object": ["the final match", "a penalty kick", "the championship", "the marathon", "the second half"],
    },
    "finance": {
        "subject": ["the bank", "investors", "the central bank", "the company", "the stock market", "the fund"],
        "verb": ["raised", "cut", "reported", "invested in", "sold", "borrowed"],
        "object": ["interest rates", "quarterly earnings", "its shares", "the bond yield", "a large loan"],
    },
    "weather": {
        "subject": ["a cold front", "the storm", "heavy rain", "the forecast", "strong wind", "the heatwave"],
        "verb": ["brought", "hit", "predicted", "swept across", "flooded", "cooled"],
        "object": ["the coast", "snow in the mountains", "thunder at night", "sunny skies", "the valley"],
    },
    "cooking": {
        "subject": ["the chef", "my grandmother", "the baker", "the recipe", "the cook", "our kitchen"],
        "verb": ["baked", "seasoned", "stirred", "roasted", "chopped", "simmered"],
        "object": ["the garlic bread", "a tomato soup", "fresh pasta", "the chicken", "onions and butter"],
    },
}
TEMPLATES = [
    "{subject} {verb} {object}.",
    "yesterday {subject} {verb} {object}.",
    "i read that {subject} {verb} {object} again.",
    "everyone says {subject} {verb} {object} this week.",
]
LABELS = sorted(TOPICS)


def make_examples(count: int, seed: int) -> list[dict[str, Any]]:
    """`count` labelled sentences, classes balanced, in a seeded random order."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        label = LABELS[i % len(LABELS)]
        words = {part: rng.choice(options) for part, options in TOPICS[label].items()}
        examples.append({"text": rng.choice(TEMPLATES).format(**words), "label": label})
    rng.shuffle(examples)
    return examples


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records), path)
    return path
