"""Reconcile one FineTuneJob: observe, plan (pure), act, write the computed status.

Level-based and idempotent: it reads the job and takes its runs from the caches
each time, so it may run any number of times, after any crash, and reaches the
same state. It runs in a worker thread of the controller core (blocking API calls).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.finetunejob import (
    ACTIVE_PHASES,
    KIND,
    FineTuneJob,
    FineTuneJobStatus,
    JobPhase,
    RunRecord,
    cluster_output_problem,
)
from kubetune.operator.builders.finetunejob import build_run, build_run_network_policy
from kubetune.operator.conditions import Reason
from kubetune.operator.core.controller import Key, Outcome
from kubetune.operator.core.informer import Informer
from kubetune.operator.kube import ApiError, Kube, ObjectRef
from kubetune.operator.kuberay import KubeRayAuthSupport, auth_unavailable_message, ray_version_problem
from kubetune.operator.metrics import PROMOTIONS, RUNS_FINISHED, RUNS_STARTED
from kubetune.operator.model.events import Clock, Event, Problem, parse_time, utc_now
from kubetune.operator.naming import (
    config_map_name,
    controller_uid,
    plan_job_name,
    report_name,
    runner_name,
)
from kubetune.operator.observe.kuberay import ObservedRun, observe_run
from kubetune.operator.observe.plan_jobs import PlanJobState, observe_plan_job
from kubetune.operator.observe.pods import PodWait, RunPod, first_wait
from kubetune.operator.observe.reports import Report
from kubetune.operator.planning.adoption import adoption_problem
from kubetune.operator.planning.finetunejob import Plan, RunRequest, ScheduleError, name_conflict, plan
from kubetune.operator.policy import finetunejob_violations
from kubetune.operator.reconcile import apply_owned, patch_status, post_events, previous_status
from kubetune.operator.settings import Settings
from kubetune.operator.status.finetunejob import compute_status
from kubetune.runtime.contract.errors import describe
from kubetune.runtime.contract.plan import RunPlan
from kubetune.runtime.contract.report import RunReport
from pydantic import ValidationError

log = logging.getLogger("kubetune.finetunejob")
Manifest = dict[str, Any]


class FineTuneJobReconciler:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        runs: Informer[ObservedRun],
        reports: Informer[Report],
        clock: Clock = utc_now,
        pods: Informer[RunPod] | None = None,
        kuberay: KubeRayAuthSupport | None = None,
    ) -> None:
        """Reads the job from the API server; its runs, reports and pods from the caches; whether
        KubeRay can run Ray with token authentication from its CRDs.

        Secrets are not looked at: the operator holds no grant on them. A Secret the spec names
        that does not exist keeps the run's pods from starting, which shows as PodConfigError.
        """
        self.kube = kube
        self.settings = settings
        self.kuberay = kuberay or KubeRayAuthSupport(kube)
        self.runs, self.reports, self.pods = runs, reports, pods
        self.clock = clock  # schedules and timestamps read this clock; tests inject their own

    def reconcile(self, key: Key) -> Outcome:
        namespace, name = key
        now = self.clock()
        runs, reports = self.runs.owned_by(key), self.reports.owned_by(key)
        body = self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None:
            return Outcome(gone=True)
        # Only what carries this job's UID is its own: not an orphan of an earlier job of the same
        # name, nor an object someone else made with its labels.
        uid = body["metadata"].get("uid")
        runs = [run for run in runs if run.owner_uid == uid]
        own = [seen for seen in reports if seen.owner_uid == uid]
        own_reports = {seen.number: seen.report for seen in own if seen.report is not None}
        plans = {seen.number: seen.plan for seen in own if seen.plan is not None}
        if body["metadata"].get("deletionTimestamp"):
            return Outcome()
        generation = int(body["metadata"].get("generation", 1))
        previous = previous_status(body, FineTuneJobStatus, log)
        try:
            job = FineTuneJob.model_validate({**body, "status": None})
        except ValidationError as error:
            problem = Problem(Reason.INVALID_SPEC, "; ".join(describe(error)))
            return self._stopped(body, previous, problem, generation, now, requeue=None)
        job.status = previous
        self._ensure_network_policies(job, previous)
        violations = [str(found) for found in finetunejob_violations(job.spec, self.settings)]
        violation = "; ".join(violations) or cluster_output_problem(job.spec.output.uri)
        violation = violation or ray_version_problem(job.spec.resources, "spec.resources", self.settings)
        if violation is not None:
            return self._stopped(body, previous, Problem(Reason.INVALID_SPEC, violation), generation, now, requeue=None)
        try:
            decision = self._plan(job, body, runs, own_reports, plans, generation, now)
        except ScheduleError as error:  # the admission checks missed it (another croniter, say)
            problem = Problem(Reason.INVALID_SPEC, str(error))
            return self._stopped(body, previous, problem, generation, now, requeue=None)
        unavailable = self._auth_unavailable() if decision.create is not None else None
        if unavailable is not None:  # nothing of this pass is done: a new run would have no authentication
            problem = Problem(Reason.RAY_AUTH_UNAVAILABLE, unavailable)
            return self._stopped(body, previous, problem, generation, now, requeue=self.settings.recheck_seconds)
        for ray_job in decision.stop:
            self._delete_owned(ObjectRef("ray.io/v1", "RayJob", namespace, ray_job), uid)
            self._delete_owned(ObjectRef("batch/v1", "Job", namespace, plan_job_name(ray_job)), uid)
        if decision.create is not None:
            conflict = self._create_run(job, decision.create)
            if conflict is None:
                RUNS_STARTED.labels(decision.create.trigger.value).inc()
            else:
                decision = name_conflict(job, decision, conflict, now)
        for request in decision.launch:  # planned runs that fit: their RayJobs now
            conflict = self._create([build_run(job, request, self.settings).ray_job])
            if conflict is not None:
                decision = name_conflict(job, decision, conflict, now, request.number)
        for record in decision.forget:
            self._delete_run(namespace, record, uid)
        status = compute_status(
            decision.records,
            suspended=job.spec.suspend,
            generation=generation,
            previous=previous,
            now=now,
            last_schedule_time=decision.last_schedule_time,
            handled_retrain=decision.handled_retrain,
        )
        version = self._write_status(body, status.to_wire())
        for record in decision.finished:  # counted once: a pass whose write failed is repeated
            RUNS_FINISHED.labels(record.phase.value).inc()
            if record.gate is not None and record.gate.passed:
                PROMOTIONS.inc()
        post_events(self.kube, body, decision.events, now, log)
        return Outcome(version, decision.requeue_after)

    def _plan(
        self,
        job: FineTuneJob,
        body: Manifest,
        runs: list[ObservedRun],
        reports: Mapping[int, RunReport],
        plans: Mapping[int, RunPlan],
        generation: int,
        now: datetime,
    ) -> Plan:
        return plan(
            job,
            generation=generation,
            annotations=body["metadata"].get("annotations") or {},
            created=parse_time(body["metadata"].get("creationTimestamp")) or now,
            observed=self._with_unlisted_runs(job, runs),
            reports=reports,
            now=now,
            recheck_seconds=self.settings.recheck_seconds,
            pod_waits=self._pod_waits((job.metadata["namespace"], job.metadata["name"])),
            plans=plans,
            plan_jobs=self._plan_jobs(job),
        )

    def _plan_jobs(self, job: FineTuneJob) -> dict[int, PlanJobState]:
        """The plan Jobs of the job's planned runs that exist and are its own, read now (not cached:
        only runs in phase Planning have one that matters)."""
        found = {}
        for record in (job.status.runs if job.status else None) or []:
            if record.phase != JobPhase.PLANNING:
                continue
            body = self.kube.get("batch/v1", "Job", job.metadata["namespace"], plan_job_name(record.ray_job_name))
            if body is not None and controller_uid(body) == job.metadata.get("uid"):
                found[record.number] = observe_plan_job(body)
        return found

    def _ensure_network_policies(self, job: FineTuneJob, status: FineTuneJobStatus) -> None:
        """Keep the Ray cluster of each active run closed: its NetworkPolicy is made again if deleted and
        restored if edited or built otherwise now (settings changed since the run started)."""
        for record in status.runs or []:
            if record.phase not in ACTIVE_PHASES:
                continue
            policy = build_run_network_policy(job, record.number, self.settings)
            taken = apply_owned(self.kube, policy, job.metadata.get("uid"), KIND)
            if taken is not None:  # not the run's own: left alone, and said
                log.warning("run %s of %s: %s", record.number, job.metadata["name"], taken)

    def _auth_unavailable(self) -> str | None:
        """Why a Ray cluster cannot be created with the token authentication the settings ask for."""
        if not self.settings.kuberay_auth_options:
            return None
        missing = self.kuberay.missing()
        return auth_unavailable_message(missing) if missing is not None else None

    def _pod_waits(self, key: Key) -> dict[int, PodWait]:
        """Per run, the first of its pods (by name) that cannot run, and why."""
        pods = self.pods.owned_by(key) if self.pods else []
        waits = {number: first_wait(pod for pod in pods if pod.number == number) for number in {p.number for p in pods}}
        return {number: wait for number, wait in waits.items() if wait is not None}

    def _with_unlisted_runs(self, job: FineTuneJob, runs: list[ObservedRun]) -> list[ObservedRun]:
        """The cached runs, plus active runs of the status that the cache does not hold (yet).

        A RayJob created moments ago may not have reached the cache: it is read before
        the run is declared lost.
        """
        listed = {run.name for run in runs}
        records = (job.status.runs if job.status else None) or []
        unlisted = [r.ray_job_name for r in records if r.phase in ACTIVE_PHASES and r.ray_job_name not in listed]
        found = [self.kube.get("ray.io/v1", "RayJob", job.metadata["namespace"], run) for run in unlisted]
        owned = [body for body in found if body is not None and controller_uid(body) == job.metadata.get("uid")]
        return [*runs, *(run for body in owned if (run := observe_run(body)) is not None)]

    def _create_run(self, job: FineTuneJob, request: RunRequest) -> str | None:
        """Create the run's objects in order; None, or why not: a name taken by an object not the job's."""
        return self._create(build_run(job, request, self.settings).in_order())

    def _create(self, manifests: list[Manifest]) -> str | None:
        """Create the objects in order; None, or why not: a name taken by an object not the job's.

        An object that exists and belongs to the job was made by an earlier pass that did not finish:
        it names the job as its controller (kind, name and UID) and holds what this pass would create.
        Anything else (a planted run config with the job's UID, say) is not used.
        """
        for manifest in manifests:
            if self.kube.create(manifest) is not None:
                continue
            ref = ObjectRef.of(manifest)
            existing = self.kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
            if existing is None and self.kube.create(manifest) is not None:
                continue  # deleted in between: made now
            problem = "it could not be read" if existing is None else adoption_problem(existing, manifest)
            if problem is not None:
                return f"{ref.kind} {ref.name} already exists and does not belong to this FineTuneJob ({problem})"
        return None

    def _delete_owned(self, ref: ObjectRef, owner_uid: str | None) -> None:
        """Delete the object if it belongs to `owner_uid`; never one that someone else made with its name."""
        existing = self.kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
        if existing is not None and owner_uid is not None and controller_uid(existing) == owner_uid:
            self.kube.delete(ref, uid=existing["metadata"].get("uid"))

    def _stopped(
        self,
        body: Manifest,
        previous: FineTuneJobStatus,
        problem: Problem,
        generation: int,
        now: datetime,
        *,
        requeue: float | None,
    ) -> Outcome:
        """Status for a job that cannot run now (the problem names the field); its runs are kept."""
        status = compute_status(
            list(previous.runs or []),
            suspended=False,
            generation=generation,
            previous=previous,
            now=now,
            last_schedule_time=previous.last_schedule_time,
            handled_retrain=previous.handled_retrain,
            problem=problem,
        )
        wire = status.to_wire()
        changed = (body.get("status") or {}).get("conditions") != wire.get("conditions")
        version = self._write_status(body, wire)
        if changed:
            post_events(self.kube, body, [Event("Warning", problem.reason, problem.message)], now, log)
        return Outcome(version, requeue)

    def _delete_run(self, namespace: str, record: RunRecord, owner_uid: str | None) -> None:
        run = record.ray_job_name
        refs = [
            ObjectRef("ray.io/v1", "RayJob", namespace, run),
            ObjectRef("batch/v1", "Job", namespace, plan_job_name(run)),
            ObjectRef("networking.k8s.io/v1", "NetworkPolicy", namespace, run),
            ObjectRef("v1", "ConfigMap", namespace, config_map_name(run)),
            ObjectRef("v1", "ConfigMap", namespace, report_name(run)),
            ObjectRef("rbac.authorization.k8s.io/v1", "RoleBinding", namespace, runner_name(run)),
            ObjectRef("rbac.authorization.k8s.io/v1", "Role", namespace, runner_name(run)),
            ObjectRef("v1", "ServiceAccount", namespace, runner_name(run)),
        ]
        for ref in refs:
            self._delete_owned(ref, owner_uid)

    def _write_status(self, body: Manifest, status: Manifest) -> str | None:
        """Write the status computed from `body`; the version written, or None when nothing changed.

        The write fails when the job changed since it was read. When what changed is
        none of what the status was computed from (a label, say), it is written again
        on the job as it is now; otherwise the conflict fails the pass, which is retried.
        """
        ref = ObjectRef(API_VERSION, KIND, body["metadata"]["namespace"], body["metadata"]["name"])
        try:
            return patch_status(self.kube, ref, body, status)
        except ApiError as error:
            current = self.kube.get(ref.api_version, ref.kind, ref.namespace, ref.name) if error.conflict else None
            if current is None or _inputs(current) != _inputs(body):
                raise
            return patch_status(self.kube, ref, current, status)


def _inputs(body: Manifest) -> tuple[Any, ...]:
    """What a job's status is computed from: its spec (generation), annotations, deletion and status."""
    meta = body["metadata"]
    return meta.get("generation"), meta.get("annotations"), meta.get("deletionTimestamp"), body.get("status")
