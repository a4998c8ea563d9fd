"""Where the runtime finds mounted volumes and keeps downloads: the machine's side of a run.

Kept apart from the run contract: the same spec runs in a cluster (volumes under
/mnt/pvc, a cache on the pod's disk) and locally (anything the user points to).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PVC_ROOT_VARIABLE = "KUBETUNE_PVC_ROOT"
CACHE_DIR_VARIABLE = "KUBETUNE_CACHE_DIR"
FAULT_AT_STEP_VARIABLE = "KUBETUNE_FAULT_AT_STEP"
DEFAULT_PVC_ROOT = Path("/mnt/pvc")


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kubetune"


@dataclass(frozen=True)
class RuntimeSettings:
    """Machine-specific locations; `from_environment` reads them from KUBETUNE_* variables."""

    # pvc://<claim>/<path> resolves to <pvc_root>/<claim>/<path> (the RayJob mounts claims there).
    pvc_root: Path = DEFAULT_PVC_ROOT
    # s3:// models and data are downloaded here before use.
    cache_dir: Path = field(default_factory=_default_cache_dir)
    # Fault injection for resilience tests: the first worker raises once, after this optimizer step,
    # unless it resumed from a checkpoint. Never set in production.
    fault_at_step: int | None = None
    # Use an s3:// download already in the cache as is. Training workers set this: the driver has just
    # downloaded the same objects for this run, and workers need not hold S3 credentials to reuse them.
    reuse_downloads: bool = False

    @classmethod
    def from_environment(cls) -> RuntimeSettings:
        return cls(
            pvc_root=Path(os.environ.get(PVC_ROOT_VARIABLE, str(DEFAULT_PVC_ROOT))),
            cache_dir=Path(os.environ.get(CACHE_DIR_VARIABLE) or _default_cache_dir()),
            fault_at_step=int(os.environ[FAULT_AT_STEP_VARIABLE]) if os.environ.get(FAULT_AT_STEP_VARIABLE) else None,
        )
