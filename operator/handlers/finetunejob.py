"""FineTuneJob wiring: the kopf handler, the caches of its runs, and the events that wake a job.

kopf watches FineTuneJobs; its handler only enqueues the job's key. The runs'
RayJobs and report ConfigMaps are held by informers with server-side label
selectors, kept as the planner's view of each RayJob and the bounded report,
indexed by job. Labels alone prove nothing (anyone who may create a ConfigMap
can set them): a report is read only when its controller is the FineTuneJob its
label names and its text is small, and the reconciler keeps only those with the
job's UID. A change that matters to a job enqueues it; the controller core
merges a burst of them (a run rewriting its report in a loop) into few passes.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

import kopf
from kubetune.operator.api.common import GROUP, VERSION
from kubetune.operator.api.finetunejob import KIND, PLURAL
from kubetune.operator.core.controller import Controller, ControllerSettings
from kubetune.operator.core.informer import Change, Informer, Source, owner_label
from kubetune.operator.kube import Kube, selector
from kubetune.operator.model.events import Clock
from kubetune.operator.naming import JOB_LABEL, MANAGED_BY_LABEL, MANAGER, REPORT_LABEL
from kubetune.operator.observe.kuberay import ObservedRun, observe_run
from kubetune.operator.observe.pods import RunPod, observe_run_pod
from kubetune.operator.observe.reports import Report, observe_report
from kubetune.operator.reconcile import reconciling
from kubetune.operator.reconcile.finetunejob import FineTuneJobReconciler
from kubetune.operator.settings import Settings

# The runs' RayJobs and report ConfigMaps, nothing else. (Run config ConfigMaps are
# written once and never read back, so they are not watched.)
RUNS = Source("ray.io/v1", "RayJob", selector({MANAGED_BY_LABEL: MANAGER, JOB_LABEL: ""}))
# Anyone who may create ConfigMaps can give one these labels, up to 1 MiB each: listed ten at a time,
# and kept as the bounded report `observe_report` makes (never the ConfigMap).
REPORT_PAGE_SIZE = 10
REPORTS = Source(
    "v1",
    "ConfigMap",
    selector({MANAGED_BY_LABEL: MANAGER, REPORT_LABEL: "true", JOB_LABEL: ""}),
    page_size=REPORT_PAGE_SIZE,
)
# The runs' pods (KubeRay gives them the labels of our pod templates): why a run waits.
PODS = Source("v1", "Pod", selector({MANAGED_BY_LABEL: MANAGER, JOB_LABEL: ""}))


job_of = owner_label(JOB_LABEL)


class FineTuneJobs:
    """The FineTuneJob controller and the caches it reads."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        clock: Clock,
        executor: Executor,
        namespaces: list[str] | None,
    ) -> None:
        self.runs: Informer[ObservedRun] = Informer(kube, RUNS, namespaces, observe_run, job_of)
        self.reports: Informer[Report] = Informer(kube, REPORTS, namespaces, observe_report, job_of)
        self.pods: Informer[RunPod] = Informer(kube, PODS, namespaces, observe_run_pod, job_of)
        reconciler = FineTuneJobReconciler(kube, settings, self.runs, self.reports, clock, self.pods)
        self.controller = Controller(
            KIND, reconciling(kube, KIND, reconciler.reconcile, clock), executor, ControllerSettings.of(settings)
        )

    def start(self) -> None:
        self.runs.start(self._run_changed)
        self.reports.start(self._report_changed)
        self.pods.start(self._report_changed)  # any change of a run's pod may change why it waits
        self.controller.start([self.runs.synced, self.reports.synced, self.pods.synced])

    async def stop(self) -> None:
        await self.controller.stop()
        for informer in (self.runs, self.reports, self.pods):
            await asyncio.to_thread(informer.stop)

    def _run_changed(self, change: Change[ObservedRun]) -> None:
        # A RayJob without status is one we just created: nothing new to observe.
        if change.owner is not None and (change.value is None or change.value.status):
            self.controller.enqueue(change.owner)

    def _report_changed(self, change: Change[Report] | Change[RunPod]) -> None:
        if change.owner is not None:
            self.controller.enqueue(change.owner)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job_event(event: kopf.RawEvent, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    version = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    memo.finetunejobs.controller.enqueue((namespace or "", name), version)
    memo.changed(KIND, namespace or "", name)  # the deployments that follow the job look again
