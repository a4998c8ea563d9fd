"""Reconcilers: one per kind, each a pass that reads, builds, applies and writes status."""

from __future__ import annotations

from collections.abc import Callable

from kubetune.operator.api.common import API_VERSION
from kubetune.operator.core.controller import Key, Outcome
from kubetune.operator.kube import ApiError, Kube


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
