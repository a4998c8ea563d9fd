"""Fixtures of the node tier: kubetune on a one-node Kubernetes with real pods (see stack.py).

The tier needs root on Linux and Debian's container packages (installed when missing);
elsewhere it is skipped with the reason. Starting it builds, once, the node's binaries
and kubetune's images (cached), then takes about a minute.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..controlplane.images import ImagesUnavailableError
from ..controlplane.realnode import NodeUnavailableError
from .journey import FIGURES
from .stack import Stack, attach_stack, start_stack

_stack: Stack | None = None
_timings: dict[str, float] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.node)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.failed and _stack is not None:  # a failing step shows what the node's processes said
        report.sections.append(("node logs", _stack.node.logs(30)))
    return report


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The stack: the one `scripts/cluster up` left running (kept afterwards), else one of this session's."""
    global _stack
    attached = attach_stack()
    try:
        started = attached or start_stack()
    except (NodeUnavailableError, ImagesUnavailableError) as error:
        pytest.skip(f"no real node on this machine: {error}")
    _stack = started
    _timings.update(started.node.timings)
    try:
        yield started
    finally:
        _stack = None
        if attached is None:
            started.node.stop()
            left = started.node.leftovers()
            assert not left, f"the node left these behind: {left}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _timings:
        terminalreporter.write_line("real node: " + ", ".join(f"{k} {v:.0f} s" for k, v in _timings.items()))
    for what, milestones in FIGURES.items():
        terminalreporter.write_line(f"{what} (seconds from the start):")
        terminalreporter.write_line(milestones.table())
