"""Parse kubetune manifests (already-loaded YAML/JSON documents) into the API models."""

from __future__ import annotations

import json
from typing import Any

from kubetune.runtime.contract.errors import SpecError
from pydantic import ValidationError

from .common import API_VERSION, object_name_problem
from .finetunejob import FineTuneJob
from .modeldeployment import ModelDeployment

Manifest = FineTuneJob | ModelDeployment
MODELS: dict[str, type[FineTuneJob] | type[ModelDeployment]] = {
    "FineTuneJob": FineTuneJob,
    "ModelDeployment": ModelDeployment,
}
INT64 = range(-(2**63), 2**63)


def as_admitted(value: Any) -> Any:
    """A document as the API server decodes it: a null field is no field (its default applies),
    and a whole number written with a decimal point (2.0) is the integer it equals."""
    if isinstance(value, dict):
        return {key: as_admitted(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [as_admitted(item) for item in value]
    if isinstance(value, float) and value.is_integer() and INT64.start <= value < INT64.stop:
        return int(value)
    return value


def out_of_range_integers(value: Any, path: str = "") -> list[str]:
    """Paths of integers that no Kubernetes API field can hold (beyond 64 bits)."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in out_of_range_integers(item, f"{path}.{key}")]
    if isinstance(value, list):
        return [found for i, item in enumerate(value) for found in out_of_range_integers(item, f"{path}[{i}]")]
    if isinstance(value, int) and not isinstance(value, bool) and value not in INT64:
        return [path.lstrip(".")]
    return []


def validate_as_admitted(kind: str, document: dict[str, Any]) -> Manifest:
    """The model of `document`, checked as the API server checks types: no "3" for 3, no "true" for true.

    Raises pydantic's ValidationError. (YAML values JSON has no word for, such as dates, are
    read as the strings kubectl would send.)
    """
    text = json.dumps(as_admitted(document), default=str)
    return MODELS[kind].model_validate_json(text, strict=True)


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
    name_problem = object_name_problem(name)
    if name_problem is not None:
        problems.append(f"metadata.name: {name_problem}")
    problems += [f"{path}: must fit in a 64-bit integer" for path in out_of_range_integers(document)]
    if problems:
        raise SpecError(problems)
    try:
        return validate_as_admitted(str(kind), document)
    except ValidationError as error:
        raise SpecError.from_validation(error) from None
