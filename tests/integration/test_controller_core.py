"""The controller core against the real API server, seen through a recording, fault-injecting proxy.

The operator of these tests reaches the API server only through the proxy, so
every request it makes is on record: one GET of the job per reconcile, and every
list and watch with its label selector. The proxy also answers chosen requests
with 409, 429 (Retry-After) or 500.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kubetune.operator.handlers.finetunejob import REPORT_PAGE_SIZE
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.settings import Settings
from kubetune.runtime.contract.report import REPORT_KEY
from prometheus_client import REGISTRY

from ..controlplane import ControlPlane
from .faultproxy import FaultProxy, Recorded
from .harness import EXAMPLE_RUNS, InProcessOperator, MovableClock, conditions, eventually
from .test_finetunejob_operator import JOB, create_job, job, status, wait_phase, wait_ray_job

# The operator's settings here: nothing is looked at again without an event for 10 minutes.
SETTINGS = Settings(metrics_port=0, recheck_seconds=600, backoff_base_seconds=0.2, coalesce_seconds=0.5)


@pytest.fixture
def proxied(control_plane: ControlPlane, running_operator: InProcessOperator, tmp_path: Path) -> Iterator[FaultProxy]:
    """An operator that reaches the API server only through a FaultProxy (the shared operator pauses)."""
    running_operator.stop()
    proxy = FaultProxy(control_plane.kubeconfig).start()
    operator = InProcessOperator(proxy.write_kubeconfig(tmp_path / "kubeconfig"), MovableClock(), SETTINGS)
    operator.start()
    try:
        yield proxy
    finally:
        operator.stop()
        proxy.stop()
        running_operator.start()


def job_path(namespace: str, name: str = "tickets") -> str:
    return f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs/{name}"


def reconciles(proxy: FaultProxy, namespace: str, since: int = 0, name: str = "tickets") -> list[Recorded]:
    """Each reconcile of a job reads the job once: its GETs are its reconciles."""
    return [r for r in proxy.recorded(since) if r.method == "GET" and r.path == job_path(namespace, name)]


def quiet(proxy: FaultProxy, namespace: str, seconds: float = 2.0) -> int:
    """Wait until the operator has made no request about the namespace for `seconds`; the log's length then."""

    def settled() -> int | None:
        log = proxy.recorded()
        about = [r for r in log if f"/namespaces/{namespace}/" in r.path]
        last = about[-1].at if about else 0.0
        return len(log) if time.monotonic() - last >= seconds else None

    return eventually(settled, timeout=60, what="the operator to go quiet")


def test_a_burst_of_events_for_one_job_gives_at_most_two_reconciles(
    kube: Kube, namespace: str, proxied: FaultProxy
) -> None:
    create_job(kube, namespace)
    wait_phase(kube, namespace, "Pending", run=1)
    mark = quiet(proxied, namespace)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=10) as pool:  # 50 changes as fast as the API server takes them
        list(pool.map(lambda i: label(kube, namespace, f"change-{i}"), range(50)))
    burst = time.monotonic() - started
    eventually(lambda: job(kube, namespace)["metadata"]["labels"].get("burst"), what="the last change")
    quiet(proxied, namespace)
    passes = reconciles(proxied, namespace, since=mark)
    # Two passes when the burst is over within coalesce_max_seconds; a slower burst (a loaded API server)
    # gets one more per coalesce_max_seconds it lasts, as events wait no longer than that.
    most = 2 + int(burst / SETTINGS.coalesce_max_seconds)
    assert 1 <= len(passes) <= most, f"{len(passes)} reconciles for 50 events in {burst:.2f} s"


def test_a_run_rewriting_its_report_in_a_loop_gives_few_reconciles(
    kube: Kube, namespace: str, proxied: FaultProxy
) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    mark = quiet(proxied, namespace)
    started = time.monotonic()
    for step in range(1, 101):  # as fast as one client can patch it
        write_report(kube, namespace, json.dumps({"stage": "train", "step": step, "totalSteps": 100}))
    loop = time.monotonic() - started
    eventually(
        lambda: ((status(kube, namespace).get("runs") or [{}])[-1].get("progress") or {}).get("step") == 100,
        what="the last report in status",
    )
    quiet(proxied, namespace)
    passes = reconciles(proxied, namespace, since=mark)
    # One pass at the first change, at most one per coalesce_max_seconds while they go on, one after them.
    most = 2 + int(loop / SETTINGS.coalesce_max_seconds)
    assert 1 <= len(passes) <= most, f"{len(passes)} reconciles for 100 report patches in {loop:.2f} s"


def label(kube: Kube, namespace: str, value: str) -> None:
    kube.patch(ObjectRef(*JOB, namespace, "tickets"), {"metadata": {"labels": {"burst": value}}})


def test_conflicts_throttling_and_server_errors_are_retried_with_backoff(
    kube: Kube, namespace: str, proxied: FaultProxy
) -> None:
    # The error counters are the operator's, for all jobs: let other tests' jobs finish going first.
    eventually(
        lambda: not [j for j in kube.list(*JOB, None, {}) if j["metadata"]["namespace"] != namespace],
        timeout=120,
        what="no other FineTuneJobs",
    )
    statuses = [409, 409, 429, 500, 500, 500]
    fault = proxied.fail("PATCH", job_path(namespace) + "/status", statuses, retry_after=2)
    errors_before = {kind: reconcile_errors(kind) for kind in ("conflict", "throttled", "api")}
    create_job(kube, namespace)
    eventually(
        lambda: (c := conditions(job(kube, namespace)).get("Degraded")) and c["reason"] == "ReconcileFailed",
        what="the failure shown as Degraded=True, reason ReconcileFailed",
    )
    current = wait_phase(kube, namespace, "Pending", run=1)
    assert current["observedGeneration"] == 1 and fault.answered == statuses
    assert conditions(job(kube, namespace))["Degraded"]["status"] == "False"  # the next pass cleared it
    writes = [r for r in proxied.recorded() if r.method == "PATCH" and r.path == job_path(namespace) + "/status"]
    assert [w.status for w in writes] == [*statuses, 200, 200]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(writes)]
    # A conflict is written again at once on the re-read job when only its resourceVersion moved;
    # a second one fails the pass. Backoff then doubles from 0.2 s per failure of the key, and the
    # 429 asked for 2 s and got them. A server error is shown on the status at once (that write is
    # answered 500 the first time, then goes through) and retried with backoff.
    assert gaps[0] < 1.0, gaps
    assert gaps[1] >= 0.2 * 0.9 and gaps[2] >= 2.0 * 0.95, gaps
    assert gaps[3] < 1.0 and gaps[4] >= 0.8 * 0.9 and gaps[5] < 1.0, gaps
    assert gaps[6] >= 1.6 * 0.9 and gaps[6] > gaps[4], gaps
    for kind, count in (("conflict", 1), ("throttled", 1), ("api", 2)):
        assert reconcile_errors(kind) - errors_before[kind] == count, kind
    # The run was created once, whatever the retries did.
    ray_jobs = [r for r in proxied.recorded() if r.method == "POST" and r.path.endswith("/rayjobs")]
    assert [r.status for r in ray_jobs][:1] == [201] and all(r.status == 409 for r in ray_jobs[1:])


def reconcile_errors(kind: str) -> float:
    return REGISTRY.get_sample_value("kubetune_reconcile_errors_total", {"kind": "FineTuneJob", "error": kind}) or 0.0


def test_a_job_naming_a_secret_never_makes_the_operator_ask_for_it(
    kube: Kube, namespace: str, proxied: FaultProxy
) -> None:
    # The Secret does not exist, and the run starts all the same: its pods would say what is missing.
    create_job(kube, namespace, spec__storage={"credentialsSecret": {"name": "storage-keys"}})
    wait_ray_job(kube, namespace, "tickets-r1")
    assert [r for r in proxied.recorded() if "secrets" in r.path.split("/")] == []


def test_lists_and_watches_ask_for_the_operators_objects_only(kube: Kube, namespace: str, proxied: FaultProxy) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    collections = [r for r in proxied.recorded() if r.method == "GET" and is_collection(r.path)]
    kinds = {r.path.rsplit("/", 1)[-1] for r in collections}
    assert {"rayjobs", "configmaps", "rayservices", "pods", "finetunejobs", "modeldeployments"} <= kinds
    assert "secrets" not in kinds
    owners = {"rayjobs": {"finetunejob"}, "configmaps": {"finetunejob"}, "rayservices": {"modeldeployment"},
              "pods": {"finetunejob", "modeldeployment"}}  # fmt: skip
    pod_owners = set()
    for request in collections:
        kind = request.path.rsplit("/", 1)[-1]
        selector = request.query.get("labelSelector", "")
        if kind in owners:
            assert "app.kubernetes.io/managed-by=kubetune" in selector.split(","), request
            owner = {o for o in owners[kind] if f"kubetune.io/{o}" in selector.split(",")}
            assert len(owner) == 1, request
            if kind == "pods":
                pod_owners |= owner
        else:  # kubetune's own kinds, and the CRDs kopf watches to find them
            assert kind in ("finetunejobs", "modeldeployments", "customresourcedefinitions"), request
    assert pod_owners == {"finetunejob", "modeldeployment"}  # the runs' pods and the endpoints' pods
    # The operator's own lists come in pages; report ConfigMaps (anyone's, up to 1 MiB each) in small ones.
    lists = [r for r in collections if not r.watch and r.path.rsplit("/", 1)[-1] in {*owners, "secrets"}]
    assert lists and all(r.query.get("limit") for r in lists), lists
    assert {r.query["limit"] for r in lists if r.path.endswith("/configmaps")} == {str(REPORT_PAGE_SIZE)}


def is_collection(path: str) -> bool:
    """A list or watch path: /api/v1/<plural>, /apis/<group>/<version>/<plural>, or a namespace's."""
    parts = path.strip("/").split("/")
    if "namespaces" in parts:
        return len(parts) - parts.index("namespaces") == 3
    return len(parts) == (3 if parts[0] == "api" else 4)


def test_a_report_from_another_runtime_version_is_read(kube: Kube, namespace: str, proxied: FaultProxy) -> None:
    create_job(kube, namespace)
    wait_ray_job(kube, namespace, "tickets-r1")
    # A newer runtime: a higher schema version and fields this operator does not know.
    newer = (
        '{"schemaVersion": 2, "stage": "train", "step": 12, "totalSteps": 40, "loss": 0.5,'
        ' "gpuMemoryPeakBytes": 123456,'
        f' "variants": {{"int4": {{"uri": "{EXAMPLE_RUNS}/1/int4", "bitsPerWeight": 4}}}}}}'
    )
    write_report(kube, namespace, newer)
    progress = eventually(
        lambda: (
            ((status(kube, namespace).get("runs") or [{}])[-1].get("progress") or {}).get("step") == 12
            and status(kube, namespace)["runs"][-1]
        ),
        what="the newer report in status",
    )
    assert progress["progress"]["totalSteps"] == 40 and progress["artifacts"] == {"int4": f"{EXAMPLE_RUNS}/1/int4"}
    # An older runtime: no schema version at all.
    write_report(kube, namespace, '{"stage": "evaluate", "message": "evaluating"}')
    eventually(
        lambda: status(kube, namespace)["runs"][-1]["progress"].get("stage") == "evaluate",
        what="the older report in status",
    )


def write_report(kube: Kube, namespace: str, text: str) -> None:
    kube.patch(ObjectRef("v1", "ConfigMap", namespace, "tickets-r1-report"), {"data": {REPORT_KEY: text}})
