"""Reconcilers: one per kind, each a pass that reads, builds, applies and writes status."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from kubetune.operator.api.common import API_VERSION, Condition
from kubetune.operator.conditions import ConditionType, Reason, condition, merge_conditions
from kubetune.operator.core.controller import Key, Outcome, PassFailedError
from kubetune.operator.kube import ApiError, Kube, ObjectRef
from kubetune.operator.model.events import Event
from kubetune.operator.naming import controller_uid
from pydantic import BaseModel, ValidationError

Manifest = dict[str, Any]
S = TypeVar("S", bound=BaseModel)
LOG = logging.getLogger("kubetune.reconcile")


def ending_when_deleted(kube: Kube, kind: str, reconcile: Callable[[Key], Outcome]) -> Callable[[Key], Outcome]:
    """`reconcile`, ending quietly when its object is deleted during the pass (with its namespace, say).

    A write during such a pass answers 404; that is the end of the key, not a failure to retry.
    A 404 while the object still exists (a kind that is not installed) stays an error.
    """

    def guarded(key: Key) -> Outcome:
        try:
            return reconcile(key)
        except ApiError as error:
            if error.not_found and kube.get(API_VERSION, kind, *key) is None:
                return Outcome(gone=True)
            raise

    return guarded


def status_patch(previous: Manifest, current: Manifest) -> Manifest:
    """A merge patch that turns `previous` into `current`: removed keys become null, at any depth.

    A merge patch merges objects key by key, so a key that an object inside no longer has
    (a field of a recorded spec, say) must be nulled there too, or the old value stays.
    """
    patch: Manifest = {}
    for key in {*previous, *current}:
        before, after = previous.get(key), current.get(key)
        if before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            patch[key] = status_patch(before, after)
        else:
            patch[key] = after
    return patch


def apply_owned(kube: Kube, manifest: Manifest, owner_uid: str | None, owner_kind: str) -> str | None:
    """Create the object, or bring the owner's existing one back to `manifest`: its spec exactly, and its
    labels (others' labels stay). A patch is sent only when something differs, so a pass that finds the
    object as it should be writes nothing. None when done; why not when the name is taken by an object
    that the owner does not control (nothing is written to it)."""
    ref = ObjectRef.of(manifest)
    existing = kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
    if existing is None:
        if kube.create(manifest) is not None:
            return None
        existing = kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)  # made meanwhile
        if existing is None:
            return None  # and deleted again: the next pass makes it
    if controller_uid(existing) != owner_uid:
        return f"{ref.kind} {ref.name} exists and does not belong to this {owner_kind}"
    labels = (existing["metadata"].get("labels") or {}).items()
    patch: Manifest = {}
    missing_labels = dict(set(manifest["metadata"].get("labels", {}).items()) - set(labels))
    if missing_labels:
        patch["metadata"] = {"labels": missing_labels}
    spec = status_patch(existing.get("spec") or {}, manifest.get("spec") or {})
    if spec:
        patch["spec"] = spec
    if patch:
        LOG.info("restoring %s %s/%s to what it should be", ref.kind, ref.namespace, ref.name)
        kube.patch(ref, patch)
    return None


def patch_status(kube: Kube, ref: ObjectRef, body: Manifest, status: Manifest) -> str | None:
    """Write `status` onto `body` as read; the version written, or None when nothing changed."""
    patch = status_patch(body.get("status") or {}, status)
    if not patch:
        return None
    written = kube.patch_status(ref, patch, resource_version=body["metadata"].get("resourceVersion"))
    version: str | None = written.get("metadata", {}).get("resourceVersion")
    return version


def previous_status(body: Manifest, model: type[S], log: logging.Logger) -> S:
    """The status as last written; one this version cannot read starts afresh rather than wedging the object."""
    try:
        return model.model_validate(body.get("status") or {})
    except ValidationError as error:
        log.warning("ignoring the unreadable status of %s: %s", body["metadata"]["name"], error)
        return model()


def post_events(kube: Kube, body: Manifest, events: list[Event], now: datetime, log: logging.Logger) -> None:
    """Record `events` on `body`, and log each as a JSON line."""
    for event in events:
        try:
            kube.event(body, event.type, event.reason.value, event.message, now)
        except ApiError as error:  # an event is worth less than the reconcile that records it
            log.warning("could not record event %s: %s", event.reason, error)
        record = {"object": body["metadata"]["name"], "reason": event.reason.value, "message": event.message}
        log.info(json.dumps(record))


def record_failure(kube: Kube, ref: ObjectRef, error: Exception, now: datetime, log: logging.Logger) -> str | None:
    """Show on the object that its pass failed and is retried (Degraded, ReconcileFailed), keeping the rest.

    Best effort: the failure is retried with backoff whether this write works or not. Conflicts,
    throttling and a deleted object or namespace are part of normal work, not failures to show.
    Returns the status version written, if any.
    """
    if isinstance(error, ApiError) and (
        error.conflict or error.throttled or error.not_found or error.namespace_terminating
    ):
        return None
    try:
        body = kube.get(ref.api_version, ref.kind, ref.namespace, ref.name)
        if body is None:
            return None
        status = dict(body.get("status") or {})
        generation = body["metadata"].get("generation")
        message = f"retrying after an error: {type(error).__name__}: {error}"
        failed = condition(ConditionType.DEGRADED, True, Reason.RECONCILE_FAILED, message, generation)
        try:
            previous = [Condition.model_validate(item) for item in status.get("conditions") or []]
        except ValidationError:
            previous = []
        kept = [c for c in previous if c.type != ConditionType.DEGRADED]
        merged = merge_conditions(previous, [failed], now)
        status["conditions"] = [c.to_wire() for c in [*kept, *merged]]
        return patch_status(kube, ref, body, status)
    except Exception as write_error:  # the original error is what gets retried and logged
        log.warning("could not record the failure on %s %s/%s: %s", ref.kind, ref.namespace, ref.name, write_error)
        return None


def recording_failures(
    kube: Kube, kind: str, reconcile: Callable[[Key], Outcome], clock: Callable[[], datetime], log: logging.Logger
) -> Callable[[Key], Outcome]:
    """`reconcile`, writing any failure onto its object's status (see record_failure) before it is retried."""

    def recorded(key: Key) -> Outcome:
        try:
            return reconcile(key)
        except Exception as error:
            version = record_failure(kube, ObjectRef(API_VERSION, kind, *key), error, clock(), log)
            raise PassFailedError(error, version) from error

    return recorded


def reconciling(
    kube: Kube, kind: str, reconcile: Callable[[Key], Outcome], clock: Callable[[], datetime]
) -> Callable[[Key], Outcome]:
    """A kind's pass as the controller runs it: ended quietly when its object is gone, any other
    failure written onto the object's status before it is retried."""
    return recording_failures(kube, kind, ending_when_deleted(kube, kind, reconcile), clock, LOG)
