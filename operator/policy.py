"""What the operator's settings allow a spec to ask for. Pure.

Creating a FineTuneJob or a ModelDeployment runs pods, so a cluster administrator may limit what
those pods can be: the images they run, the priority classes they take, the node taints they
tolerate, the node labels they select, and whose model code they run (model.trustRemoteCode).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from kubetune.operator.api.common import NodePlacement, Placement, Toleration
from kubetune.operator.api.finetunejob import FineTuneJobSpec
from kubetune.operator.api.modeldeployment import ModelDeploymentSpec
from kubetune.operator.builders.pods import GPU_TOLERATION
from kubetune.operator.settings import Settings

ANY = "*"


@dataclass(frozen=True)
class Violation:
    """A field of the spec (e.g. spec.resources.tolerations[0]) whose value the settings do not allow."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def finetunejob_violations(spec: FineTuneJobSpec, settings: Settings) -> list[Violation]:
    """Every part of a FineTuneJob's spec that the operator's settings do not allow."""
    found = placement_violations(spec.resources, "spec.resources", settings)
    found += node_placement_violations(spec.resources.head, "spec.resources.head", settings)
    patterns = settings.allowed_remote_code_model_patterns
    model = spec.model
    if model.trust_remote_code and not any(fnmatchcase(model.uri, pattern) for pattern in patterns):
        allowed = f"allowed models: {', '.join(patterns)}" if patterns else "no model's code may run here"
        found.append(Violation("spec.model.trustRemoteCode", f"the code of {model.uri!r} may not run here ({allowed})"))
    return found


def modeldeployment_violations(spec: ModelDeploymentSpec, settings: Settings) -> list[Violation]:
    """Every part of a ModelDeployment's spec that the operator's settings do not allow."""
    found = placement_violations(spec.resources, "spec.resources", settings)
    return found + node_placement_violations(spec.resources.head, "spec.resources.head", settings)


def placement_violation(placement: Placement, field: str, settings: Settings) -> str | None:
    """Why `placement` (at `field`, e.g. spec.resources) is outside what the settings allow; None when it is not."""
    found = placement_violations(placement, field, settings)
    return str(found[0]) if found else None


def placement_violations(placement: Placement, field: str, settings: Settings) -> list[Violation]:
    """The image, priority class and node placement of `placement` (at `field`) that the settings do not allow."""
    found: list[Violation] = []
    images, classes = settings.allowed_image_patterns, settings.allowed_priority_class_names
    if placement.image is not None and images and not any(fnmatchcase(placement.image, p) for p in images):
        message = f"{placement.image!r} is not allowed here (allowed: {', '.join(images)})"
        found.append(Violation(f"{field}.image", message))
    priority = placement.priority_class_name
    if priority is not None and classes and priority not in classes:
        message = f"{priority!r} is not allowed here (allowed: {', '.join(classes)})"
        found.append(Violation(f"{field}.priorityClassName", message))
    return found + node_placement_violations(placement, field, settings)


def node_placement_violations(nodes: NodePlacement, field: str, settings: Settings) -> list[Violation]:
    """Tolerations, node selector and node affinity of `nodes` (at `field`) that the settings do not allow."""
    found: list[Violation] = []
    tolerations = settings.allowed_toleration_patterns
    for index, toleration in enumerate(nodes.tolerations or []):
        if not toleration_allowed(toleration, tolerations):
            allowed = f"allowed: {', '.join(tolerations)}" if tolerations else "this operator allows no tolerations"
            message = f"tolerating {_taint(toleration)} is not allowed here ({allowed})"
            found.append(Violation(f"{field}.tolerations[{index}]", message))
    labels = settings.allowed_node_selector_patterns
    if not labels:
        return found
    allowed = f"allowed: {', '.join(labels)}"
    for key, value in (nodes.node_selector or {}).items():
        if not label_allowed(key, value, labels):
            found.append(Violation(f"{field}.nodeSelector", f"{key}={value} is not allowed here ({allowed})"))
    for requirement in nodes.affinity.node_requirements() if nodes.affinity else []:
        # With In, each value is a label the pods may take; any other operator reads the label whatever its value.
        values = requirement.values if requirement.operator == "In" else [None]
        refused = [value for value in values or [None] if not label_allowed(requirement.key, value, labels)]
        if refused:
            shown = requirement.key if refused == [None] else ", ".join(f"{requirement.key}={v}" for v in refused)
            message = f"node affinity on {shown} is not allowed here ({allowed})"
            found.append(Violation(f"{field}.affinity.nodeAffinity", message))
    return found


def toleration_allowed(toleration: Toleration, patterns: tuple[str, ...]) -> bool:
    """Whether one of `patterns` (KEY or KEY:EFFECT, KEY a glob; "*" any) allows `toleration`.

    A toleration without a key tolerates every taint: only "*" allows it. One without an effect
    tolerates every effect of its key: only a pattern without an effect allows it. The GPU toleration
    the operator gives GPU pods itself is always allowed.
    """
    if toleration.to_wire() == GPU_TOLERATION:
        return True
    for pattern in patterns:
        key, _, effect = pattern.partition(":")
        if pattern == ANY or (
            toleration.key and fnmatchcase(toleration.key, key) and (not effect or effect == toleration.effect)
        ):
            return True
    return False


def label_allowed(key: str, value: str | None, patterns: tuple[str, ...]) -> bool:
    """Whether one of `patterns` (KEY or KEY=VALUE, globs) allows selecting nodes by `key` (=`value`).

    `value` None asks for the key with any value: only a pattern without a value (or value "*") allows it.
    """
    for pattern in patterns:
        key_pattern, has_value, value_pattern = pattern.partition("=")
        if not fnmatchcase(key, key_pattern):
            continue
        if not has_value or value_pattern == ANY or (value is not None and fnmatchcase(value, value_pattern)):
            return True
    return False


def _taint(toleration: Toleration) -> str:
    if not toleration.key:
        return "every taint"
    return f"{toleration.key}:{toleration.effect}" if toleration.effect else f"{toleration.key} (every effect)"
