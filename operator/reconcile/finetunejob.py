"""Reconcile one FineTuneJob: observe, plan (pure), act, write the computed status.

Level-based and idempotent: it reads everything it needs each time, so it may run
any number of times, after any crash, and reaches the same state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.finetunejob import (
    ACTIVE_PHASES,
    KIND,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
    RunRecord,
    Trigger,
)
from kubetune.operator.builders.finetunejob import build_run
from kubetune.operator.conditions import Reason
from kubetune.operator.kube import ApiError, Kube, ObjectRef
from kubetune.operator.metrics import PROMOTIONS, RUNS_FINISHED, RUNS_STARTED
from kubetune.operator.naming import (
    GENERATION_ANNOTATION,
    RUN_LABEL,
    SPEC_HASH_ANNOTATION,
    TRIGGER_ANNOTATION,
    TRIGGER_DETAIL_ANNOTATION,
    config_map_name,
    report_name,
    run_name,
    runner_name,
)
from kubetune.operator.planning.finetunejob import Event, ObservedRun, plan
from kubetune.operator.settings import Settings
from kubetune.operator.status.finetunejob import compute_status
from kubetune.runtime.contract.errors import describe
from kubetune.runtime.contract.report import REPORT_KEY, RunReport
from pydantic import ValidationError

log = logging.getLogger("kubetune.finetunejob")
Manifest = dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """What one reconcile did: the status version it wrote and when to look again."""

    resource_version: str | None
    requeue_after: float | None


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def observe_runs(rayjobs: list[Manifest]) -> list[ObservedRun]:
    runs = []
    for item in rayjobs:
        meta = item["metadata"]
        annotations = meta.get("annotations") or {}
        try:
            number = int(meta["labels"][RUN_LABEL])
            trigger = Trigger(annotations[TRIGGER_ANNOTATION])
        except (KeyError, ValueError):
            log.warning("ignoring RayJob %s: it lacks kubetune's run label or trigger", meta.get("name"))
            continue
        runs.append(
            ObservedRun(
                number=number,
                name=meta["name"],
                trigger=trigger,
                trigger_detail=annotations.get(TRIGGER_DETAIL_ANNOTATION, ""),
                spec_generation=int(annotations.get(GENERATION_ANNOTATION, "0")),
                spec_hash=annotations.get(SPEC_HASH_ANNOTATION),
                created=parse_time(meta.get("creationTimestamp")),
                status=item.get("status"),
            )
        )
    return runs


def observe_reports(config_maps: list[Manifest]) -> dict[int, RunReport]:
    reports = {}
    for item in config_maps:
        text = (item.get("data") or {}).get(REPORT_KEY)
        if not text:
            continue
        try:
            reports[int(item["metadata"]["labels"][RUN_LABEL])] = RunReport.model_validate_json(text)
        except (KeyError, ValueError) as error:  # a malformed report never breaks the job's status
            log.warning("ignoring malformed report %s: %s", item["metadata"].get("name"), error)
    return reports


def status_patch(previous: Manifest, current: Manifest) -> Manifest:
    """A merge patch that turns `previous` into `current` (removed keys become null)."""
    return {key: current.get(key) for key in {*previous, *current} if previous.get(key) != current.get(key)}


def utc_now() -> datetime:
    return datetime.now(UTC)


class FineTuneJobReconciler:
    def __init__(self, kube: Kube, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.kube = kube
        self.settings = settings
        self.clock = clock  # schedules and timestamps read this clock; tests inject their own

    def reconcile(
        self, namespace: str, name: str, now: datetime | None = None, body: Manifest | None = None
    ) -> Outcome:
        """Reconcile one job; `body` is the job as a watch event just delivered it (else it is read)."""
        now = now or self.clock()
        if body is None:
            body = self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return Outcome(None, None)
        meta = body["metadata"]
        generation = int(meta.get("generation", 1))
        try:
            job = FineTuneJob.model_validate(body)
        except ValidationError as error:
            return self._invalid(body, "; ".join(describe(error)), generation, now, requeue=None)
        problem = self._missing_references(job)
        if problem is not None:
            return self._invalid(body, problem, generation, now, requeue=30.0, reason=Reason.SECRET_NOT_FOUND)
        ray_jobs, report_maps = self._observe(job)
        observed, reports = observe_runs(ray_jobs), observe_reports(report_maps)
        decision = plan(
            job,
            generation=generation,
            annotations=meta.get("annotations") or {},
            created=parse_time(meta.get("creationTimestamp")) or now,
            observed=observed,
            reports=reports,
            now=now,
        )
        for ray_job in decision.stop:
            self.kube.delete(ObjectRef("ray.io/v1", "RayJob", namespace, ray_job))
        if decision.create is not None:
            for manifest in build_run(job, decision.create, self.settings).in_order():
                self.kube.create(manifest)
            RUNS_STARTED.labels(decision.create.trigger.value).inc()
        for record in decision.forget:
            self._delete_run(namespace, record)
        status = compute_status(
            decision.records,
            suspended=job.spec.suspend,
            generation=generation,
            previous=job.status,
            now=now,
            last_schedule_time=decision.last_schedule_time,
            handled_retrain=decision.handled_retrain,
        )
        version = self._write_status(body, status.to_wire())
        self._post(body, decision.events, now)
        return Outcome(version, decision.requeue_after)

    def _observe(self, job: FineTuneJob) -> tuple[list[Manifest], list[Manifest]]:
        """The RayJobs and report ConfigMaps of the runs that may still change, read by name.

        Finished runs are final in our status and need no reading. Runs are numbered
        without gaps, so a run created just before a crash (before its status was
        written) is the one after the newest recorded run.
        """
        namespace, name = job.metadata["namespace"], job.metadata["name"]
        records = list(job.status.runs or []) if job.status else []
        runs = [record.ray_job_name for record in records if record.phase in ACTIVE_PHASES]
        ray_jobs = [found for run in runs if (found := self.kube.get("ray.io/v1", "RayJob", namespace, run))]
        number = max((record.number for record in records), default=0) + 1
        while found := self.kube.get("ray.io/v1", "RayJob", namespace, run_name(name, number)):
            ray_jobs.append(found)
            runs.append(found["metadata"]["name"])
            number += 1
        reports = [found for run in runs if (found := self.kube.get("v1", "ConfigMap", namespace, report_name(run)))]
        return ray_jobs, reports

    def _missing_references(self, job: FineTuneJob) -> str | None:
        storage = job.spec.storage
        if storage is None or storage.credentials_secret is None:
            return None
        secret = storage.credentials_secret.name
        if self.kube.get("v1", "Secret", job.metadata["namespace"], secret) is None:
            return f"spec.storage.credentialsSecret.name: Secret {secret!r} not found"
        return None

    def _invalid(
        self,
        body: Manifest,
        message: str,
        generation: int,
        now: datetime,
        *,
        requeue: float | None,
        reason: Reason = Reason.INVALID_SPEC,
    ) -> Outcome:
        previous = FineTuneJobStatus.model_validate(body.get("status") or {})
        status = compute_status(
            list(previous.runs or []),
            suspended=False,
            generation=generation,
            previous=previous,
            now=now,
            last_schedule_time=previous.last_schedule_time,
            handled_retrain=previous.handled_retrain,
            invalid=message,
        )
        wire = status.to_wire()
        for item in wire.get("conditions", []):
            if item["reason"] == Reason.INVALID_SPEC.value:
                item["reason"] = reason.value
        changed = (body.get("status") or {}).get("conditions") != wire.get("conditions")
        version = self._write_status(body, wire)
        if changed:
            self._post(body, [Event("Warning", reason, message)], now)
        return Outcome(version, requeue)

    def _delete_run(self, namespace: str, record: RunRecord) -> None:
        run = record.ray_job_name
        refs = [
            ObjectRef("ray.io/v1", "RayJob", namespace, run),
            ObjectRef("v1", "ConfigMap", namespace, config_map_name(run)),
            ObjectRef("v1", "ConfigMap", namespace, report_name(run)),
            ObjectRef("rbac.authorization.k8s.io/v1", "RoleBinding", namespace, runner_name(run)),
            ObjectRef("rbac.authorization.k8s.io/v1", "Role", namespace, runner_name(run)),
            ObjectRef("v1", "ServiceAccount", namespace, runner_name(run)),
        ]
        for ref in refs:
            self.kube.delete(ref)

    def _write_status(self, body: Manifest, status: Manifest) -> str | None:
        previous = body.get("status") or {}
        patch = status_patch(previous, status)
        if not patch:
            return None
        ref = ObjectRef(API_VERSION, KIND, body["metadata"]["namespace"], body["metadata"]["name"])
        written = self.kube.patch_status(ref, patch, resource_version=body["metadata"].get("resourceVersion"))
        version: str | None = written.get("metadata", {}).get("resourceVersion")
        return version

    def _post(self, body: Manifest, events: list[Event], now: datetime) -> None:
        for event in events:
            if event.reason == Reason.RUN_SUCCEEDED:
                RUNS_FINISHED.labels(JobPhase.SUCCEEDED.value).inc()
                if "gate: passed" in event.message:
                    PROMOTIONS.inc()
            elif event.reason in (Reason.RUN_FAILED, Reason.RUN_STOPPED):
                RUNS_FINISHED.labels(JobPhase.FAILED.value).inc()
            try:
                self.kube.event(body, event.type, event.reason.value, event.message, now)
            except ApiError as error:  # an event is worth less than the reconcile that records it
                log.warning("could not record event %s: %s", event.reason, error)
            log.info(
                json.dumps({"object": body["metadata"]["name"], "reason": event.reason.value, "message": event.message})
            )
