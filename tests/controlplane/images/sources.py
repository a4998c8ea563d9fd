"""What the images are made from: the kubetune wheel (as the Dockerfiles' wheel stage builds it)
and the requirements its metadata pins."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from . import oci
from .config import REPO_ROOT
from .rootfs import BuildStepError


class Sources:
    """What the images are made from, prepared at most once per build."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch

    @functools.cached_property
    def version(self) -> str:
        project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        return str(project["version"])

    @functools.cached_property
    def dist(self) -> Path:
        """What the Dockerfiles' wheel stage leaves in /dist: the wheel and torch-requirement.txt."""
        source, dist = self.scratch / "source", self.scratch / "dist"
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT, capture_output=True, check=True,
        )  # fmt: skip
        for name in listed.stdout.decode().split("\0"):
            if name and (REPO_ROOT / name).is_file():
                (source / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO_ROOT / name, source / name)
        # Zip entries dated SOURCE_DATE_EPOCH: the same sources give the same wheel bytes.
        environment = {**os.environ, "SOURCE_DATE_EPOCH": str(oci.EPOCH)}
        isolation = ["--no-build-isolation"] if _has_build_requirements() else []
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            *isolation,
            "--wheel-dir",
            str(dist),
            str(source),
        ]
        built = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
        if built.returncode != 0:
            raise BuildStepError(
                f"building the kubetune wheel exited {built.returncode}:\n{built.stdout}{built.stderr}"
            )
        (wheel,) = dist.glob("kubetune-*.whl")
        torch = next(line for line in requires(wheel, "runtime") if line.startswith("torch=="))
        (dist / "torch-requirement.txt").write_text(f"{torch}\n")
        return dist

    @functools.cached_property
    def wheel(self) -> Path:
        (wheel,) = self.dist.glob("kubetune-*.whl")
        return wheel

    def requirements(self, extra: str | None = None) -> list[str]:
        return requires(self.wheel, extra)


def _has_build_requirements() -> bool:
    """Whether this interpreter has pyproject's build requirements (`name>=version` each), so that the
    wheel can be built without an isolated build environment from the package index."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for requirement in pyproject["build-system"]["requires"]:
        name, _, minimum = requirement.partition(">=")
        try:
            installed = importlib.metadata.version(name.strip())
        except importlib.metadata.PackageNotFoundError:
            return False
        if _release(installed) < _release(minimum or "0"):
            return False
    return True


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def requires(wheel: Path, extra: str | None = None) -> list[str]:
    """The wheel's requirements without extras, plus those of `extra` (from its METADATA)."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(name).decode()
    wanted = {"", f'extra == "{extra}"'} if extra else {""}
    found = re.findall(r"^Requires-Dist: ([^;\n]+?)(?:\s*;\s*(.+))?$", metadata, re.M)
    return [requirement.strip() for requirement, marker in found if marker.strip() in wanted]
