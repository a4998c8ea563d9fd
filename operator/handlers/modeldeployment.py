"""ModelDeployment wiring: the kopf handler, the cache of RayServices, and the events that wake a deployment.

kopf watches ModelDeployments; its handler only enqueues the key. The RayServices and
the endpoints' pods are held by informers with server-side label selectors, kept as
what the rollout needs of each (of a pod: why it cannot run). A FineTuneJob's change
reaches the deployments that follow it through the controller core. Secrets are not
watched: a missing one shows on the endpoint's pods (PodConfigError).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

import kopf
from kubetune.operator.api.common import GROUP, VERSION
from kubetune.operator.api.modeldeployment import KIND, PLURAL
from kubetune.operator.core.controller import Controller, ControllerSettings
from kubetune.operator.core.informer import Change, Informer, Source, owner_label
from kubetune.operator.kube import Kube, selector
from kubetune.operator.model.events import Clock
from kubetune.operator.naming import DEPLOYMENT_LABEL, MANAGED_BY_LABEL, MANAGER
from kubetune.operator.observe.kuberay import ObservedService, observe_service
from kubetune.operator.observe.pods import PodState, observe_endpoint_pod
from kubetune.operator.reconcile import reconciling
from kubetune.operator.reconcile.modeldeployment import ModelDeploymentReconciler
from kubetune.operator.settings import Settings

SERVICES = Source("ray.io/v1", "RayService", selector({MANAGED_BY_LABEL: MANAGER, DEPLOYMENT_LABEL: ""}))
# The endpoints' Ray pods (KubeRay gives them the labels of our pod templates): why an endpoint waits.
PODS = Source("v1", "Pod", selector({MANAGED_BY_LABEL: MANAGER, DEPLOYMENT_LABEL: ""}))


deployment_of = owner_label(DEPLOYMENT_LABEL)


class ModelDeployments:
    """The ModelDeployment controller and the cache it reads."""

    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        clock: Clock,
        executor: Executor,
        namespaces: list[str] | None,
    ) -> None:
        self.services: Informer[ObservedService] = Informer(kube, SERVICES, namespaces, observe_service, deployment_of)
        self.pods: Informer[PodState] = Informer(kube, PODS, namespaces, observe_endpoint_pod, deployment_of)
        reconciler = ModelDeploymentReconciler(kube, settings, self.services, clock, self.pods)
        self.controller = Controller(
            KIND, reconciling(kube, KIND, reconciler.reconcile, clock), executor, ControllerSettings.of(settings)
        )

    def start(self) -> None:
        self.services.start(self._service_changed)
        self.pods.start(self._pod_changed)
        self.controller.start([self.services.synced, self.pods.synced])

    async def stop(self) -> None:
        await self.controller.stop()
        for informer in (self.services, self.pods):
            await asyncio.to_thread(informer.stop)

    def _pod_changed(self, change: Change[PodState]) -> None:
        if change.owner is not None:  # any change of a pod may change why the endpoint waits
            self.controller.enqueue(change.owner)

    def _service_changed(self, change: Change[ObservedService]) -> None:
        if change.owner is not None:
            self.controller.enqueue(change.owner)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_deployment_event(event: kopf.RawEvent, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    version = ((event.get("object") or {}).get("metadata") or {}).get("resourceVersion")
    memo.modeldeployments.controller.enqueue((namespace or "", name), version)
