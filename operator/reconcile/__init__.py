"""Reconcilers: one per kind, each a pass that reads, builds, applies and writes status."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.core.controller import Key, Outcome
from kubetune.operator.kube import ApiError, Kube, ObjectRef
from kubetune.operator.planning.finetunejob import Event
from pydantic import BaseModel, ValidationError

Manifest = dict[str, Any]
S = TypeVar("S", bound=BaseModel)


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
    """A merge patch that turns `previous` into `current` (removed keys become null)."""
    return {key: current.get(key) for key in {*previous, *current} if previous.get(key) != current.get(key)}


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
