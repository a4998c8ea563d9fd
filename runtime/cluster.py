"""Connect to the Ray cluster of a RayJob, or start a local one for a run on this machine."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import ray

# Ray enables token authentication by default and writes a token under the home folder;
# a local, loopback-only cluster started for one run needs none.
LOCAL_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled"}


@contextmanager
def ray_cluster(num_cpus: int | None = None) -> Iterator[None]:
    """Use an initialised Ray as is; join RAY_ADDRESS (inside a RayJob); else start Ray here and stop it after."""
    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        for name, value in LOCAL_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
