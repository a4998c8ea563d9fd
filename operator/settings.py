"""Operator-wide settings that shape the objects it builds (from the environment)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib.metadata import version

RAY_VERSION = "2.60.0"


@dataclass(frozen=True)
class Settings:
    """Defaults the builders use when a spec leaves them open."""

    runtime_image: str = f"kubetune/runtime:{version('kubetune')}"
    ray_version: str = RAY_VERSION
    finished_cluster_ttl_seconds: int = 300
    pvc_mount_root: str = "/mnt/pvc"
    config_mount_path: str = "/etc/kubetune/run"

    @classmethod
    def from_environment(cls) -> Settings:
        defaults = cls()
        return cls(
            runtime_image=os.environ.get("KUBETUNE_RUNTIME_IMAGE", defaults.runtime_image),
            finished_cluster_ttl_seconds=int(
                os.environ.get("KUBETUNE_FINISHED_CLUSTER_TTL_SECONDS", defaults.finished_cluster_ttl_seconds)
            ),
        )
