"""kopf wiring for FineTuneJob: watches, indexes, and handlers that only hand keys to the controller.

kopf watches FineTuneJobs, their runs' RayJobs and their report ConfigMaps, the
latter two with server-side label selectors, so the operator never receives
objects that are not its own. Indexes keep each job's runs and reports (parsed
once, when they change) and which jobs name which Secret; kopf fills them from
its initial listing before any handler runs, so the first pass of every job sees
all of its runs. Handlers enqueue the job's key; the controller does the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import kopf
from kubetune.operator.api.common import GROUP, VERSION
from kubetune.operator.api.finetunejob import KIND, PLURAL
from kubetune.operator.core.controller import Controller, ControllerSettings, Key
from kubetune.operator.kube import Kube, selector
from kubetune.operator.naming import JOB_LABEL, MANAGED_BY_LABEL, MANAGER, REPORT_LABEL
from kubetune.operator.planning.finetunejob import ObservedRun
from kubetune.operator.reconcile.finetunejob import (
    Children,
    Clock,
    FineTuneJobReconciler,
    SecretLookup,
    observe_report,
    observe_run,
)
from kubetune.operator.settings import Settings
from kubetune.runtime.contract.report import RunReport

RAY_JOBS = ("ray.io", "v1", "rayjobs")
CONFIG_MAPS = ("", "v1", "configmaps")
# What kopf asks the API server for: the runs' RayJobs and report ConfigMaps, nothing else.
# (Run config ConfigMaps are written once and never read back, so they are not watched.)
LABEL_SELECTORS: dict[tuple[str, str, str], str] = {
    RAY_JOBS: selector({MANAGED_BY_LABEL: MANAGER, JOB_LABEL: ""}),
    CONFIG_MAPS: selector({MANAGED_BY_LABEL: MANAGER, REPORT_LABEL: "true", JOB_LABEL: ""}),
}
_RUNS: dict[str, Any] = {MANAGED_BY_LABEL: MANAGER, JOB_LABEL: kopf.PRESENT}
_REPORTS: dict[str, Any] = {
    MANAGED_BY_LABEL: MANAGER,
    REPORT_LABEL: "true",
    JOB_LABEL: kopf.PRESENT,
}


def configure(settings: kopf.OperatorSettings) -> None:
    for resource, labels in LABEL_SELECTORS.items():
        settings.watching.label_selectors[resource] = labels


def controller(
    kube: Kube,
    settings: Settings,
    secrets: SecretLookup,
    clock: Clock,
    executor: Executor,
    indices: Mapping[str, Any],
) -> Controller[Children]:
    """The FineTuneJob controller, reading children from the indexes below (on the event loop)."""
    runs: kopf.Index[Key, ObservedRun] = indices["finetunejob_runs"]
    reports: kopf.Index[Key, tuple[int, RunReport]] = indices["finetunejob_reports"]
    by_secret: kopf.Index[Key, str] = indices["finetunejob_secrets"]

    def children(key: Key) -> Children:
        return Children(runs=tuple(runs.get(key, ())), reports=dict(reports.get(key, ())))

    def secret_users(namespace: str, name: str) -> list[Key]:
        return [(namespace, job) for job in by_secret.get((namespace, name), ())]

    reconciler = FineTuneJobReconciler(kube, settings, secrets, clock)
    return Controller(
        KIND, children, reconciler.reconcile, executor, ControllerSettings.of(settings), secret_users=secret_users
    )


@kopf.index(*RAY_JOBS, labels=_RUNS)
def finetunejob_runs(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, ObservedRun]:
    run = observe_run(body)
    return {(namespace or "", labels[JOB_LABEL]): run} if run is not None else {}


@kopf.index(*CONFIG_MAPS, labels=_REPORTS)
def finetunejob_reports(
    namespace: str | None, labels: Mapping[str, str], body: kopf.Body, **_: Any
) -> dict[Key, tuple[int, RunReport]]:
    report = observe_report(body)
    return {(namespace or "", labels[JOB_LABEL]): report} if report is not None else {}


@kopf.index(GROUP, VERSION, PLURAL)
def finetunejob_secrets(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> dict[Key, str]:
    """Which jobs name which Secret (by namespace and Secret name)."""
    secret = ((spec.get("storage") or {}).get("credentialsSecret") or {}).get("name")
    return {(namespace or "", secret): name} if isinstance(secret, str) else {}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job_event(event: kopf.RawEvent, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    version = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    memo.finetunejobs.enqueue((namespace or "", name), version)


@kopf.on.event(*RAY_JOBS, labels=_RUNS)
async def on_ray_job_event(
    event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    # A RayJob without status is one we just created: nothing new to observe.
    if event.get("type") == "DELETED" or (event.get("object") or {}).get("status"):
        memo.finetunejobs.enqueue((namespace or "", labels[JOB_LABEL]))


@kopf.on.event(*CONFIG_MAPS, labels=_REPORTS)
async def on_report_event(
    event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], memo: Any, **_: Any
) -> None:
    # A report changes when the run writes progress; it is created empty with the run.
    if event.get("type") in ("MODIFIED", "DELETED"):
        memo.finetunejobs.enqueue((namespace or "", labels[JOB_LABEL]))
