"""Leader election on a coordination.k8s.io Lease: of the operator's replicas, only the leader reconciles.

The election is the `kubernetes` package's (`kubernetes.leaderelection`), as in KubeRay and
CloudNativePG: each replica tries to create or take over the Lease every retry period; the holder
renews it, and a replica takes it over once it has gone unrenewed for the lease duration
(`kubectl get lease` shows the holder). The election runs in a thread of its own and blocks;
its callbacks run in that thread too.

Three gaps of the package are closed here. Its Lease calls have no timeout, so one hung
request would keep a leader that can no longer renew working past its lease: each call gets
the retry period as its timeout. Only API errors count as failed calls; a connection error
would end the election thread silently, and a leader would go on without renewing: every
error counts. And it ends leading only by returning from its loop: what happens then is the
caller's (`on_lost`).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock
from kubetune.operator.settings import Settings, SettingsError

log = logging.getLogger("kubetune.operator")
# The namespace of the pod's service account: the operator's own namespace when it runs in a pod.
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# The exit status of a replica that lost the Lease (the Deployment restarts it).
EXIT_LEASE_LOST = 3


@dataclass(frozen=True)
class Election:
    """Who this replica is, which Lease the replicas share, and the timing of the election (in seconds)."""

    lease: str
    namespace: str
    identity: str
    lease_duration: int
    renew_deadline: int
    retry_period: int

    @classmethod
    def of(cls, settings: Settings, identity: str | None = None) -> Election:
        """The election the settings describe; a SettingsError names the setting that cannot work."""
        namespace = settings.leader_election_namespace or _own_namespace()
        if not namespace:
            raise SettingsError(
                "KUBETUNE_LEADER_ELECTION_NAMESPACE: needed for leader election outside a pod (the Lease's namespace)"
            )
        if not settings.leader_election_lease:
            raise SettingsError("KUBETUNE_LEADER_ELECTION_LEASE: the Lease needs a name")
        duration = settings.lease_duration_seconds
        deadline = settings.lease_renew_deadline_seconds
        retry = settings.lease_retry_period_seconds
        if retry < 1:
            raise SettingsError(f"KUBETUNE_LEASE_RETRY_PERIOD_SECONDS={retry}: must be at least 1")
        # The package waits one retry period before a renewal's deadline starts, and a call may take one more:
        # a leader that cannot renew must have stopped before a follower may take the Lease over.
        if deadline <= 1.2 * retry or duration <= deadline + 2 * retry:
            raise SettingsError(
                f"KUBETUNE_LEASE_DURATION_SECONDS={duration}, KUBETUNE_LEASE_RENEW_DEADLINE_SECONDS={deadline}, "
                f"KUBETUNE_LEASE_RETRY_PERIOD_SECONDS={retry}: the renew deadline must exceed 1.2 retry periods, "
                "and the lease duration the renew deadline plus two retry periods (e.g. 10, 6, 1)"
            )
        return cls(settings.leader_election_lease, namespace, identity or replica_identity(), duration, deadline, retry)


def replica_identity() -> str:
    """The pod's name (its host name), and a suffix telling this process from the one it replaced."""
    return f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return ""


class _TimedLeases:
    """The three Lease calls the lock makes, each with a timeout."""

    def __init__(self, api: kubernetes.client.CoordinationV1Api, timeout: float) -> None:
        self.api, self.timeout = api, timeout

    def read_namespaced_lease(self, name: str, namespace: str) -> kubernetes.client.V1Lease:
        return self.api.read_namespaced_lease(name, namespace, _request_timeout=self.timeout)

    def create_namespaced_lease(self, namespace: str, body: kubernetes.client.V1Lease) -> kubernetes.client.V1Lease:
        return self.api.create_namespaced_lease(namespace, body, _request_timeout=self.timeout)

    def replace_namespaced_lease(
        self, name: str, namespace: str, body: kubernetes.client.V1Lease
    ) -> kubernetes.client.V1Lease:
        return self.api.replace_namespaced_lease(name, namespace, body, _request_timeout=self.timeout)


class _Lock(LeaseLock):
    """The package's Lease lock, on the operator's credentials, where any failed call is a failed attempt."""

    def __init__(self, election: Election, configuration: kubernetes.client.Configuration) -> None:
        super().__init__(election.lease, election.namespace, election.identity)  # type: ignore[no-untyped-call]
        # A copy: the credentials renew themselves, and this thread should not race the operator's client at it.
        client = kubernetes.client.ApiClient(copy.deepcopy(configuration))
        # (the lock calls only the three methods _TimedLeases has)
        self.api_instance = _TimedLeases(kubernetes.client.CoordinationV1Api(client), election.retry_period)  # type: ignore[assignment]

    def get(self, name: str, namespace: str) -> tuple[bool, Any]:
        try:
            return super().get(name, namespace)  # type: ignore[no-untyped-call,no-any-return]
        except Exception as error:  # unreachable server, timeout: the package takes only an API error's body
            log.warning("could not read Lease %s/%s: %s", namespace, name, error)
            return False, error

    def create(self, name: str, namespace: str, election_record: Any) -> bool:
        try:
            return super().create(name, namespace, election_record)  # type: ignore[no-untyped-call,no-any-return]
        except Exception as error:
            log.warning("could not create Lease %s/%s: %s", namespace, name, error)
            return False

    def update(self, name: str, namespace: str, updated_record: Any) -> bool:
        try:
            return super().update(name, namespace, updated_record)  # type: ignore[no-untyped-call,no-any-return]
        except Exception as error:
            log.warning("could not renew Lease %s/%s: %s", namespace, name, error)
            return False


def elect(
    election: Election,
    configuration: kubernetes.client.Configuration,
    on_leading: Callable[[], None],
    on_lost: Callable[[], None],
) -> threading.Thread:
    """Stand for election in a thread: `on_leading` runs once this replica holds the Lease (it must return soon:
    the Lease is renewed meanwhile), `on_lost` once it could not renew it within the renew deadline, or when the
    election itself failed. Neither runs while this replica stands by."""
    # The package logs every attempt (every retry period) at INFO; its failures come through _Lock's warnings.
    if logging.getLogger("leaderelection").level == logging.NOTSET:
        logging.getLogger("leaderelection").setLevel(logging.WARNING)
    config = electionconfig.Config(  # type: ignore[no-untyped-call]
        _Lock(election, configuration),
        lease_duration=election.lease_duration,
        renew_deadline=election.renew_deadline,
        retry_period=election.retry_period,
        onstarted_leading=on_leading,
        onstopped_leading=on_lost,
    )

    def run() -> None:
        try:
            leaderelection.LeaderElection(config).run()  # type: ignore[no-untyped-call]
        except Exception:
            log.exception("leader election on Lease %s/%s failed", election.namespace, election.lease)
            on_lost()

    log.info(
        "standing by for Lease %s/%s as %s (the leader reconciles)",
        election.namespace,
        election.lease,
        election.identity,
    )
    thread = threading.Thread(target=run, name="kubetune-leader-election", daemon=True)
    thread.start()
    return thread


def exit_process(election: Election) -> Callable[[], None]:
    """What losing the Lease does: exit at once, so that the Deployment restarts this replica as a follower.

    Reconciles in flight run in threads that cannot be stopped from outside: only ending the process
    guarantees that no write follows once another replica may hold the Lease (controller-runtime exits too).
    """

    def lost() -> None:
        log.error(
            "lost Lease %s/%s (not renewed within %d s): exiting so that no other replica works beside this one",
            election.namespace,
            election.lease,
            election.renew_deadline,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_LEASE_LOST)

    return lost
