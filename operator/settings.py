"""Operator-wide settings: defaults of the objects it builds, and how its controllers work."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from importlib.metadata import version

RAY_VERSION = "2.60.0"
ENV_PREFIX = "KUBETUNE_"


class SettingsError(ValueError):
    """An environment variable holds a value the setting cannot take; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Every field can be set from the environment as KUBETUNE_<FIELD NAME IN CAPITALS>."""

    # What the builders use when a spec leaves it open.
    runtime_image: str = f"kubetune/runtime:{version('kubetune')}"
    ray_version: str = RAY_VERSION
    finished_cluster_ttl_seconds: int = 300
    pvc_mount_root: str = "/mnt/pvc"
    config_mount_path: str = "/etc/kubetune/run"
    # How the operator works.
    metrics_port: int = 8080  # Prometheus /metrics; 0 serves none
    workers: int = 16  # reconciles running at once, over all objects (one at a time per object)
    backoff_base_seconds: float = 0.2  # first retry of a failed reconcile; doubles with each failure
    backoff_max_seconds: float = 300.0
    # Events for an object that is being (or was just) reconciled wait until they have stopped for this long,
    # but no longer than coalesce_max_seconds: a burst of changes makes two passes, not one per change.
    coalesce_seconds: float = 0.5
    coalesce_max_seconds: float = 5.0
    # An object that waits (an active run, a missing Secret) is looked at again this often without any event.
    # A safety net only: watches deliver the changes.
    recheck_seconds: float = 300.0
    # What specs may ask for, comma-separated; empty allows anything. Images are glob patterns
    # (e.g. "registry.example.com/kubetune/*"); priority classes are names.
    allowed_images: str = ""
    allowed_priority_classes: str = ""

    @property
    def allowed_image_patterns(self) -> tuple[str, ...]:
        return _items(self.allowed_images)

    @property
    def allowed_priority_class_names(self) -> tuple[str, ...]:
        return _items(self.allowed_priority_classes)

    @classmethod
    def from_environment(cls, environment: Mapping[str, str] | None = None) -> Settings:
        environment = os.environ if environment is None else environment
        values: dict[str, object] = {}
        for item in fields(cls):
            variable = ENV_PREFIX + item.name.upper()
            raw = environment.get(variable)
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, item.name))
            try:
                value = kind(raw)
            except ValueError:
                raise SettingsError(f"{variable}={raw!r}: expected {kind.__name__}") from None
            if isinstance(value, (int, float)) and (value <= 0 if item.name == "workers" else value < 0):
                raise SettingsError(f"{variable}={raw!r}: must be {'positive' if item.name == 'workers' else '>= 0'}")
            values[item.name] = value
        return cls(**values)  # type: ignore[arg-type]


def _items(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())
