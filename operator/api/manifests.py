"""Parse kubetune manifests (already-loaded YAML/JSON documents) into the API models."""

from __future__ import annotations

import re
from typing import Any

from kubetune.runtime.contract.errors import SpecError
from pydantic import ValidationError

from .common import API_VERSION, SUBDOMAIN_PATTERN
from .finetunejob import FineTuneJob
from .modeldeployment import ModelDeployment

Manifest = FineTuneJob | ModelDeployment
MODELS: dict[str, type[FineTuneJob] | type[ModelDeployment]] = {
    "FineTuneJob": FineTuneJob,
    "ModelDeployment": ModelDeployment,
}


def parse(document: Any) -> Manifest:
    """Validate one manifest; a SpecError names every offending field."""
    if not isinstance(document, dict):
        raise SpecError([f"(root): expected a mapping, got {type(document).__name__}"])
    api_version, kind = document.get("apiVersion"), document.get("kind")
    problems = []
    if api_version != API_VERSION:
        problems.append(f"apiVersion: expected {API_VERSION}, got {api_version!r}")
    if kind not in MODELS:
        problems.append(f"kind: expected one of {', '.join(MODELS)}, got {kind!r}")
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not re.fullmatch(SUBDOMAIN_PATTERN, name) or len(name) > 253:
        problems.append(f"metadata.name: expected a lowercase DNS name, got {name!r}")
    if problems:
        raise SpecError(problems)
    try:
        return MODELS[str(kind)].model_validate(document)
    except ValidationError as error:
        raise SpecError.from_validation(error) from None
