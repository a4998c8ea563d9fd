"""Leader election: the settings it takes, and a Lease lock for which every failed call is a failed attempt."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import urllib3
from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubetune.operator import leader
from kubetune.operator.leader import Election, _Lock, replica_identity
from kubetune.operator.settings import Settings, SettingsError


def settings(**values: Any) -> Settings:
    return Settings(leader_election=True, leader_election_namespace="ops", **values)


def test_the_chart_defaults_make_an_election() -> None:
    election = Election.of(settings(), identity="pod-1_abc")
    assert election == Election("kubetune-operator", "ops", "pod-1_abc", 10, 6, 1)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"lease_retry_period_seconds": 0}, "KUBETUNE_LEASE_RETRY_PERIOD_SECONDS=0"),
        # The renew deadline must exceed 1.2 retry periods (the package's own rule).
        (
            {"lease_renew_deadline_seconds": 2, "lease_retry_period_seconds": 2},
            "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS=2",
        ),
        # A leader that cannot renew must be gone before the Lease runs out: 9 + 2 * 1 > 10.
        ({"lease_renew_deadline_seconds": 9}, "KUBETUNE_LEASE_DURATION_SECONDS=10"),
        ({"lease_duration_seconds": 8}, "KUBETUNE_LEASE_DURATION_SECONDS=8"),
        ({"leader_election_lease": ""}, "KUBETUNE_LEADER_ELECTION_LEASE"),
    ],
)
def test_timing_that_cannot_work_is_refused_by_name(values: dict[str, Any], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Election.of(settings(**values))


def test_the_lease_namespace_is_the_pods_own_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    outside_a_pod = Settings(leader_election=True)
    with pytest.raises(SettingsError, match="KUBETUNE_LEADER_ELECTION_NAMESPACE"):
        Election.of(outside_a_pod)
    (tmp_path / "namespace").write_text("kubetune-system\n")
    assert Election.of(outside_a_pod).namespace == "kubetune-system"


def test_the_settings_come_from_the_environment() -> None:
    environment = {
        "KUBETUNE_LEADER_ELECTION": "true",
        "KUBETUNE_LEADER_ELECTION_LEASE": "kt-kubetune",
        "KUBETUNE_LEADER_ELECTION_NAMESPACE": "ops",
        "KUBETUNE_LEASE_DURATION_SECONDS": "30",
        "KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS": "20",
        "KUBETUNE_LEASE_RETRY_PERIOD_SECONDS": "4",
    }
    options = Settings.from_environment(environment)
    assert options.leader_election is True
    assert Election.of(options, identity="p") == Election("kt-kubetune", "ops", "p", 30, 20, 4)
    assert Settings.from_environment({}).leader_election is False  # a local `kubetune operator` works alone


def test_the_identity_is_the_pod_name_and_a_process_suffix() -> None:
    first, second = replica_identity(), replica_identity()
    assert first.rpartition("_")[0] == socket.gethostname() and first != second


class Unreachable:
    """A Lease API whose server cannot be reached (the package's lock takes only API errors)."""

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            raise urllib3.exceptions.MaxRetryError(None, "/apis/coordination.k8s.io", "refused")  # type: ignore[arg-type]

        return call


def test_an_unreachable_server_is_a_failed_attempt_not_a_dead_election() -> None:
    lock = _Lock(Election("l", "ops", "me", 15, 10, 2), kubernetes.client.Configuration())
    lock.api_instance = Unreachable()  # type: ignore[assignment]
    found, error = lock.get("l", "ops")
    assert found is False and isinstance(error, urllib3.exceptions.MaxRetryError)
    record = LeaderElectionRecord("me", "15", "2026-12-07 05:00:00.000000", "2026-12-07 05:00:00.000000")  # type: ignore[no-untyped-call]
    assert lock.create("l", "ops", record) is False
    lock.lease_reference = kubernetes.client.V1Lease(spec=kubernetes.client.V1LeaseSpec())
    assert lock.update("l", "ops", record) is False


def test_each_lease_call_has_a_timeout() -> None:
    calls: list[dict[str, Any]] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                calls.append({"method": name, **kwargs})
                return kubernetes.client.V1Lease(spec=kubernetes.client.V1LeaseSpec(holder_identity="other"))

            return call

    lock = _Lock(Election("l", "ops", "me", 15, 10, 2), kubernetes.client.Configuration())
    lock.api_instance.api = Recording()  # type: ignore[attr-defined]  # under the timeouts
    lock.get("l", "ops")
    record = LeaderElectionRecord("me", "15", "2026-12-07 05:00:00.000000", "2026-12-07 05:00:00.000000")  # type: ignore[no-untyped-call]
    lock.update("l", "ops", record)
    assert [(call["method"], call["_request_timeout"]) for call in calls] == [
        ("read_namespaced_lease", 2),
        ("replace_namespaced_lease", 2),
    ]
