"""kubetune's container images, assembled from local root filesystems (no Docker, no registry).

    from tests.controlplane.images import build_images

    images = build_images(("pause", "operator", "runtime", "runtime-minilm"))
    images["runtime"].name     # localhost/kubetune-runtime:0.1.0-gpu-<12 hex digits>
    images["runtime"].archive  # OCI archive: ctr -n k8s.io images import <archive>

From a shell: `python tests/controlplane/images build [NAME ...]` prints one JSON object.
"""

from .build import IMAGE_NAMES, BuiltImage, ImagesUnavailableError, build_images, cache_root
from .rootfs import BuildStepError

__all__ = ["IMAGE_NAMES", "BuildStepError", "BuiltImage", "ImagesUnavailableError", "build_images", "cache_root"]
