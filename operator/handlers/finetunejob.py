"""kopf wiring for FineTuneJob: every event about a job or its runs' objects reconciles the job.

The handlers are thin: they pick the job the event is about and call the
level-based reconciler. A per-job lock keeps two threads from reconciling the same
job at once; events caused by our own writes are recognised and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kubetune.operator.api.common import GROUP, VERSION
from kubetune.operator.api.finetunejob import PLURAL
from kubetune.operator.kube import ApiError
from kubetune.operator.metrics import RECONCILE_ERRORS, RECONCILE_SECONDS, RECONCILES
from kubetune.operator.naming import JOB_LABEL, MANAGED_BY_LABEL, MANAGER, REPORT_LABEL
from kubetune.operator.reconcile.finetunejob import FineTuneJobReconciler
from kubetune.operator.requeue import Key, Requeuer

log = logging.getLogger("kubetune.finetunejob")
KIND_LABEL = "FineTuneJob"
RETRY_SECONDS = 5.0


class FineTuneJobController:
    """Serialises reconciles per job and schedules the next look."""

    def __init__(self, reconciler: FineTuneJobReconciler, requeuer_factory: Any) -> None:
        self.reconciler = reconciler
        self.requeuer: Requeuer = requeuer_factory(self.reconcile_key)
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()
        self._written: dict[Key, str] = {}  # status resourceVersion we wrote last, per job

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def is_own_write(self, key: Key, resource_version: str | None) -> bool:
        return resource_version is not None and self._written.get(key) == resource_version

    def forget(self, key: Key) -> None:
        with self._guard:
            self._locks.pop(key, None)
            self._written.pop(key, None)

    def reconcile_key(self, key: Key, body: Mapping[str, Any] | None = None) -> None:
        namespace, name = key
        started = time.perf_counter()
        with self._lock(key):
            try:
                outcome = self.reconciler.reconcile(namespace, name, body=dict(body) if body is not None else None)
            except ApiError as error:
                RECONCILES.labels(KIND_LABEL, "error").inc()
                RECONCILE_ERRORS.labels(KIND_LABEL, "conflict" if error.conflict else "api").inc()
                log.info("reconcile of %s/%s will be retried: %s", namespace, name, error)
                self.requeuer.after(key, 0.2 if error.conflict else RETRY_SECONDS)
                return
            except Exception:
                RECONCILES.labels(KIND_LABEL, "error").inc()
                RECONCILE_ERRORS.labels(KIND_LABEL, "unexpected").inc()
                log.exception("reconcile of %s/%s failed; retrying", namespace, name)
                self.requeuer.after(key, RETRY_SECONDS)
                return
            finally:
                RECONCILE_SECONDS.labels(KIND_LABEL).observe(time.perf_counter() - started)
            if outcome.resource_version:
                self._written[key] = outcome.resource_version
        RECONCILES.labels(KIND_LABEL, "ok").inc()
        if outcome.requeue_after is not None:
            self.requeuer.after(key, outcome.requeue_after)


_controller: FineTuneJobController | None = None


def install(controller: FineTuneJobController) -> None:
    """Set the controller the kopf handlers below delegate to (done once at startup)."""
    global _controller
    _controller = controller


def _active() -> FineTuneJobController:
    if _controller is None:
        raise kopf.PermanentError("the FineTuneJob controller is not installed")
    return _controller


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_job_event(event: kopf.RawEvent, namespace: str | None, name: str, **_: Any) -> None:
    controller = _active()
    key = (namespace or "", name)
    if event.get("type") == "DELETED":
        controller.forget(key)
        return
    body: Mapping[str, Any] = event.get("object") or {}
    if controller.is_own_write(key, body.get("metadata", {}).get("resourceVersion")):
        return
    controller.reconcile_key(key, body)


@kopf.on.event("ray.io", "v1", "rayjobs", labels={MANAGED_BY_LABEL: MANAGER, JOB_LABEL: kopf.PRESENT})
def on_ray_job_event(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    # A RayJob without status yet is one we just created: nothing new to observe.
    body: Mapping[str, Any] = event.get("object") or {}
    if event.get("type") == "DELETED" or body.get("status"):
        _active().reconcile_key((namespace or "", labels[JOB_LABEL]))


@kopf.on.event(
    "", "v1", "configmaps", labels={MANAGED_BY_LABEL: MANAGER, REPORT_LABEL: "true", JOB_LABEL: kopf.PRESENT}
)
def on_report_event(event: kopf.RawEvent, namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    # Only the runs' report ConfigMaps are watched: they carry progress; run configs never change.
    if event.get("type") == "MODIFIED":
        _active().reconcile_key((namespace or "", labels[JOB_LABEL]))
