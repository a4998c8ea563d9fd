"""Why a Ray pod cannot run, read from its status: what runs (FineTuneJob) and endpoints (ModelDeployment) wait for.

Pure: a pod's body in, a typed reason out. Both kinds watch their pods (selected by
kubetune's labels) and show the first pod that cannot run, and why, in their status.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.operator.api.finetunejob import WaitReason
from kubetune.operator.naming import RUN_LABEL


@dataclass(frozen=True)
class PodWait:
    """Why a pod cannot run: its run or endpoint waits for it."""

    reason: WaitReason
    message: str


_IMAGE_PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
_CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError")


def pod_wait(pod: Mapping[str, Any]) -> PodWait | None:
    """Why the pod cannot run, from its conditions and container states; None when nothing holds it up."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    for item in status.get("conditions") or []:
        unschedulable = (item.get("type"), item.get("status"), item.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        )
        if unschedulable:
            return PodWait(WaitReason.UNSCHEDULABLE, f"pod {name} cannot be scheduled: {item.get('message') or ''}")
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        detail = f"pod {name} container {container.get('name')}: {reason}: {waiting.get('message') or ''}"
        if reason in _IMAGE_PULL_FAILURES:
            return PodWait(WaitReason.IMAGE_PULL_FAILED, detail)
        if reason in _CONFIG_FAILURES:
            return PodWait(WaitReason.POD_CONFIG_ERROR, detail)
    return None


@dataclass(frozen=True)
class PodState:
    """A pod as the caches keep it: its name, and why it cannot run (None: it can, or it already does)."""

    name: str
    wait: PodWait | None


def first_wait(pods: Iterable[PodState]) -> PodWait | None:
    """What holds up the first pod (by name) that cannot run; None when none waits."""
    return next((pod.wait for pod in sorted(pods, key=lambda pod: pod.name) if pod.wait is not None), None)


@dataclass(frozen=True)
class RunPod(PodState):
    """A pod of a run: which run, its name, and why it cannot run (None: it can, or it already does)."""

    number: int


def observe_run_pod(pod: Mapping[str, Any]) -> RunPod | None:
    """A run's pod and what holds it up; None for a pod without kubetune's run label."""
    try:
        number = int((pod["metadata"].get("labels") or {})[RUN_LABEL])
    except (KeyError, ValueError):
        return None
    return RunPod(pod["metadata"]["name"], pod_wait(pod), number)


def observe_endpoint_pod(pod: Mapping[str, Any]) -> PodState:
    """An endpoint's pod (of any of its Ray clusters) and what holds it up."""
    return PodState(pod["metadata"]["name"], pod_wait(pod))
