"""The Ray guard in a pytest session of its own: a test that leaves Ray running fails at its teardown, by name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .. import ray_guard

pytestmark = pytest.mark.runtime

CONFTEST = """
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("ray_guard", {path!r})
ray_guard = importlib.util.module_from_spec(spec)
sys.modules["ray_guard"] = ray_guard
spec.loader.exec_module(ray_guard)


def pytest_configure(config):
    ray_guard.install(config)
"""
TESTS = """
import logging

import psutil
import ray


def test_leaves_ray_connected():
    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.WARNING)


def test_after_it_nothing_of_ray_is_left():
    assert not ray.is_initialized()
    assert psutil.Process().children(recursive=True) == []
"""


def test_a_test_that_leaves_ray_connected_fails_by_name_and_ray_is_stopped(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST.format(path=ray_guard.__file__))
    (tmp_path / "test_leaving.py").write_text(TESTS)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "ERROR at teardown of test_leaves_ray_connected" in output
    assert "test_leaving.py::test_leaves_ray_connected left Ray running after its teardown" in output
    assert "still connected to Ray" in output
    assert "2 passed, 1 error" in output, output  # the test (an error at teardown), and the next found no Ray
