"""What the operator assumes of the runtime image is what images/runtime/Dockerfile builds."""

from __future__ import annotations

from kubetune.operator import images
from kubetune.runtime.io.settings import DEFAULT_PVC_ROOT

from ..conftest import REPO_ROOT
from ..controlplane.images.dockerfile import parse

DOCKERFILE = REPO_ROOT / "images" / "runtime" / "Dockerfile"


def test_the_pods_run_as_the_images_user_and_group() -> None:
    final = parse(DOCKERFILE.read_text())[-1]
    assert final.user == f"{images.POD_USER_ID}:{images.POD_GROUP_ID}"


def test_the_cache_volume_covers_the_images_cache_folder() -> None:
    final = parse(DOCKERFILE.read_text())[-1]
    assert final.env["XDG_CACHE_HOME"] == images.CACHE_MOUNT_PATH
    assert final.env["HF_HOME"].startswith(images.CACHE_MOUNT_PATH + "/")
    assert images.CACHE_MOUNT_PATH in final.labels["io.kubetune.writable-paths"].split(",")


def test_the_images_ray_is_the_one_the_operator_names() -> None:
    assert parse(DOCKERFILE.read_text())[-1].args["RAY_VERSION"] == images.RAY_VERSION


def test_claims_are_mounted_where_the_runtime_looks_by_default() -> None:
    assert str(DEFAULT_PVC_ROOT) == images.PVC_ROOT
