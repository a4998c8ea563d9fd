"""Shared fixtures: the repository root and the example manifests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from .ray_guard import install

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
DELETE = object()


def pytest_configure(config: pytest.Config) -> None:
    # Every tier: a Ray left running by one test prints into what later tests capture.
    install(config)


def load_example(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    return document


def mutated(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `document` with the dotted `path` set to `value` (or removed with DELETE).

    A path segment in brackets addresses a key containing dots: `spec.search.space.[lora.rank]`.
    """
    result = copy.deepcopy(document)
    parts = [p.strip("[]") for p in _split(path)]
    node = result
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return result


def _split(path: str) -> list[str]:
    parts, current, depth = [], "", 0
    for char in path:
        if char == "." and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += char == "["
        depth -= char == "]"
        current += char
    parts.append(current)
    return parts


@pytest.fixture
def minimal_job() -> dict[str, Any]:
    return load_example("finetunejob-minimal.yaml")


@pytest.fixture
def complete_job() -> dict[str, Any]:
    return load_example("finetunejob-complete.yaml")


@pytest.fixture
def deployment() -> dict[str, Any]:
    return load_example("modeldeployment.yaml")
