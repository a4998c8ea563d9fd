"""Fixtures of the integration tier: a real API server with kubetune's and KubeRay's CRDs, namespaces, the operator.

The control plane comes from KUBETUNE_TEST_KUBECONFIG (an existing cluster), else
KUBEBUILDER_ASSETS, else binaries built once from pinned Go modules (see
tests/controlplane/). Every test gets its own namespace.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.kube import Kube

from ..conftest import REPO_ROOT
from ..controlplane import ControlPlane, kuberay_crds
from .harness import InProcessOperator, MovableClock

KUBETUNE_CRDS = sorted((REPO_ROOT / "crds").glob("*.yaml"))
_control_plane: ControlPlane | None = None
_started: dict[str, ControlPlane] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    # A failing test shows what the API server said while it ran.
    if report.failed and _control_plane is not None and not _control_plane.external:
        report.sections.append(("control plane logs", _control_plane.logs(40)))
    return report


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    global _control_plane
    with ControlPlane() as plane:
        plane.apply_crds([*KUBETUNE_CRDS, *kuberay_crds()])
        _control_plane = _started["plane"] = plane
        os.environ["KUBECONFIG"] = str(plane.kubeconfig)
        yield plane
        _control_plane = None


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Kube:
    return Kube.connect(str(control_plane.kubeconfig))


@pytest.fixture
def namespace(kube: Kube, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    stem = request.node.name.lower().replace("_", "-")
    name = f"{''.join(c for c in stem if c.isalnum() or c == '-')[:40].strip('-')}-{uuid.uuid4().hex[:6]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="session")
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture(scope="session")
def running_operator(control_plane: ControlPlane, clock: MovableClock) -> Iterator[InProcessOperator]:
    operator = InProcessOperator(control_plane.kubeconfig, clock)
    operator.start()
    yield operator
    operator.stop()


@pytest.fixture
def operator(running_operator: InProcessOperator, clock: MovableClock) -> Iterator[InProcessOperator]:
    """The in-process operator (shared by the tests of a session), with the clock at real time."""
    clock.reset()
    yield running_operator
    clock.reset()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    plane = _started.get("plane")
    if plane is not None:
        source = "existing cluster" if plane.external else str(plane.bin_dir)
        terminalreporter.write_line(f"control plane ({source}) ready in {plane.startup_seconds:.1f} s")


# The real KubeRay operator, kube-scheduler and kwok nodes, for the modules that ask for them.
from .kuberay_sim import cluster_sim, create, kuberay_namespace, ray_pods, wait_for  # noqa: E402, F401
