"""torch.compile at replica start where the image has no C++ compiler (as Ray's CPU images have none).

A compile the spec did not ask for falls back to eager with a warning; one it asked for
fails with a message that says what is missing. No Ray: the replica's loading alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kubetune.runtime.contract import Task
from kubetune.runtime.contract.serving import ServeAppArgs
from kubetune.runtime.io.errors import ModelError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.serving import loading

from .tiny import tiny_bert


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT text classifier, saved as an exported variant is."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tiny_bert(tmp_path_factory.mktemp("base"))
    folder = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(1)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture
def no_compiler() -> Iterator[None]:
    """inductor looks for a C++ compiler that does not exist, as in an image without g++."""
    from torch._inductor import config

    saved = config.cpp.cxx
    config.cpp.cxx = (None, "kubetune-test-no-such-g++")
    try:
        yield
    finally:
        config.cpp.cxx = saved


def args(folder: Path, compile: bool | None) -> ServeAppArgs:
    return ServeAppArgs(model_uri=str(folder), task=Task.TEXT_CLASSIFICATION, compile=compile)


def compiled(model: torch.nn.Module) -> bool:
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def test_the_default_compile_serves_eager_with_a_warning_where_no_compiler_works(
    classifier: Path, no_compiler: None, caplog: pytest.LogCaptureFixture
) -> None:
    assert loading.compiler_problem() is not None
    with caplog.at_level(logging.WARNING, logger=loading.LOGGER.name):
        loaded = loading.load(args(classifier, None), RuntimeSettings())
    assert not compiled(loaded.model)
    assert any("eager, not compiled" in r.message and "C++ compiler" in r.message for r in caplog.records)


def test_an_explicit_compile_without_a_compiler_fails_saying_what_is_missing(
    classifier: Path, no_compiler: None
) -> None:
    with pytest.raises(ModelError, match=r"compile: torch.compile needs a working C\+\+ compiler.*compile: false"):
        loading.load(args(classifier, True), RuntimeSettings())


def test_a_default_compile_that_fails_at_warm_up_falls_back_to_eager(
    classifier: Path, no_compiler: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A compiler that answers `--version` but cannot build: the check passes, the compile fails.
    monkeypatch.setattr(loading, "compiler_problem", lambda: None)
    with caplog.at_level(logging.WARNING, logger=loading.LOGGER.name):
        loaded = loading.load(args(classifier, None), RuntimeSettings())
    assert not compiled(loaded.model)
    assert any("torch.compile failed" in r.message for r in caplog.records)


def test_the_check_finds_a_compiler_that_works() -> None:
    assert loading.compiler_problem() is None  # this machine has g++: the default compiles (test_serving.py)
