"""What the runtime image bakes in, and where kubetune's pods mount things: constants, not settings.

The Ray pods the operator builds run `images/runtime/Dockerfile`'s image: its user and group, and the
cache folder its ENV points at, are fixed when the image is built, so a pod that set others would only
break (a unit test keeps these equal to the Dockerfile). The mount points are the operator's own choice;
the runtime is told them (KUBETUNE_PVC_ROOT, and the run config's path on its command line).
"""

from __future__ import annotations

# The Ray of the runtime extra (pyproject pins it; a unit test keeps the two equal): the runtime image of
# this release is built on it, so the image setting and this version always go together.
RAY_VERSION = "2.60.0"
RUNTIME_IMAGE_REPOSITORY = "ghcr.io/kubetune/kubetune-runtime"
# The user and group the image runs as (`USER 1000:100`, the Ray image's `ray`).
POD_USER_ID = 1000
POD_GROUP_ID = 100
# The image's XDG_CACHE_HOME: downloads and compiled kernels. The pods mount an emptyDir over it (the root
# filesystem is read-only) and keep HF_HOME beneath it.
CACHE_MOUNT_PATH = "/home/ray/.cache"
# pvc://<claim>/<path> is mounted at <PVC_ROOT>/<claim> in the pods; the runtime reads it as KUBETUNE_PVC_ROOT.
PVC_ROOT = "/mnt/pvc"
# Where the run config's ConfigMap is mounted in a run's pods.
CONFIG_MOUNT_PATH = "/etc/kubetune/run"
