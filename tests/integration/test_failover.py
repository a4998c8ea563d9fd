"""High availability: two replicas elect a leader on a Lease; the leader works, the other takes over when it dies."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator.kube import Kube
from kubetune.operator.leader import EXIT_LEASE_LOST
from kubetune.operator.settings import Settings

from ..conftest import load_example, mutated
from ..controlplane import ControlPlane
from .harness import InProcessOperator, OperatorProcess, eventually
from .test_operator_restarts import free_port

LEASE = "kubetune-operator"
# The chart's timing (values.yaml leaderElection): a follower takes over once the Lease went unrenewed this long.
CHART = Settings()
STATE = re.compile(r"kubetune\.operator (leading|standing by)")
IDENTITY = re.compile(r"kubetune\.operator leading: holds Lease \S+ as (\S+)")


def state(process: OperatorProcess) -> str | None:
    """The replica's latest state as it logged it: "leading", "standing by" or None (not started yet)."""
    found = STATE.findall(process.log_path.read_text(errors="replace"))
    return found[-1] if found else None


def identity(process: OperatorProcess) -> str:
    [found] = IDENTITY.findall(process.log_path.read_text(errors="replace"))
    return str(found)


def reconciles(process: OperatorProcess) -> bool:
    return "kubetune_reconciles_total{" in (process.metrics() or "")


def job_passes(process: OperatorProcess) -> float:
    """How many FineTuneJob passes the replica has made."""
    found = re.search(r'kubetune_reconciles_total\{kind="FineTuneJob",result="ok"\} (\S+)', process.metrics() or "")
    return float(found.group(1)) if found else 0.0


def create_job(kube: Kube, namespace: str, name: str) -> None:
    kube.create(mutated(load_example("finetunejob-minimal.yaml"), "metadata", {"name": name, "namespace": namespace}))


def lease_path(namespace: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{LEASE}"


def lease(kube: Kube, namespace: str) -> dict[str, Any]:
    return dict(kube.request("GET", lease_path(namespace)))


def run_names(kube: Kube, namespace: str) -> list[str]:
    return sorted(item["metadata"]["name"] for item in kube.list("ray.io/v1", "RayJob", namespace, {}))


def replicas(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, count: int
) -> list[OperatorProcess]:
    """`kubetune operator` processes with leader election on, as the chart starts them (the Lease in `namespace`)."""
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION", "true")
    monkeypatch.setenv("KUBETUNE_LEADER_ELECTION_NAMESPACE", namespace)
    args = [f"--namespace={namespace}"]
    return [
        OperatorProcess(control_plane.kubeconfig, tmp_path / f"operator-{n}.log", free_port(), args=args)
        for n in range(count)
    ]


@pytest.fixture
def standalone_paused(running_operator: InProcessOperator) -> Iterator[None]:
    # These tests own the namespace: the shared standalone operator (watching all of them) pauses meanwhile.
    running_operator.stop()
    try:
        yield
    finally:
        running_operator.start()


@pytest.fixture
def pair(
    control_plane: ControlPlane,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standalone_paused: None,
) -> Iterator[list[OperatorProcess]]:
    processes = replicas(control_plane, namespace, tmp_path, monkeypatch, 2)
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()


def test_one_replica_leads_and_the_other_takes_over_when_it_dies(
    kube: Kube, namespace: str, pair: list[OperatorProcess]
) -> None:
    def settled() -> bool:
        return sorted(str(state(p)) for p in pair) == ["leading", "standing by"]

    try:
        eventually(settled, timeout=20, what="one leading and one standing-by replica")
    except AssertionError as error:
        raise AssertionError("\n\n".join([str(error), *(p.log_tail(30) for p in pair)])) from None
    [leader] = [p for p in pair if state(p) == "leading"]
    [follower] = [p for p in pair if state(p) == "standing by"]
    # `kubectl get lease` names the leader: its pod (here: host) name and a suffix of its process.
    held = lease(kube, namespace)["spec"]
    assert held["holderIdentity"] == identity(leader) and "_" in held["holderIdentity"]
    assert held["leaseDurationSeconds"] == CHART.lease_duration_seconds

    create_job(kube, namespace, "before")
    eventually(lambda: kube.get("ray.io/v1", "RayJob", namespace, "before-r1"), timeout=30, what="RayJob before-r1")
    eventually(lambda: reconciles(leader), timeout=10, what="the leader's first reconcile")
    assert not reconciles(follower), follower.log_tail()
    assert state(follower) == "standing by"

    leader.kill()
    killed = time.monotonic()
    create_job(kube, namespace, "after")
    eventually(
        lambda: kube.get("ray.io/v1", "RayJob", namespace, "after-r1"),
        timeout=CHART.lease_duration_seconds + 30,
        what="RayJob after-r1",
    )
    takeover = time.monotonic() - killed
    print(f"takeover after SIGKILL: {takeover:.1f} s (lease duration {CHART.lease_duration_seconds} s)")
    assert state(follower) == "leading"
    assert lease(kube, namespace)["spec"]["holderIdentity"] == identity(follower)
    # The Lease runs out after its duration; the follower's next try and the first pass add a few seconds.
    assert takeover < CHART.lease_duration_seconds + CHART.lease_retry_period_seconds + 10, follower.log_tail()
    # The follower's queue held "before" (kopf enqueued it while the follower stood by): its first pass looks at
    # it again, and finds its run made. Nothing is made twice.
    eventually(lambda: reconciles(follower), timeout=10, what="the new leader's first reconcile")
    before = ("kubetune.io/v1alpha1", "FineTuneJob", namespace, "before")
    eventually(lambda: job_passes(follower) >= 2, timeout=20, what="the new leader's passes over both jobs")
    assert run_names(kube, namespace) == ["after-r1", "before-r1"]
    status = (kube.get(*before) or {}).get("status") or {}
    assert [run["number"] for run in status.get("runs", [])] == [1], status


def test_a_leader_that_cannot_renew_its_lease_exits(
    control_plane: ControlPlane,
    kube: Kube,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    standalone_paused: None,
) -> None:
    # Short timing: the renew deadline is what this test waits for.
    timing = {"KUBETUNE_LEASE_DURATION_SECONDS": 5, "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS": 2}
    for variable, seconds in {**timing, "KUBETUNE_LEASE_RETRY_PERIOD_SECONDS": 1}.items():
        monkeypatch.setenv(variable, str(seconds))
    [leader] = replicas(control_plane, namespace, tmp_path, monkeypatch, 1)
    leader.start()
    try:
        eventually(lambda: state(leader) == "leading", timeout=20, what="the replica to lead")
        # Another holder writes itself into the Lease (as after a partition): this replica's renewals now fail.
        taken = lease(kube, namespace)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        taken["spec"].update(holderIdentity="elsewhere", acquireTime=now, renewTime=now)
        kube.request("PUT", lease_path(namespace), body=taken)
        stolen = time.monotonic()
        assert leader.proc is not None
        code = leader.proc.wait(timeout=15)
        waited = time.monotonic() - stolen
        print(f"exited {waited:.1f} s after losing the Lease")
        assert code == EXIT_LEASE_LOST, leader.log_tail()
        assert "lost Lease" in leader.log_path.read_text()
        assert waited < 5, "it stopped before the Lease could run out for the others"
        assert lease(kube, namespace)["spec"]["holderIdentity"] == "elsewhere"
    finally:
        leader.stop()
