"""What the images are made from: the kubetune wheel (as the Dockerfiles' wheel stage builds it),
the requirements its metadata pins, and the lock files the images install from."""

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
from dataclasses import dataclass
from pathlib import Path

from . import oci
from .config import REPO_ROOT
from .rootfs import BuildStepError

# The lock files (made by scripts/lock) that the Dockerfiles' wheel stages put into /dist.
LOCK_FOLDER = "requirements"
LOCKS = ("operator.txt", "runtime-gpu.txt", "runtime-cpu.txt")


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
        # The wheel stage copies the lock files the final stages install from.
        for lock in LOCKS:
            shutil.copy2(source / LOCK_FOLDER / lock, dist / lock)
        return dist

    @functools.cached_property
    def wheel(self) -> Path:
        (wheel,) = self.dist.glob("kubetune-*.whl")
        return wheel

    def lock(self, name: str) -> Path:
        """A lock file (requirements/<name>) as the wheel stage leaves it in /dist."""
        if name not in LOCKS:
            raise ValueError(f"unknown lock file {name}; known: {', '.join(LOCKS)}")
        return self.dist / name


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


@dataclass(frozen=True)
class Locked:
    """One distribution of a lock file: its exact version and the sha256 hashes pip accepts."""

    version: str
    hashes: tuple[str, ...]


_LOCKED_LINE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)(?P<rest>(?:[^\n]*\\\n)*[^\n]*)", re.M
)


def locked(path: Path) -> dict[str, Locked]:
    """The distributions a lock file (scripts/lock's output) pins, by canonical name."""
    found: dict[str, Locked] = {}
    for match in _LOCKED_LINE.finditer(path.read_text(encoding="utf-8")):
        name = re.sub(r"[-_.]+", "-", match["name"]).lower()
        if name in found:
            raise ValueError(f"{path}: {name} is locked twice")
        found[name] = Locked(match["version"], tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})\b", match["rest"])))
    return found
