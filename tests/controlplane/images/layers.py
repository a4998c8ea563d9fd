"""The layers of kubetune's images, each a build step in a chroot over the layers below it.

A layer's key hashes everything that shapes it (its recipe's inputs, the builder's revision and its
parent's key), so a changed input rebuilds that layer and the ones above it, nothing below.

    debian          debootstrap --variant=minbase bookworm + python3, venv, CA certificates,
                    netbase, tzdata; security updates        (shared by the operator and runtime)
    ray-base        what the Ray image brings: user ray, bash login shell, wget, a venv at
                    /home/ray/anaconda3                       (runtime)
    python-slim     what python:3.11-slim brings: python and pip in /usr/local (operator)
    *-deps          pip install of the image's lock file, hash-checked (runtime: ~7 GB with CUDA torch)
    *-kubetune      the Dockerfile's own RUN steps (pip install of the kubetune wheel, ...), then
                    its last RUN, the build check, on a throwaway layer above
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import rootfs
from .dockerfile import Run
from .oci import EPOCH

# Bump when a recipe changes in a way its hashed inputs do not show.
BUILDER_REVISION = "1"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("KUBETUNE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("KUBETUNE_TEST_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
# python:3.11-slim installs ca-certificates, netbase and tzdata; python3-venv makes the environments.
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase", "tzdata")
# From the Ray image's package list (ray-project/ray docker/base-deps/Dockerfile) what a Ray pod
# uses: wget (KubeRay's probes; Debian's busybox wget crashes in containers), ps and friends.
# Not g++: Ray keeps it only on its CUDA images, and this image is not built on one (see below).
RAY_PACKAGES = ("wget", "procps")
# One pip for both environments, new enough to share the build machine's download cache (http-v2).
PIP_VERSION = "26.3"
RAY_UID, RAY_GID = 1000, 100
RAY_VENV = "/home/ray/anaconda3"
SLIM_PREFIX = "/usr/local"
SITE_PACKAGES = "lib/python3.11/site-packages"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Ubuntu's /etc/profile, which Ray's image has: unlike Debian's it does not reset PATH, so that
# KubeRay's `bash -lc 'ray start ...'` finds the Python environment the image's PATH names.
UBUNTU_PROFILE = """\
# /etc/profile: system-wide .profile file for the Bourne shell (sh(1))
# and Bourne compatible shells (bash(1), ksh(1), ash(1), ...).

if [ "${PS1-}" ]; then
  if [ "${BASH-}" ] && [ "$BASH" != "/bin/sh" ]; then
    if [ -f /etc/bash.bashrc ]; then
      . /etc/bash.bashrc
    fi
  else
    if [ "$(id -u)" -eq 0 ]; then
      PS1='# '
    else
      PS1='$ '
    fi
  fi
fi

if [ -d /etc/profile.d ]; then
  for i in /etc/profile.d/*.sh; do
    if [ -r $i ]; then
      . $i
    fi
  done
  unset i
fi
"""
_APT_CLEAN = (
    "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log"
    " /var/log/alternatives.log /var/cache/debconf/*-old /var/lib/dpkg/*-old"
)
# The build machine's way to the package index, passed to steps that use the network: proxies,
# another index, and the certificates it trusts (e.g. those of a TLS-inspecting proxy).
_PASSED_THROUGH = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "PIP_INDEX_URL")
_CA_BUNDLE_VARIABLES = ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
_SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
_CA_TARGET = "/tmp/build-ca"

# The environment of the builder's own chroot commands (not a Dockerfile's RUN).
BUILD_ENVIRONMENT = {
    "PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": "/tmp", "DEBIAN_FRONTEND": "noninteractive",
    "PYTHONDONTWRITEBYTECODE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
    "PIP_PROGRESS_BAR": "off", "PIP_ROOT_USER_ACTION": "ignore", "PIP_CACHE_DIR": "/tmp/pip-cache",
}  # fmt: skip


def _ca_bundle() -> Path | None:
    named = [Path(os.environ[name]) for name in _CA_BUNDLE_VARIABLES if os.environ.get(name)]
    return next((path for path in [*named, _SYSTEM_CA_BUNDLE] if path.is_file()), None)


@dataclass
class Step:
    """One layer being built: its upper directory over the (already built) layers below."""

    upper: Path
    lowers: list[Path]  # top first
    scratch: Path
    log_file: Path
    pip_cache: Path

    def run(
        self,
        command: Sequence[str],
        *,
        environment: Mapping[str, str] | None = None,
        user: str = "0:0",
        cwd: str = "/",
        binds: Sequence[rootfs.Bind] = (),
        network: bool = False,
        upper: Path | None = None,
    ) -> None:
        """Run `command` in the layer's root (or, with `upper`, in a throwaway layer above it)."""
        lowers = [self.upper, *self.lowers] if upper is not None else self.lowers
        environment = dict(BUILD_ENVIRONMENT if environment is None else environment)
        binds = list(binds)
        if network:
            environment |= {name: os.environ[name] for name in _PASSED_THROUGH if name in os.environ}
            bundle = _ca_bundle()
            if bundle is not None:
                certificates = self.scratch / "build-ca"
                certificates.mkdir(exist_ok=True)
                shutil.copyfile(bundle, certificates / "ca-certificates.crt")
                binds.append(rootfs.Bind(certificates, _CA_TARGET))
                environment["PIP_CERT"] = f"{_CA_TARGET}/ca-certificates.crt"
        rootfs.run_in_root(
            lowers, upper or self.upper, command, environment=environment, log_file=self.log_file,
            user=user, cwd=cwd, binds=binds, network=network,
        )  # fmt: skip

    def pip_install(self, python: str, *arguments: str, inputs: Path | None = None) -> None:
        """pip install (without byte code; `compile` adds it) with the build machine's download cache."""
        binds = [rootfs.Bind(self.pip_cache, "/tmp/pip-cache", writable=True)]
        if inputs is not None:
            binds.append(rootfs.Bind(inputs, "/tmp/inputs"))
        command = [python, "-m", "pip", "install", "--no-compile", *arguments]
        self.run(command, binds=binds, network=True)

    def compile(self, python: str, directory: str, user: str = "0:0") -> None:
        """Normalize mtimes, then byte-compile what this layer added to `directory` (a site-packages).

        pyc files record their source's mtime, so they are made after the mtimes are set to the
        value the layer tar records; otherwise a read-only image would recompile on every import.
        """
        rootfs.normalize_mtimes(self.upper)
        added = self.upper / directory.lstrip("/")
        targets = sorted(
            f"{directory}/{entry.name}"
            for entry in (added.iterdir() if added.is_dir() else [])
            if (entry.is_dir() and not entry.name.endswith((".dist-info", ".data"))) or entry.name.endswith(".py")
        )
        if targets:
            # compileall exits 1 when some file does not compile (e.g. a package's Python 2 test
            # data), which pip's own compile step ignores too.
            script = f'{python} -m compileall -qq -f -j 0 "$@" || [ $? -eq 1 ]'
            self.run(["bash", "-c", script, "compile", *targets], user=user)


@dataclass(frozen=True, eq=False)
class Layer:
    """A layer recipe: `build` fills a Step's upper directory; `inputs` are hashed into its key."""

    name: str
    parent: Layer | None
    inputs: tuple[str, ...]
    created_by: str
    build: Callable[[Step], None] = field(repr=False)

    @functools.cached_property
    def key(self) -> str:
        digest = hashlib.sha256()
        for part in (BUILDER_REVISION, self.name, self.parent.key if self.parent else "", *self.inputs):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]

    @property
    def directory_name(self) -> str:
        return f"{self.name}-{self.key}"

    def chain(self) -> list[Layer]:
        """This layer and the ones below it, oldest first."""
        return [*(self.parent.chain() if self.parent else []), self]


def debian() -> Layer:
    packages = ",".join(DEBIAN_PACKAGES)

    def build(step: Step) -> None:
        rootfs.debootstrap(step.upper, DEBIAN_SUITE, DEBIAN_MIRROR, DEBIAN_PACKAGES, step.log_file)
        sources = (
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE} main\\n"
            f"deb {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\\n"
            f"deb {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main\\n"
        )
        upgrade = (
            f"printf '{sources}' > /etc/apt/sources.list; apt-get update -qq; apt-get upgrade -y -qq; {_APT_CLEAN}"
        )
        step.run(["bash", "-euc", upgrade], network=True)
        # What debootstrap leaves that an image should not carry: the build host's name, device
        # nodes (the runtime mounts /dev), downloaded packages, package lists and logs.
        patterns = ["etc/hostname", "etc/resolv.conf", "dev/*", "var/cache/apt/archives/*.deb", "var/log/*.log"]
        rootfs.remove(step.upper, patterns)
        rootfs.normalize_mtimes(step.upper)
        step.run(
            ["bash", "-c", "python3 -m compileall -qq -f -j 0 /usr/lib/python3.11 /usr/lib/python3 || [ $? -eq 1 ]"]
        )

    inputs = (DEBIAN_SUITE, DEBIAN_MIRROR, DEBIAN_SECURITY_MIRROR, packages)
    return Layer("debian", None, inputs, f"debootstrap --variant=minbase --include={packages} {DEBIAN_SUITE}", build)


def ray_base(parent: Layer) -> Layer:
    """What rayproject/ray:<version>-py311-<flavour> brings besides Ray itself (which the runtime extra pins)."""
    venv_python = f"{RAY_VENV}/bin/python"

    def build(step: Step) -> None:
        (step.scratch / "profile").write_text(UBUNTU_PROFILE)
        script = f"""
            apt-get update -qq; apt-get install -y -qq --no-install-recommends {" ".join(RAY_PACKAGES)}; {_APT_CLEAN}
            useradd -ms /bin/bash -d /home/ray ray --uid {RAY_UID} --gid {RAY_GID}
            install -m 0644 /tmp/inputs/profile /etc/profile
            python3 -m venv {RAY_VENV}
            echo 'export PATH=$HOME/anaconda3/bin:$PATH' >> /home/ray/.bashrc
        """
        step.run(["bash", "-euxc", script], binds=[rootfs.Bind(step.scratch, "/tmp/inputs")], network=True)
        step.pip_install(venv_python, f"pip=={PIP_VERSION}")
        rootfs.chown_tree(step.upper / "home" / "ray", RAY_UID, RAY_GID)
        step.compile(venv_python, f"{RAY_VENV}/{SITE_PACKAGES}", user=f"{RAY_UID}:{RAY_GID}")

    inputs = (" ".join(RAY_PACKAGES), UBUNTU_PROFILE, PIP_VERSION, RAY_VENV, f"{RAY_UID}:{RAY_GID}")
    return Layer("ray-base", parent, inputs, f"user ray {RAY_UID}:{RAY_GID}, venv {RAY_VENV}", build)


def python_slim(parent: Layer) -> Layer:
    """What python:3.11-slim brings: python, python3, pip in /usr/local/bin (a venv at /usr/local)."""
    python = f"{SLIM_PREFIX}/bin/python"

    def build(step: Step) -> None:
        step.run(["python3", "-m", "venv", SLIM_PREFIX])
        step.pip_install(python, f"pip=={PIP_VERSION}")
        step.compile(python, f"{SLIM_PREFIX}/{SITE_PACKAGES}")

    return Layer("python-slim", parent, (SLIM_PREFIX, PIP_VERSION), f"python3 -m venv {SLIM_PREFIX}", build)


def dependencies(name: str, parent: Layer, python: str, lock: Path, owner: str | None) -> Layer:
    """pip install of a lock file, as the Dockerfile installs it: every distribution pinned and
    hash-checked, none resolved (`owner` "uid:gid" gets the files)."""
    prefix = str(Path(python).parent.parent)
    text = lock.read_text(encoding="utf-8")

    def build(step: Step) -> None:
        (step.scratch / lock.name).write_text(text, encoding="utf-8")
        # As root, so that pip can use the build machine's download cache; the files then go to
        # the image's user, as if pip had run as that user like the Dockerfile's RUN does.
        step.pip_install(python, "--require-hashes", "--no-deps", "-r", f"/tmp/inputs/{lock.name}", inputs=step.scratch)
        if owner is not None:
            uid, gid = (int(part) for part in owner.split(":"))
            rootfs.chown_tree(step.upper / prefix.lstrip("/"), uid, gid)
        step.compile(python, f"{prefix}/{SITE_PACKAGES}", user=owner or "0:0")

    created_by = f"pip install --require-hashes --no-deps -r {lock.name}"
    return Layer(name, parent, (python, owner or "", lock.name, text), created_by, build)


class RunCommand(NamedTuple):
    """How one RUN instruction runs: its argv (shell and text), environment, uid[:gid], directory, mounts."""

    argv: list[str]
    environment: dict[str, str]
    user: str
    cwd: str
    binds: list[rootfs.Bind]


@dataclass(frozen=True)
class DockerfileRuns:
    """A Dockerfile's RUN steps as they run on the base image the Layer stands in for."""

    runs: Sequence[Run]
    base_env: Mapping[str, str]
    base_user: str
    base_workdir: str
    shell: Sequence[str]
    dist: Path  # what the wheel stage's /dist holds

    def command(self, run: Run) -> RunCommand:
        # A RUN's environment: the ARGs in scope, overridden by the image's ENV (inherited, then own).
        environment = {**dict(run.args), **self.base_env, **dict(run.env)}
        binds = []
        for mount in run.mounts:
            if mount.from_stage != "wheel" or mount.source != "/dist":
                raise ValueError(f"RUN mount {mount}: only the wheel stage's /dist is supported")
            binds.append(rootfs.Bind(self.dist, mount.target))
        user = _numeric(run.user or self.base_user or "0:0")
        argv = [*(run.shell or self.shell), run.command]
        return RunCommand(argv, environment, user, run.workdir or self.base_workdir, binds)


def dockerfile_steps(
    name: str, parent: Layer | None, steps: DockerfileRuns, python: str, key_inputs: Sequence[str]
) -> Layer:
    """The Dockerfile's RUNs but the last in one layer; the last, its build check, on a throwaway layer."""
    *install, check = steps.runs
    prefix = str(Path(python).parent.parent)

    def build(step: Step) -> None:
        user = "0:0"
        for run in install:
            command = steps.command(run)
            step.run(command.argv, environment=command.environment, user=command.user, cwd=command.cwd,
                     binds=command.binds, network=True)  # fmt: skip
            user = command.user
        step.compile(python, f"{prefix}/{SITE_PACKAGES}", user=user)
        command = steps.command(check)
        throwaway = step.scratch / "check"
        throwaway.mkdir()
        try:
            step.run(command.argv, environment=command.environment, user=command.user, cwd=command.cwd,
                     binds=command.binds, upper=throwaway)  # fmt: skip
        finally:
            shutil.rmtree(throwaway)

    created_by = " && ".join(run.command for run in install)
    return Layer(name, parent, tuple(key_inputs), created_by, build)


def _numeric(user: str) -> str:
    """A USER as chroot's --userspec takes it; a uid alone runs with that user's primary group."""
    if not all(part.isdigit() for part in user.split(":")):
        raise ValueError(f"USER {user!r}: the builder needs a numeric uid[:gid]")
    return user


def files(
    name: str,
    parent: Layer | None,
    make_tree: Callable[[Path], Mapping[str, Path]],
    created_by: str,
    inputs: Sequence[str],
) -> Layer:
    """A layer of plain files, like a COPY: `make_tree(scratch)` maps paths in the image to files
    here (links followed), copied with root as owner, mode 0755 for directories and executables,
    0644 for other files."""

    def build(step: Step) -> None:
        for target, source in make_tree(step.scratch).items():
            destination = step.upper / target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)
            destination.chmod(0o755 if os.access(source, os.X_OK) else 0o644)
        for parent_dir, directories, _ in os.walk(step.upper):
            for directory in directories:
                os.chmod(os.path.join(parent_dir, directory), 0o755)
        os.chmod(step.upper, 0o755)
        rootfs.normalize_mtimes(step.upper)

    return Layer(name, parent, tuple(inputs), created_by, build)


def go_binary(module: Path, output: Path, log_file: Path) -> None:
    """A static binary of the Go module at `module` (CGO off, no VCS stamp, trimmed paths)."""
    environment = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": "-mod=readonly -buildvcs=false"}
    command = ["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", str(output), "."]
    with open(log_file, "ab") as log:
        result = subprocess.run(command, cwd=module, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise rootfs.BuildStepError(f"go build in {module} exited {result.returncode}:\n{log_file.read_text()[-4000:]}")
    os.utime(output, (EPOCH, EPOCH))
