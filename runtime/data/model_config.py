"""A model's config.json alone, never its weights: what plans and `auto` values read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune.runtime.io.errors import InvalidRunError

# Causal-LM examples are measured up to this many tokens when the model names no limit.
UNBOUNDED_POSITIONS = 1 << 20


def read_model_config(
    source: str, uri: str, *, from_hub: bool = False, revision: str | None = None, cache_only: bool = False
) -> dict[str, Any]:
    """The parsed config.json of the model in folder `source`, or of hub repository `source` (or its cache)."""
    try:
        if from_hub:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, "config.json", revision=revision, local_files_only=cache_only)
        else:
            path = str(Path(source) / "config.json")
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise InvalidRunError("model.uri", f"cannot read config.json of {uri}: {error}") from None
    if not isinstance(config, dict):
        raise InvalidRunError("model.uri", f"config.json of {uri} is not a JSON object")
    return config
