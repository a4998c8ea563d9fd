"""What the operator's settings allow a spec to ask for: images and priority classes. Pure.

Creating a FineTuneJob or a ModelDeployment runs pods, so a cluster administrator may
limit what those pods can be: the images they run and the priority classes they take.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from kubetune.operator.api.common import Placement
from kubetune.operator.settings import Settings


def placement_violation(placement: Placement, field: str, settings: Settings) -> str | None:
    """Why `placement` (at `field`, e.g. spec.resources) is outside what the settings allow; None when it is not."""
    images, classes = settings.allowed_image_patterns, settings.allowed_priority_class_names
    if placement.image is not None and images and not any(fnmatchcase(placement.image, p) for p in images):
        return f"{field}.image: {placement.image!r} is not allowed here (allowed: {', '.join(images)})"
    priority = placement.priority_class_name
    if priority is not None and classes and priority not in classes:
        return f"{field}.priorityClassName: {priority!r} is not allowed here (allowed: {', '.join(classes)})"
    return None
