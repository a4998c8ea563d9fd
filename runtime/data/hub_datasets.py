"""Datasets on the Hugging Face Hub (hf://datasets/<org>/<name>): their records, read with the datasets library.

Where the hub answers, datasets downloads the files of the configuration into the Hugging Face cache
(HF_HUB_CACHE, `datasets--<org>--<name>/snapshots/<commit>/`) and reads them. Offline (HF_HUB_OFFLINE), or
where the hub does not answer (asked as for models, see `hub`), the dataset is read from that cache alone:
the snapshot of the revision (`refs/<branch or tag>`, or the commit itself) that an earlier download, `hf
download --repo-type dataset` or an image build left there. datasets' own offline path would read only the
Arrow files an earlier `load_dataset` prepared in HF_DATASETS_CACHE, whichever version it finds there,
whatever the revision: the hub cache is what an image ships, and what keeps a pinned revision pinned.

Every record then goes through the loaders as a record of a jsonl file would, with the field names of
`data.fields`; class labels come as their names, images as their bytes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kubetune.runtime.contract import HubDataset
from kubetune.runtime.contract.data import HUB_SPLITS
from kubetune.runtime.contract.report import Unavailable
from kubetune.runtime.io.errors import DataError, DatasetUnavailableError
from kubetune.runtime.io.storage import hub_dataset_id

from .hub import HubSetup, hub_setup, hub_unreachable, is_unavailable, unreachable_message
from .readers import Record

LOGGER = logging.getLogger(__name__)
# Most dataset repositories have their card; any answer of the hub for it (even 404) says the hub is there.
DATASET_PROBE_FILE = "README.md"
_SLICE = re.compile(r"\[[^\]]*\]$")


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The folder of the dataset at `revision` (main when None) in the Hugging Face hub cache; None if absent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


def offline_message(uri: str, repo_id: str, revision: str | None, setup: HubSetup) -> str:
    download = f"hf download --repo-type dataset {repo_id}" + (f" --revision {revision}" if revision else "")
    return (
        f"{uri}{_at(revision)} is not in the Hugging Face cache at {setup.cache}, and offline mode (HF_HUB_OFFLINE) "
        f"never asks a hub: download it into the runtime image's cache first ({download}, with HF_HUB_CACHE "
        "outside /home/ray/.cache), use an s3:// or pvc:// copy of its files, or let the run reach a hub or "
        "mirror (spec.storage.huggingFace)"
    )


def dataset_source(repo_id: str, revision: str | None, uri: str, field: str) -> str:
    """What datasets loads: the repository id where the hub answers, else the folder of its cached snapshot.

    DatasetUnavailableError (naming `field`) when neither the hub nor the cache can deliver it now.
    """
    setup = hub_setup()
    if setup.offline:
        snapshot = cached_snapshot(repo_id, revision)
        if snapshot is None:
            raise DatasetUnavailableError(Unavailable.MODEL_HUB, field, offline_message(uri, repo_id, revision, setup))
        return str(snapshot)
    reason = hub_unreachable(repo_id, revision, setup, repo_type="dataset", probe_file=DATASET_PROBE_FILE)
    if reason is None:
        return repo_id
    snapshot = cached_snapshot(repo_id, revision)
    if snapshot is None:
        raise DatasetUnavailableError(Unavailable.MODEL_HUB, field, unreachable_message(uri, setup, reason, "dataset"))
    LOGGER.warning("dataset hub %s did not answer (%s): reading %s from the cache", setup.endpoint, reason, uri)
    return str(snapshot)


def _failure(error: Exception, uri: str, field: str, doing: str) -> Exception:
    """What a failure of datasets means: a hub that cannot deliver now, or data that cannot be read as named."""
    if is_unavailable(error):
        reason = f"{doing}: {type(error).__name__}: {error}"
        message = unreachable_message(uri, hub_setup(), reason, "dataset")
        return DatasetUnavailableError(Unavailable.MODEL_HUB, field, message)
    # datasets raises its own errors, the builtin ones, and RuntimeError for a repository that holds a loading
    # script (which datasets no longer runs): none of them goes away when the run is retried.
    if isinstance(error, (OSError, ValueError, RuntimeError)) or type(error).__module__.startswith("datasets"):
        return DataError(field, f"cannot read {uri}: {doing}: {error}")
    return error


def _builder(source: str, repo_id: str, options: HubDataset, uri: str, field: str) -> Any:
    import datasets

    # A cached snapshot is a folder of that very revision already.
    revision = options.revision if source == repo_id else None
    try:
        return datasets.load_dataset_builder(source, options.config, revision=revision)
    except Exception as error:
        # Asked only where the hub (or the cache) answered: the configurations are then listed from there.
        config_problem = None if is_unavailable(error) else _config_problem(source, revision, options.config, uri)
        if config_problem is not None:
            raise DataError("data.hub.config", config_problem) from None
        failure = _failure(error, uri, field, "cannot find its data files")
        if failure is error:
            raise
        raise failure from None


def _config_problem(source: str, revision: str | None, config: str | None, uri: str) -> str | None:
    """What is wrong with `data.hub.config` for the dataset, if that is what failed."""
    import datasets

    try:
        names = datasets.get_dataset_config_names(source, revision=revision)
    except Exception:  # the dataset itself cannot be read: that is the problem to report
        return None
    listed = ", ".join(names)
    if config is not None and config not in names:
        return f"{uri} has no configuration {config!r}; it has: {listed}"
    if config is None and len(names) > 1:
        return f"{uri} has several configurations and no default: name one of {listed}"
    return None


def _split_names(split: str) -> list[str]:
    """The splits an expression reads: "train[:90%]+test" reads train and test."""
    return [_SLICE.sub("", part) for part in split.split("+")]


def _available_splits(builder: Any) -> list[str]:
    data_files = builder.config.data_files
    if data_files:
        return list(data_files)
    return list(builder.info.splits or {})


def _check_split(builder: Any, split: str, uri: str, split_field: str) -> None:
    available = _available_splits(builder)
    if not available:
        return  # datasets names the splits it finds when it reads them
    for name in _split_names(split):
        if name not in available:
            config = f" (configuration {builder.config.name})" if builder.config.name != "default" else ""
            raise DataError(
                split_field,
                f"{uri}{config} has no split {name!r}; its splits are: {', '.join(available)}",
            )


def _records(dataset: Any) -> list[Record]:
    """The rows as plain records: class labels by name, images as {bytes, path} (not decoded)."""
    from datasets import ClassLabel, Image

    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    class_names = {
        column: feature.names for column, feature in dataset.features.items() if isinstance(feature, ClassLabel)
    }
    records: list[Record] = dataset.to_list()
    for record in records:
        for column, names in class_names.items():
            value = record.get(column)
            if isinstance(value, int) and 0 <= value < len(names):  # -1: no label (a hidden test set's)
                record[column] = names[value]
    return records


def read_hub_records(uri: str, hub: HubDataset | None, field: str) -> tuple[list[Record], str]:
    """Every record of the split of hf://datasets/ `uri` that `field` (data.train, .validation, .test) reads, and
    where they came from: `uri@<commit>` (the commit a branch or tag pointed to), for the lineage."""
    repo_id = hub_dataset_id(uri)
    if repo_id is None:
        raise DataError(field, f"{uri} is not a dataset on the Hugging Face Hub (hf://datasets/<org>/<name>)")
    options = hub or HubDataset()
    data_field = field.removeprefix("data.")
    split = options.split_for(data_field)
    source = dataset_source(repo_id, options.revision, uri, field)
    builder = _builder(source, repo_id, options, uri, field)
    _check_split(builder, split, uri, f"data.hub.{HUB_SPLITS[data_field]}")
    try:
        builder.download_and_prepare()
        dataset = builder.as_dataset(split=split)
    except Exception as error:
        failure = _failure(error, uri, field, f"cannot read its split {split}")
        if failure is error:
            raise
        raise failure from None
    records = _records(dataset)
    if not records:
        raise DataError(field, f"no examples in {uri} (split {split})")
    # A cached snapshot's folder is named by its commit; datasets keys a Hub dataset's build by its commit.
    commit = Path(source).name if source != repo_id else builder.hash
    return records, f"{uri}@{commit}" if commit else uri
