"""What `kubetune plan` reads besides the spec: the model's config.json and the training data's token lengths.

Never the weights: config.json for the shape, the tokenizer (a few files) only to count tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.runtime.contract import ModelSource, RunSpec, Task
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.data.model_config import UNBOUNDED_POSITIONS, read_model_config
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


def model_config(model: ModelSource) -> dict[str, Any]:
    """The parsed config.json of the model: from its folder (a path, file://) or the hub (hf://)."""
    from kubetune.runtime.data.hub import local_files_only

    folder = _local_folder(model.uri)
    parsed = parse_uri(model.uri)
    try:
        if folder is not None:
            return read_model_config(str(folder), model.uri)
        if parsed.scheme == "hf":
            cache_only = local_files_only(parsed.location, model.revision, model.uri)
            return read_model_config(
                parsed.location, model.uri, from_hub=True, revision=model.revision, cache_only=cache_only
            )
    except InvalidRunError as error:
        raise SpecError([f"spec.model.uri: {error.problem}"]) from None
    except ModelUnavailableError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None
    except Exception as error:  # the hub's own errors: a missing repository, file or revision
        raise SpecError([f"spec.model.uri: cannot get config.json of {model.uri}: {error}"]) from None
    raise SpecError([f"spec.model.uri: {parsed.scheme}:// is not read by kubetune plan; give it {SUPPORTED}"])


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
    lengths = token_lengths(tokenizer, spec.model.task, data.train.inputs, max_positions or UNBOUNDED_POSITIONS)
    return TrainingData(lengths, data.labels)
