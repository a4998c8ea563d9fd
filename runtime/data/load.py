"""Load a run's examples from its URIs and split them into train/validation/test.

Each split either has a URI of its own or is carved out of the training data with a
seeded split (stratified by label for classification). Every problem with the data
raises `DataError` naming the spec field and the URI, so a user can fix one or the other.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubetune.runtime.contract import PREFERENCE_OBJECTIVES, DataFormat, DataSpec, Objective, RunSpec, Task
from kubetune.runtime.contract.search import Metric
from kubetune.runtime.io.errors import DataError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import hub_dataset_id

from .images import read_image_folder, resolve_images
from .preference import is_paired, preference_record, unpaired
from .readers import Record, read_records


@dataclass(frozen=True)
class Examples:
    """Model inputs (texts, prompt/completion or chat records, image paths or bytes) and label ids.

    `label_ids` is empty for causal-LM data, which has no labels.
    """

    inputs: list[Any]
    label_ids: list[int]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def texts(self) -> list[str]:
        return [str(item) for item in self.inputs]

    def subset(self, indices: Iterable[int]) -> Examples:
        chosen = list(indices)
        return Examples([self.inputs[i] for i in chosen], [self.label_ids[i] for i in chosen] if self.label_ids else [])

    def shard(self, rank: int, world: int) -> Examples:
        """Every `world`-th example from `rank`: disjoint shards that together are the whole set."""
        return self.subset(range(rank, len(self), world))


# Kept under its first name: text classification was the first task.
@dataclass(frozen=True)
class TaskData:
    """The three splits, the label names in id order (none for causal LM), and where each split came from."""

    train: Examples
    validation: Examples
    test: Examples
    labels: list[str]
    sources: dict[str, str]


def _column(records: list[Record], name: str, spec_field: str, uri: str) -> list[Any]:
    values = []
    for number, record in enumerate(records, start=1):
        if name not in record or record[name] is None:
            present = ", ".join(sorted(record)) or "none"
            raise DataError(
                spec_field, f"field {name!r} is missing in example {number} of {uri} (fields present: {present})"
            )
        values.append(record[name])
    return values


def _label_key(value: Any) -> str:
    """Labels compare as text, so 1 in JSON and "1" in CSV are the same label."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def infer_labels(values: Iterable[Any]) -> list[str]:
    """Sorted distinct labels (numerically when all of them are integers)."""
    keys = {_label_key(v) for v in values}
    if all(key.lstrip("-").isdigit() for key in keys):
        return sorted(keys, key=int)
    return sorted(keys)


def _label_ids(values: list[Any], labels: list[str], uri: str) -> list[int]:
    index = {name: i for i, name in enumerate(labels)}
    ids = []
    for number, value in enumerate(values, start=1):
        key = _label_key(value)
        if key not in index:
            raise DataError(
                "model.labels",
                f"label {key!r} in example {number} of {uri} is not one of the model's labels ({', '.join(labels)})",
            )
        ids.append(index[key])
    return ids


@dataclass(frozen=True)
class _RawSplit:
    """Inputs with raw labels (names as in the file; empty for causal LM) and their source."""

    inputs: list[Any]
    labels: list[Any]
    uri: str

    def subset(self, indices: list[int], uri: str | None = None) -> _RawSplit:
        labels = [self.labels[i] for i in indices] if self.labels else []
        return _RawSplit([self.inputs[i] for i in indices], labels, uri or self.uri)


def _read(uri: str, data: DataSpec, settings: RuntimeSettings, field: str) -> tuple[list[Record], str]:
    """The records at `uri` (files: jsonl, csv, parquet; or a split of a dataset on the Hugging Face Hub) and
    their source for the lineage: `uri` itself, for a Hub dataset with the commit read (`uri@<commit>`)."""
    if hub_dataset_id(uri) is not None:
        from .hub_datasets import read_hub_records

        return read_hub_records(uri, data.hub, field)
    return read_records(uri, data.format, settings, field), uri


def _text_split(uri: str, data: DataSpec, settings: RuntimeSettings, field: str) -> _RawSplit:
    records, source = _read(uri, data, settings, field)
    texts = [str(t) for t in _column(records, data.fields.text, "data.fields.text", uri)]
    return _RawSplit(texts, _column(records, data.fields.label, "data.fields.label", uri), source)


def _chat_messages(value: Any, number: int, uri: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(field, f"example {number} of {uri}: messages must be a non-empty list of {{role, content}}")
    messages = []
    for message in value:
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(field, f"example {number} of {uri}: every message needs a role and a content")
        messages.append({"role": str(message["role"]), "content": str(message["content"])})
    if messages[-1]["role"] != "assistant":
        raise DataError(field, f"example {number} of {uri}: the last message must be the assistant's (the completion)")
    return messages


def _causal_split(uri: str, data: DataSpec, settings: RuntimeSettings, field: str) -> _RawSplit:
    """Prompt/completion pairs, or chat conversations when the records have no prompt field."""
    records, source = _read(uri, data, settings, field)
    fields = data.fields
    if fields.prompt in records[0]:
        prompts = _column(records, fields.prompt, "data.fields.prompt", uri)
        completions = _column(records, fields.completion, "data.fields.completion", uri)
        inputs: list[Any] = [
            {"prompt": str(p), "completion": str(c)} for p, c in zip(prompts, completions, strict=True)
        ]
    elif fields.messages in records[0]:
        column = _column(records, fields.messages, "data.fields.messages", uri)
        inputs = [
            {"messages": _chat_messages(value, n, uri, "data.fields.messages")} for n, value in enumerate(column, 1)
        ]
    else:
        present = ", ".join(sorted(records[0])) or "none"
        raise DataError(
            "data.fields.prompt",
            f"example 1 of {uri} has neither {fields.prompt!r} nor {fields.messages!r} (fields present: {present})",
        )
    return _RawSplit(inputs, [], source)


def _image_split(uri: str, data: DataSpec, settings: RuntimeSettings, field: str) -> _RawSplit:
    if data.format == DataFormat.IMAGE_FOLDER and hub_dataset_id(uri) is None:
        images, labels = read_image_folder(uri, settings, field)
        return _RawSplit(images, labels, uri)
    records, source = _read(uri, data, settings, field)
    column = _column(records, data.fields.image, "data.fields.image", uri)
    labels = _column(records, data.fields.label, "data.fields.label", uri)
    return _RawSplit(resolve_images(column, uri, settings, "data.fields.image"), labels, source)


def _preference_loader(objective: Objective) -> Callable[[str, DataSpec, RuntimeSettings, str], _RawSplit]:
    """A loader of preference records for `objective` (pairs; kto also prompt/completion/label records)."""

    def load(uri: str, data: DataSpec, settings: RuntimeSettings, field: str) -> _RawSplit:
        records, source = _read(uri, data, settings, field)
        inputs = [preference_record(r, n, uri, data, objective) for n, r in enumerate(records, 1)]
        return _RawSplit(inputs, [], source)

    return load


_LOADERS: dict[Task, Callable[[str, DataSpec, RuntimeSettings, str], _RawSplit]] = {
    Task.TEXT_CLASSIFICATION: _text_split,
    Task.CAUSAL_LM: _causal_split,
    Task.IMAGE_CLASSIFICATION: _image_split,
}


def _seeded_split(keys: list[str], fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """Indices of train, validation and test, keeping each key's (label's) share in every part."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        by_key[key].append(i)
    rng = random.Random(seed)
    train: list[int] = []
    validation: list[int] = []
    test: list[int] = []
    for key in sorted(by_key):
        indices = by_key[key]
        rng.shuffle(indices)
        n_validation = round(len(indices) * fractions[0])
        n_test = round(len(indices) * fractions[1])
        validation.extend(indices[:n_validation])
        test.extend(indices[n_validation : n_validation + n_test])
        train.extend(indices[n_validation + n_test :])
    for part in (train, validation, test):
        rng.shuffle(part)
    return train, validation, test


def load_data(spec: RunSpec, settings: RuntimeSettings) -> TaskData:
    """Read and split the run's data; label ids follow `model.labels` (or the sorted training labels)."""
    data = spec.data
    task = spec.model.task
    objective = spec.method.resolved_objective
    load = _preference_loader(objective) if objective in PREFERENCE_OBJECTIVES else _LOADERS[task]
    train = load(data.train, data, settings, "data.train")
    validation = load(data.validation, data, settings, "data.validation") if data.validation else None
    test = load(data.test, data, settings, "data.test") if data.test else None

    if validation is None or test is None:
        fractions = (
            0.0 if validation is not None else data.split.validation_fraction,
            0.0 if test is not None else data.split.test_fraction,
        )
        keys = [_label_key(v) for v in train.labels] if train.labels else [""] * len(train.inputs)
        train_idx, validation_idx, test_idx = _seeded_split(keys, fractions, data.split.seed)
        # A carved-out split is named after its source, so the manifest's lineage tells them apart.
        validation = validation or train.subset(validation_idx, f"{train.uri}#validation")
        test = test or train.subset(test_idx, f"{train.uri}#test")
        train = train.subset(train_idx)
    if data.max_samples is not None and len(train.inputs) > data.max_samples:
        train = train.subset(random.Random(data.split.seed).sample(range(len(train.inputs)), data.max_samples))

    for name, split, field in (
        ("training", train, "data.train"),
        ("validation", validation, "data.split.validationFraction"),
        ("test", test, "data.split.testFraction"),
    ):
        if not split.inputs:
            raise DataError(field, f"the {name} set is empty (from {split.uri}); give it data or a larger fraction")

    if objective == Objective.KTO:  # kto learns from single examples; held-out pairs still score as pairs
        train = _RawSplit(unpaired(train.inputs), [], train.uri)
    if spec.search_metric == Metric.PREFERENCE_ACCURACY and not all(map(is_paired, validation.inputs)):
        raise DataError(
            "search.metric",
            f"preferenceAccuracy compares the two completions of a pair; the validation set ({validation.uri}) "
            "has prompt/completion/label records: use rewardMargin or give pairs",
        )

    labels: list[str] = []
    if task != Task.CAUSAL_LM:
        labels = spec.model.labels or infer_labels(train.labels)
        if len(labels) < 2:
            raise DataError("data.fields.label", f"classification needs at least 2 labels; {train.uri} has {labels}")

    def examples(split: _RawSplit) -> Examples:
        return Examples(split.inputs, _label_ids(split.labels, labels, split.uri) if labels else [])

    return TaskData(
        train=examples(train),
        validation=examples(validation),
        test=examples(test),
        labels=labels,
        sources={"train": train.uri, "validation": validation.uri, "test": test.uri},
    )
