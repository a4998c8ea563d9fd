"""Reconcile one ModelDeployment: resolve the artifact, plan the rollout (pure), apply the RayService, write status.

Nothing here writes the spec of a ModelDeployment or a FineTuneJob: promotion moves
through the FineTuneJob's status into the RayService's Serve config and this status.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.api.finetunejob import KIND as JOB_KIND
from kubetune.operator.api.finetunejob import FineTuneJob
from kubetune.operator.api.modeldeployment import (
    KIND,
    ModelDeployment,
    ModelDeploymentSpec,
    ModelDeploymentStatus,
    ServedModel,
)
from kubetune.operator.builders.modeldeployment import build_network_policy, build_ray_service, endpoint
from kubetune.operator.conditions import Reason
from kubetune.operator.core.controller import Dependency, Key, Outcome
from kubetune.operator.core.informer import Informer
from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.kuberay import KubeRayAuthSupport, auth_unavailable_message, ray_version_problem
from kubetune.operator.model.events import Clock, Event, Problem
from kubetune.operator.naming import APPLIED_HASH_ANNOTATION, FORMER_APPLIED_HASH_ANNOTATION, controller_uid
from kubetune.operator.observe.kuberay import ObservedService, observe_service
from kubetune.operator.observe.pods import PodState, first_wait
from kubetune.operator.planning.modeldeployment import Asked, plan_rollout, resolve
from kubetune.operator.policy import modeldeployment_violations
from kubetune.operator.reconcile import apply_owned, patch_status, post_events, previous_status
from kubetune.operator.settings import Settings
from kubetune.operator.status.modeldeployment import Rollout, compute_status, wait_events
from kubetune.runtime.contract.errors import describe
from pydantic import ValidationError

log = logging.getLogger("kubetune.modeldeployment")
Manifest = dict[str, Any]


class NameTakenError(Exception):
    """The RayService's name is taken by an object that is not the deployment's: nothing is written to it."""


class AuthUnavailableError(Exception):
    """The RayService would change, but KubeRay cannot give its Ray the token authentication asked for."""


def served_with(deployment: ModelDeployment, served: ServedModel) -> ModelDeployment:
    """The deployment as `served` is served: with the spec recorded with it (the current one when none is)."""
    if served.spec is None:
        return deployment
    try:
        spec = ModelDeploymentSpec.model_validate(served.spec)
    except ValidationError as error:  # written by a version that read specs otherwise
        log.warning("serving %s with the current spec: its recorded spec is unreadable: %s", served.uri, error)
        return deployment
    return deployment.model_copy(update={"spec": spec})


class ModelDeploymentReconciler:
    def __init__(
        self,
        kube: Kube,
        settings: Settings,
        services: Informer[ObservedService],
        clock: Clock,
        pods: Informer[PodState] | None = None,
        kuberay: KubeRayAuthSupport | None = None,
    ) -> None:
        """Reads the deployment and the FineTuneJob it follows from the API server; its RayService and
        its pods from caches; whether KubeRay can run Ray with token authentication from its CRDs."""
        self.kube, self.settings, self.clock = kube, settings, clock
        self.kuberay = kuberay or KubeRayAuthSupport(kube)
        self.services, self.pods = services, pods

    def reconcile(self, key: Key) -> Outcome:
        namespace, name = key
        now = self.clock()
        observed = self.services.owned_by(key)
        body = self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None:
            return Outcome(gone=True)
        if body["metadata"].get("deletionTimestamp"):
            return Outcome()
        generation = int(body["metadata"].get("generation", 1))
        previous = previous_status(body, ModelDeploymentStatus, log)
        # Only a RayService that carries this deployment's UID is its own (not an orphan, not a look-alike).
        service = next((s for s in observed if s.owner_uid == body["metadata"].get("uid")), None)
        try:
            deployment = ModelDeployment.model_validate({**body, "status": None})
        except ValidationError as error:
            problem = Problem(Reason.INVALID_SPEC, "; ".join(describe(error)))
            return self._write(body, previous, problem, generation, service, now, set())
        if service is not None:  # its Ray cluster runs: its NetworkPolicy is brought back to what it should be
            try:
                self._ensure_network_policy(deployment)
            except NameTakenError as error:
                conflict = Problem(Reason.NAME_CONFLICT, str(error))
                return self._write(body, previous, conflict, generation, service, now, set())
        violations = [str(found) for found in modeldeployment_violations(deployment.spec, self.settings)]
        violation = "; ".join(violations) or ray_version_problem(
            deployment.spec.resources, "spec.resources", self.settings
        )
        if violation:
            return self._write(body, previous, Problem(Reason.INVALID_SPEC, violation), generation, service, now, set())
        needs = _dependencies(deployment)
        reference = deployment.spec.model.from_fine_tune_job
        job = self._job(namespace, reference.name) if reference else None
        resolved = resolve(deployment, job)
        desired = resolved if isinstance(resolved, ServedModel) else None
        unresolved = resolved if isinstance(resolved, Problem) else None
        current = previous.serving
        asked = Asked(
            artifact=desired,
            generation=generation,
            spec=deployment.spec.to_wire(),
            service_hash=self._hash(deployment, current) if current else None,
        )
        waiting = first_wait(self.pods.owned_by(key)) if self.pods else None
        rollout = plan_rollout(
            previous,
            asked,
            service,
            self._hash(served_with(deployment, current), current) if current else None,
            deployment.spec.rollout_deadline_seconds,
            now,
            waiting,
        )
        if rollout.serving is not None:
            try:
                service = self._apply(served_with(deployment, rollout.serving), rollout.serving, service) or service
            except NameTakenError as error:
                conflict = Problem(Reason.NAME_CONFLICT, str(error))
                return self._write(body, previous, conflict, generation, None, now, needs)
            except AuthUnavailableError as error:  # what is served stays, as it is
                unavailable = Problem(Reason.RAY_AUTH_UNAVAILABLE, str(error))
                return self._write(body, previous, unavailable, generation, service, now, needs)
        status = compute_status(
            rollout,
            service,
            generation=generation,
            previous=previous,
            now=now,
            endpoint=endpoint(served_with(deployment, rollout.serving) if rollout.serving else deployment),
            problem=unresolved,
            waiting=waiting,
        )
        version = patch_status(self.kube, _ref(body), body, status.to_wire())
        post_events(self.kube, body, [*rollout.events, *wait_events(previous, status)], now, log)
        return Outcome(version, rollout.requeue_after or self.settings.recheck_seconds, depends_on=frozenset(needs))

    def _job(self, namespace: str, name: str) -> FineTuneJob | None:
        body = self.kube.get(API_VERSION, JOB_KIND, namespace, name)
        if body is None:
            return None
        try:
            return FineTuneJob.model_validate(body)
        except ValidationError as error:
            log.warning("cannot read FineTuneJob %s/%s: %s", namespace, name, error)
            return None

    def _hash(self, deployment: ModelDeployment, served: ServedModel) -> str:
        manifest = build_ray_service(deployment, served, self.settings)
        return str(manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION])

    def _apply(
        self, deployment: ModelDeployment, served: ServedModel, service: ObservedService | None
    ) -> ObservedService | None:
        """Create the RayService, or update it when what it should be changed; the service after, if written."""
        manifest = build_ray_service(deployment, served, self.settings)
        wanted = manifest["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]
        if service is not None and service.applied_hash == wanted:
            return None
        missing = self.kuberay.missing() if self.settings.kuberay_auth_options else None
        if missing is not None:
            raise AuthUnavailableError(auth_unavailable_message(missing))
        ref = ObjectRef("ray.io/v1", "RayService", manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        if service is None:
            self._ensure_network_policy(deployment)
            created = self.kube.create(manifest)
            if created is not None:
                return observe_service(created)
            existing = self.kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
            if existing is not None and controller_uid(existing) != deployment.metadata.get("uid"):
                raise NameTakenError(f"RayService {ref.name} exists and does not belong to this ModelDeployment")
        # The hash under its former key goes: only the current key says what was applied.
        annotations = {**manifest["metadata"]["annotations"], FORMER_APPLIED_HASH_ANNOTATION: None}
        patch = {"metadata": {"annotations": annotations}, "spec": manifest["spec"]}
        return observe_service(self.kube.patch(ref, patch))

    def _ensure_network_policy(self, deployment: ModelDeployment) -> None:
        """Close the endpoint's Ray cluster before it starts, and keep it closed: on every pass while the
        cluster runs, the policy is made again if deleted and restored if edited or built otherwise now."""
        policy = build_network_policy(deployment, self.settings)
        taken = apply_owned(self.kube, policy, deployment.metadata.get("uid"), KIND)
        if taken is not None:
            raise NameTakenError(taken)

    def _write(
        self,
        body: Manifest,
        previous: ModelDeploymentStatus,
        problem: Problem,
        generation: int,
        service: ObservedService | None,
        now: datetime,
        needs: set[Dependency],
    ) -> Outcome:
        """Status for a deployment whose spec cannot be served now; what is served stays."""
        rollout = Rollout(previous.serving, previous.previous, previous.rejected, previous.rollout_start_time)
        status = compute_status(
            rollout, service, generation=generation, previous=previous, now=now, endpoint=previous.endpoint,
            problem=problem,
        )  # fmt: skip
        changed = (body.get("status") or {}).get("conditions") != status.to_wire().get("conditions")
        version = patch_status(self.kube, _ref(body), body, status.to_wire())
        if changed:
            post_events(self.kube, body, [Event("Warning", problem.reason, problem.message)], now, log)
        return Outcome(version, self.settings.recheck_seconds, depends_on=frozenset(needs))


def _dependencies(deployment: ModelDeployment) -> set[Dependency]:
    """The objects whose changes this deployment must see: the FineTuneJob it follows.

    (Its Secrets are not watched: the operator holds no grant on Secrets, and a missing one
    shows on the endpoint's pods as PodConfigError.)
    """
    spec = deployment.spec
    needs: set[Dependency] = set()
    if spec.model.from_fine_tune_job is not None:
        needs.add((JOB_KIND, spec.model.from_fine_tune_job.name))
    return needs


def _ref(body: Manifest) -> ObjectRef:
    return ObjectRef(API_VERSION, KIND, body["metadata"]["namespace"], body["metadata"]["name"])
