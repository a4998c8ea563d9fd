"""High availability: two operators in one kopf peering; one works, the other takes over when it dies."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubetune.operator.kube import Kube

from ..conftest import REPO_ROOT, load_example, mutated
from ..controlplane import ControlPlane
from .harness import InProcessOperator, OperatorProcess, eventually
from .test_operator_restarts import free_port

PEERING = "kubetune"
LIFETIME = 6  # seconds a silent peer counts as alive: the takeover time after a crash
STATE = re.compile(r"kubetune\.operator (active|standby) in peering")


def state(process: OperatorProcess) -> str | None:
    """The operator's latest peering state as it logged it: "active", "standby" or None (not decided yet)."""
    found = STATE.findall(process.log_path.read_text(errors="replace"))
    return found[-1] if found else None


def reconciles(process: OperatorProcess) -> bool:
    return "kubetune_reconciles_total{" in (process.metrics() or "")


def create_job(kube: Kube, namespace: str, name: str) -> None:
    kube.create(mutated(load_example("finetunejob-minimal.yaml"), "metadata", {"name": name, "namespace": namespace}))


@pytest.fixture
def peers(
    control_plane: ControlPlane, running_operator: InProcessOperator, kube: Kube, namespace: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    # This test owns the namespace: the shared standalone operator (watching all of them) pauses meanwhile.
    running_operator.stop()
    control_plane.apply_crds([REPO_ROOT / "charts" / "kubetune" / "crds" / "kopf-peering.yaml"])
    kube.request(
        "POST",
        f"/apis/kopf.dev/v1/namespaces/{namespace}/kopfpeerings",
        body={"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}},
    )
    # Priorities left to chance, as the chart's replicas do.
    args = [f"--namespace={namespace}", f"--peering={PEERING}", f"--peering-lifetime={LIFETIME}"]
    processes = [
        OperatorProcess(control_plane.kubeconfig, tmp_path / f"operator-{n}.log", free_port(), args=args)
        for n in range(2)
    ]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()
        running_operator.start()


def test_one_peer_works_and_the_other_takes_over_when_it_dies(
    kube: Kube, namespace: str, peers: list[OperatorProcess]
) -> None:
    def settled() -> bool:
        return sorted(str(state(p)) for p in peers) == ["active", "standby"]

    try:
        eventually(settled, timeout=20, what="one active and one standby operator")
    except AssertionError as error:
        raise AssertionError("\n\n".join([str(error), *(p.log_tail(30) for p in peers)])) from None
    [active] = [p for p in peers if state(p) == "active"]
    [standby] = [p for p in peers if state(p) == "standby"]

    create_job(kube, namespace, "before")
    eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, "before-r1"), timeout=30, what="RayJob before-r1")
    eventually(lambda: reconciles(active), timeout=10, what="the active operator's first reconcile")
    assert not reconciles(standby), standby.log_tail()
    assert state(standby) == "standby"

    resumed = standby.log_path.read_text().count("Resuming operations")
    active.kill()
    killed = time.monotonic()
    create_job(kube, namespace, "after")
    eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, "after-r1"), timeout=40, what="RayJob after-r1")
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.1f} s (peer lifetime {LIFETIME} s)")
    assert state(standby) == "active"
    eventually(lambda: reconciles(standby), timeout=10, what="the new active operator's first reconcile")
    assert standby.log_path.read_text().count("Resuming operations") > resumed  # kopf's own watches resumed too
    # The dead peer's record expires after its lifetime; polling and the first pass add a few seconds.
    assert takeover < LIFETIME + 10, standby.log_tail()
