"""Build steps inside a root filesystem: debootstrap, and commands in a chroot over stacked layers.

Every step runs in a private mount and PID namespace (`unshare --mount --pid --fork --kill-child`):
the overlay of the lower layers with the step's upper directory, /proc, /dev, a tmpfs /tmp and the
bind mounts exist only there, so they all vanish when the step ends, also when it fails or is
killed, and no process of the step outlives it. Bind mounts go below the tmpfs /tmp, so they leave
no trace in the layer; /etc/resolv.conf, copied in for steps that use the network, is removed from
the upper directory afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .oci import EPOCH

Log = Callable[[str], None]
# No redirect_dir or metacopy (their extended attributes would not survive a layer tar) and no
# index: each upper directory must be a plain description of its step's changes.
OVERLAY_OPTIONS = "index=off,metacopy=off,redirect_dir=off"
_OUTPUT_TAIL_LINES = 60


class BuildStepError(RuntimeError):
    """A build step exited non-zero; the message holds the end of its output."""


@dataclass(frozen=True)
class Bind:
    """A host directory mounted at `target` (below /tmp) inside the root during a step."""

    source: Path
    target: str
    writable: bool = False


def _run_logged(command: Sequence[str], log_file: Path, what: str, timeout: float) -> None:
    with open(log_file, "ab") as output:
        output.write(f"$ {shlex.join(command)}\n".encode())
        output.flush()
        result = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if result.returncode != 0:
        lines = log_file.read_text(errors="replace").splitlines()[-_OUTPUT_TAIL_LINES:]
        raise BuildStepError(f"{what} exited {result.returncode}; the end of its output:\n" + "\n".join(lines))


def _private_namespace(script: str) -> list[str]:
    # setpriv: the step dies with the builder (and the namespace with the step), even if it is killed.
    return [
        "setpriv", "--pdeathsig", "KILL",
        "unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "bash", "-c", script,
    ]  # fmt: skip


def debootstrap(
    target: Path, suite: str, mirror: str, packages: Sequence[str], log_file: Path, timeout: float = 1800
) -> None:
    """A minimal Debian (`--variant=minbase`) plus `packages` in `target`."""
    command = [
        "debootstrap", "--variant=minbase", f"--include={','.join(packages)}", "--components=main",
        suite, str(target), mirror,
    ]  # fmt: skip
    script = f"set -eu; exec {shlex.join(command)}"
    _run_logged(_private_namespace(script), log_file, f"debootstrap {suite}", timeout)


def run_in_root(
    lowers: Sequence[Path],
    upper: Path,
    command: Sequence[str],
    *,
    environment: Mapping[str, str],
    log_file: Path,
    user: str = "0:0",
    cwd: str = "/",
    binds: Sequence[Bind] = (),
    network: bool = False,
    timeout: float = 3600,
) -> None:
    """Run `command` chrooted into `lowers` (top first) overlaid with `upper`, which collects its changes.

    Without lowers, `upper` itself is the root. The command gets exactly `environment`, runs as
    `user` ("uid:gid") in `cwd`, with `binds` mounted and, if `network`, the host's DNS settings.
    """
    for path in [*lowers, upper]:
        if "," in str(path) or ":" in str(path):
            raise ValueError(f"overlayfs cannot stack {path}: a ':' or ',' in the path")
    work, root = upper.parent / f"{upper.name}.work", upper.parent / f"{upper.name}.root"
    work.mkdir(exist_ok=True)
    root.mkdir(exist_ok=True)
    q = shlex.quote
    if lowers:
        lowerdir = ":".join(str(path) for path in lowers)
        options = f"lowerdir={lowerdir},upperdir={upper},workdir={work},{OVERLAY_OPTIONS}"
        lines = [f"mount -t overlay overlay -o {q(options)} {q(str(root))}"]
    else:
        lines = [f"mount --bind {q(str(upper))} {q(str(root))}"]
    lines += [
        f"mount -t proc proc {q(f'{root}/proc')}",
        f"mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {q(f'{root}/sys')}",
        f"mount --rbind /dev {q(f'{root}/dev')}",
        f"mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs {q(f'{root}/tmp')}",
    ]
    for bind in binds:
        if not bind.target.startswith("/tmp/"):
            raise ValueError(f"bind mount target {bind.target} must be below /tmp, which leaves no trace")
        target = q(f"{root}{bind.target}")
        lines += [f"mkdir -p {target}", f"mount --bind {q(str(bind.source))} {target}"]
        if not bind.writable:
            lines.append(f"mount -o remount,bind,ro {target}")
    created_resolv_conf = network and not (upper / "etc" / "resolv.conf").exists()
    etc_in_upper = (upper / "etc").exists()
    if network:
        lines.append(f"cp -L /etc/resolv.conf {q(f'{root}/etc/resolv.conf')}")
    variables = [f"{key}={value}" for key, value in environment.items()]
    chrooted = ["chroot", f"--userspec={user}", str(root), "/usr/bin/env", "-i", "-C", cwd, *variables, *command]
    lines.append(shlex.join(chrooted))
    try:
        _run_logged(_private_namespace("set -eu\n" + "\n".join(lines)), log_file, shlex.join(command)[:200], timeout)
    finally:
        if created_resolv_conf:
            (upper / "etc" / "resolv.conf").unlink(missing_ok=True)
            if not etc_in_upper:
                # /etc came up only for resolv.conf: if the step changed nothing else there, drop it.
                with contextlib.suppress(OSError):
                    (upper / "etc").rmdir()
        shutil.rmtree(work, ignore_errors=True)
        root.rmdir()


def normalize_mtimes(directory: Path) -> None:
    """Set every mtime below `directory` to EPOCH, the time the layer tar records.

    Python's byte code records its source's mtime; compiled after this, it stays valid in the image.
    """
    for parent, directories, files in os.walk(directory, topdown=False):
        for name in [*files, *directories]:
            os.utime(os.path.join(parent, name), (EPOCH, EPOCH), follow_symlinks=False)
    os.utime(directory, (EPOCH, EPOCH))


def chown_tree(directory: Path, uid: int, gid: int) -> None:
    """Give `directory` and everything below it (not following links) to uid:gid."""
    if not directory.exists():
        return
    os.lchown(directory, uid, gid)
    for parent, directories, files in os.walk(directory):
        for name in [*files, *directories]:
            os.lchown(os.path.join(parent, name), uid, gid)


def remove(directory: Path, patterns: Sequence[str]) -> None:
    """Delete what the glob `patterns` (relative to `directory`) match, if anything."""
    for pattern in patterns:
        for path in directory.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
