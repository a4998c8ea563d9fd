"""What `kubetune plan` reads besides the spec: the model's config.json and the training data's token lengths.

Never the weights: config.json for the shape, the tokenizer (a few files) only to count tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.runtime.contract import ModelSource, RunSpec, Task
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.io.errors import InvalidRunError, ModelUnavailableError, StorageError, UnavailableError
from kubetune.runtime.io.storage import parse_uri

# Plain paths and file:// are read here; hf:// from the Hugging Face cache or the hub.
LOCAL_SCHEMES = frozenset({"", "file"})
SUPPORTED = "a local folder, file:// or hf://"


def _local_folder(uri: str) -> Path | None:
    try:
        parsed = parse_uri(uri)
    except StorageError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None
    return Path(parsed.location) if parsed.scheme in LOCAL_SCHEMES else None


def _hub_config(model: ModelSource, repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from kubetune.runtime.data.hub import local_files_only

    try:
        cache_only = local_files_only(repo_id, model.revision, model.uri)
        path = hf_hub_download(repo_id, "config.json", revision=model.revision, local_files_only=cache_only)
    except ModelUnavailableError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None
    except Exception as error:  # the hub's own errors: a missing repository, file or revision
        raise SpecError([f"spec.model.uri: cannot get config.json of {model.uri}: {error}"]) from None
    return Path(path)


def model_config(model: ModelSource) -> dict[str, Any]:
    """The parsed config.json of the model: from its folder (a path, file://) or the hub (hf://)."""
    folder = _local_folder(model.uri)
    if folder is not None:
        path = folder / "config.json"
    elif parse_uri(model.uri).scheme == "hf":
        path = _hub_config(model, parse_uri(model.uri).location)
    else:
        scheme = parse_uri(model.uri).scheme
        raise SpecError([f"spec.model.uri: {scheme}:// is not read by kubetune plan; give it {SUPPORTED}"])
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SpecError([f"spec.model.uri: cannot read {path}: {error.strerror}"]) from None
    except json.JSONDecodeError as error:
        raise SpecError([f"spec.model.uri: {path} is not valid JSON: {error}"]) from None
    if not isinstance(config, dict):
        raise SpecError([f"spec.model.uri: {path} is not a JSON object"])
    return config


def data_is_local(spec: RunSpec) -> bool:
    try:
        return parse_uri(spec.data.train).scheme in LOCAL_SCHEMES
    except StorageError:
        return False


def _tokenizer(model: ModelSource) -> Any:
    from transformers import AutoTokenizer

    folder = _local_folder(model.uri)
    try:
        if folder is not None:
            return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=model.trust_remote_code)
        from kubetune.runtime.data.hub import local_files_only

        repo_id = parse_uri(model.uri).location
        cache_only = local_files_only(repo_id, model.revision, model.uri)
        return AutoTokenizer.from_pretrained(
            repo_id, revision=model.revision, local_files_only=cache_only, trust_remote_code=model.trust_remote_code
        )
    except ModelUnavailableError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None
    except (OSError, ValueError) as error:
        raise SpecError([f"spec.model.uri: cannot load the tokenizer of {model.uri}: {error}"]) from None


class TrainingData:
    """The training split's token lengths (untruncated) and its label names."""

    def __init__(self, lengths: list[int], labels: list[str]) -> None:
        self.lengths = lengths
        self.labels = labels

    def tokens(self, max_length: int) -> int:
        """Tokens the model sees in one pass: each example truncated to the sequence length."""
        return sum(min(length, max_length) for length in self.lengths)


def training_data(spec: RunSpec, max_positions: int) -> TrainingData:
    """Read the training split as the runtime splits it, and count each example's tokens."""
    from kubetune.runtime.data.load import load_data
    from kubetune.runtime.data.token_lengths import token_lengths
    from kubetune.runtime.io.settings import RuntimeSettings

    if spec.model.task == Task.IMAGE_CLASSIFICATION:
        raise SpecError(["spec.model.task: image classification has no token lengths: run with --no-data"])
    try:
        data = load_data(spec, RuntimeSettings.from_environment())
    except (InvalidRunError, UnavailableError) as error:  # bad data, or storage that cannot be reached now
        raise SpecError([str(error)]) from None
    tokenizer = _tokenizer(spec.model)
    # Causal-LM examples are measured up to the model's positions: a longer one cannot train anyway.
    limit = max_positions or 1 << 20
    lengths = token_lengths(tokenizer, spec.model.task, data.train.inputs, limit)
    return TrainingData(lengths, data.labels)
