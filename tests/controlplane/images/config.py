"""Image configs: what each Dockerfile's base image declares, plus what the Dockerfile adds.

The base images cannot be pulled here, so their config is written down from their Dockerfiles:

- rayproject/ray:<version>-py311-<flavour>, from ray-project/ray `docker/base-deps/Dockerfile`:
  `ENV PATH "/home/ray/anaconda3/bin:$PATH:/usr/local/nvidia/bin"`,
  `ENV LD_LIBRARY_PATH "$LD_LIBRARY_PATH:/usr/local/nvidia/lib64"`, `ENV TZ=America/Los_Angeles`,
  `ENV LC_ALL=C.UTF-8`, `ENV LANG=C.UTF-8`, `useradd -ms /bin/bash -d /home/ray ray --uid 1000
  --gid 100`, `USER $RAY_UID`, `ENV HOME=/home/ray`, `WORKDIR /home/ray`, `SHELL ["/bin/bash",
  "-c"]` (which later RUNs use), Miniforge in $HOME/anaconda3, no CMD (Ubuntu's `CMD ["/bin/bash"]`
  stays); `docker/ray/Dockerfile` sets LC_ALL and LANG again and pip-installs Ray into it. Its
  `$PATH` is Ubuntu's default. The GPU images start from NVIDIA's CUDA images, whose own ENV
  (CUDA paths, NVIDIA_* settings for the container toolkit) is not reproduced here.
- python:3.11-slim, from docker-library/python `3.11/slim-bookworm/Dockerfile`:
  `ENV PATH /usr/local/bin:$PATH` (Debian's default PATH), `ENV LANG C.UTF-8`, `CMD ["python3"]`,
  running as root in `/`.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dockerfile
from .layers import BASE_PATH, RAY_UID, RAY_VENV
from .oci import CREATED

REPO_ROOT = Path(__file__).resolve().parents[3]
RUNTIME_DOCKERFILE = REPO_ROOT / "images" / "runtime" / "Dockerfile"
OPERATOR_DOCKERFILE = REPO_ROOT / "images" / "operator" / "Dockerfile"
# The flavour whose Python packages PyPI gives: its torch is a CUDA build (with nvidia-* wheels).
RUNTIME_FLAVOUR = "gpu"


@dataclass(frozen=True)
class BaseImage:
    """What a FROM image contributes to an image's config and to the RUNs of a Dockerfile on it."""

    env: Mapping[str, str]
    user: str = ""
    workdir: str = "/"
    cmd: Sequence[str] | None = None
    shell: Sequence[str] = dockerfile.DEFAULT_SHELL
    labels: Mapping[str, str] = field(default_factory=dict)


RAY_IMAGE = BaseImage(
    env={
        "PATH": f"{RAY_VENV}/bin:{BASE_PATH}:/usr/local/nvidia/bin",
        # Ray's value starts with an empty entry (the unset variable), which would mean the working
        # directory; left out.
        "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
        "TZ": "America/Los_Angeles",
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "HOME": "/home/ray",
    },
    user=str(RAY_UID),
    workdir="/home/ray",
    cmd=("/bin/bash",),
    shell=("/bin/bash", "-c"),
)


# Without GPG_KEY, PYTHON_VERSION and PYTHON_SHA256: they describe python.org's source build that
# python:3.11-slim compiles, and this stand-in has Debian's Python instead.
PYTHON_SLIM_IMAGE = BaseImage(env={"PATH": f"/usr/local/bin:{BASE_PATH}", "LANG": "C.UTF-8"}, cmd=("python3",))


def base_image(reference: str) -> BaseImage:
    """The stand-in for a Dockerfile's FROM image."""
    if reference.startswith("rayproject/ray:"):
        return RAY_IMAGE
    if reference.startswith("python:3.11-slim"):
        return PYTHON_SLIM_IMAGE
    raise ValueError(f"no stand-in for the base image {reference}")


def final_stage(path: Path, build_args: Mapping[str, str] | None = None) -> dockerfile.Stage:
    """The last stage of the Dockerfile at `path` (the image it builds)."""
    stages = dockerfile.parse(path.read_text(encoding="utf-8"), build_args, lambda reference: base_image(reference).env)
    return stages[-1]


def architecture() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def image_config(
    base: BaseImage, stage: dockerfile.Stage | None = None, extra_env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The OCI image config (without rootfs) of `stage` built on `base`, as Docker composes it.

    ENV replaces a variable in place or appends it; an ENTRYPOINT without CMD clears the base
    image's CMD; labels and exposed ports add to the base's.
    """
    env = dict(base.env)
    user, workdir, entrypoint, cmd = base.user, base.workdir, None, base.cmd
    labels = dict(base.labels)
    ports: list[str] = []
    if stage is not None:
        env.update(stage.env)
        user = stage.user or user
        workdir = stage.workdir or workdir
        labels.update(stage.labels)
        ports = list(stage.exposed_ports)
        if stage.entrypoint is not None:
            entrypoint, cmd = stage.entrypoint, stage.cmd
        elif stage.cmd is not None:
            cmd = stage.cmd
    env.update(extra_env or {})
    config: dict[str, Any] = {"Env": [f"{key}={value}" for key, value in env.items()], "WorkingDir": workdir}
    if user:
        config["User"] = user
    if entrypoint is not None:
        config["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        config["Cmd"] = list(cmd)
    if labels:
        config["Labels"] = labels
    if ports:
        config["ExposedPorts"] = {port: {} for port in ports}
    return {"architecture": architecture(), "os": "linux", "created": CREATED, "config": config}


def with_history(config: Mapping[str, Any], created_by: Sequence[str]) -> dict[str, Any]:
    """`config` with one history entry per layer."""
    return {**config, "history": [{"created": CREATED, "created_by": text} for text in created_by]}
