"""What a plan reads besides the spec: the model's config.json and the training data's token lengths.

Never the weights: config.json for the shape, the tokenizer (a few files) only to count tokens.
`kubetune plan` and the cluster's plan Job (`python -m kubetune.runtime.recipe.plan`) both read
through here. A spec that cannot work raises SpecError naming its field; a model hub or object
store that cannot be reached now raises the runtime's UnavailableError, for the caller to retry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.runtime.contract import ModelSource, RunSpec, Task
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.data.model_config import UNBOUNDED_POSITIONS, read_model_config
from kubetune.runtime.io.errors import InvalidRunError, UnavailableError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import download_s3_files, hub_dataset_id, local_path, parse_uri
from kubetune.runtime.planner.report import TrainingData

__all__ = ["TrainingData", "data_is_local", "model_config", "training_data"]

# Plain paths and file:// are read by default by `kubetune plan` (--data reads the others too).
LOCAL_SCHEMES = frozenset({"", "file"})
# Folders on a volume (pvc://, resolved as the runtime does) or a local path.
FOLDER_SCHEMES = frozenset({"", "file", "pvc"})
# A model's files that its tokenizer may need, and nothing that holds weights.
TOKENIZER_FILES = (
    "config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    # The chat template, where transformers saves it apart from tokenizer_config.json: chat data needs it.
    "chat_template.jinja",
    "chat_template.json",
)


def _model_folder(model: ModelSource, names: tuple[str, ...], settings: RuntimeSettings | None) -> Path | None:
    """A local folder holding the model's files `names` (an s3:// model's copied from the store); None for hf://."""
    try:
        parsed = parse_uri(model.uri)
        if parsed.scheme == "hf":
            return None
        settings = settings or RuntimeSettings.from_environment()
        if parsed.scheme == "s3":
            return download_s3_files(model.uri, names, settings)
        return local_path(model.uri, settings)
    except InvalidRunError as error:  # StorageError: a URI or an object that can never be read
        raise SpecError([f"spec.model.uri: {error}"]) from None


def _hub_repository(model: ModelSource) -> tuple[str, bool]:
    """An hf:// model's repository id, and whether it is read from the local cache only (offline)."""
    from kubetune.runtime.data.hub import local_files_only

    repo_id = parse_uri(model.uri).location
    return repo_id, local_files_only(repo_id, model.revision, model.uri)


def model_config(model: ModelSource, settings: RuntimeSettings | None = None) -> dict[str, Any]:
    """The parsed config.json of the model: from its folder (a path, file://, pvc://, s3://) or the hub (hf://)."""
    folder = _model_folder(model, ("config.json",), settings)
    try:
        if folder is not None:
            return read_model_config(str(folder), model.uri)
        repo_id, cache_only = _hub_repository(model)
        return read_model_config(repo_id, model.uri, from_hub=True, revision=model.revision, cache_only=cache_only)
    except InvalidRunError as error:
        raise SpecError([f"spec.model.uri: {error.problem}"]) from None
    except UnavailableError:
        raise  # the hub cannot be reached now: not the spec's fault
    except Exception as error:  # the hub's own errors: a missing repository, file or revision
        raise SpecError([f"spec.model.uri: cannot get config.json of {model.uri}: {error}"]) from None


def data_is_local(spec: RunSpec) -> bool:
    """Whether `kubetune plan` reads the training data unasked: a local file, or a dataset of the Hub that the
    local Hugging Face cache holds already at the spec's revision."""
    try:
        repo_id = hub_dataset_id(spec.data.train)
        if repo_id is not None:
            from kubetune.runtime.data.hub_datasets import cached_snapshot

            return cached_snapshot(repo_id, spec.data.hub.revision if spec.data.hub else None) is not None
        return parse_uri(spec.data.train).scheme in LOCAL_SCHEMES
    except InvalidRunError:
        return False


def _tokenizer(model: ModelSource, settings: RuntimeSettings) -> Any:
    from transformers import AutoTokenizer

    folder = _model_folder(model, TOKENIZER_FILES, settings)
    try:
        if folder is not None:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)
        repo_id, cache_only = _hub_repository(model)
        return AutoTokenizer.from_pretrained(
            repo_id, revision=model.revision, local_files_only=cache_only, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise SpecError([f"spec.model.uri: cannot load the tokenizer of {model.uri}: {error}"]) from None


def training_data(spec: RunSpec, max_positions: int, settings: RuntimeSettings | None = None) -> TrainingData:
    """Read the training split as the runtime splits it, and count each example's tokens."""
    from kubetune.runtime.data.load import load_data
    from kubetune.runtime.data.token_lengths import token_lengths

    if spec.model.task == Task.IMAGE_CLASSIFICATION:
        raise SpecError(["spec.model.task: image classification has no token lengths: run with --no-data"])
    settings = settings or RuntimeSettings.from_environment()
    try:
        data = load_data(spec, settings)
    except InvalidRunError as error:  # bad data; storage that cannot be reached now raises UnavailableError
        raise SpecError([str(error)]) from None
    tokenizer = _tokenizer(spec.model, settings)
    # Causal-LM examples are measured up to the model's positions: a longer one cannot train anyway.
    lengths = token_lengths(tokenizer, spec.model.task, data.train.inputs, max_positions or UNBOUNDED_POSITIONS)
    return TrainingData(lengths, data.labels)
