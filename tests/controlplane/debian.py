"""Debian packages the test machinery needs (debootstrap, containerd, runc, CNI plugins, iptables, ...).

`ensure_packages` installs what is missing with apt-get when running as root, and otherwise raises
`MissingPackagesError` naming the packages and the command that would install them, so that a test
can turn it into a skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable

# apt-get waits this long for another apt or dpkg run to release its lock instead of failing at once.
LOCK_TIMEOUT_SECONDS = 600


class MissingPackagesError(RuntimeError):
    """Debian packages are missing and cannot be installed here; the message says which and why."""


def missing_packages(packages: Iterable[str]) -> list[str]:
    """The packages of `packages` that dpkg does not list as installed (all of them without dpkg)."""
    wanted = list(dict.fromkeys(packages))
    if not wanted or shutil.which("dpkg-query") is None:
        return wanted
    # One line per known package; unknown ones are reported on stderr and simply have no line.
    listed = subprocess.run(
        ["dpkg-query", "--show", "--showformat=${Package} ${db:Status-Abbrev}\n", *wanted],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    installed = {
        fields[0].split(":")[0]
        for fields in (line.split() for line in listed.stdout.splitlines())
        if len(fields) >= 2 and fields[1] == "ii"
    }
    return [name for name in wanted if name.split(":")[0] not in installed]


def ensure_packages(packages: Iterable[str]) -> None:
    """Install the missing ones of `packages` (apt-get, non-interactive, without recommends).

    Raises MissingPackagesError when some are missing and this process is not root or the
    machine has no apt-get, and when apt-get fails (with its output).
    """
    missing = missing_packages(packages)
    if not missing:
        return
    command = f"apt-get install --no-install-recommends {' '.join(missing)}"
    if shutil.which("apt-get") is None:
        raise MissingPackagesError(f"missing Debian packages {', '.join(missing)}, and this machine has no apt-get")
    if os.geteuid() != 0:
        raise MissingPackagesError(f"missing Debian packages {', '.join(missing)}: run `{command}` as root")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = f"DPkg::Lock::Timeout={LOCK_TIMEOUT_SECONDS}"
    for step in (
        ["apt-get", "-o", lock, "update", "-qq"],
        ["apt-get", "-o", lock, "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        result = subprocess.run(step, capture_output=True, text=True, env=environment, check=False)
        if result.returncode != 0:
            raise MissingPackagesError(
                f"`{' '.join(step)}` exited {result.returncode}:\n{result.stdout}{result.stderr}".rstrip()
            )
    still_missing = missing_packages(missing)
    if still_missing:
        raise MissingPackagesError(f"apt-get did not install {', '.join(still_missing)}")
