"""A throwaway containerd for checking images: its own root, state and sockets in a temporary folder.

containerd and everything it starts (shims, runc) run in a private mount namespace in which that
folder's `run/` is bind-mounted over /run/containerd (where shims and runc keep their sockets and
state, and `ctr` its FIFOs), so nothing is written to the machine's containerd paths; `ctr` joins
that namespace through nsenter. Needs root and the `containerd` Debian package (runc comes with it).

    with Containerd() as containerd:
        containerd.ctr("images", "import", str(archive))
        output = containerd.run(image, ["python", "-c", "print(1)"], tmpfs=["/tmp"])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from ..debian import ensure_packages

NAMESPACE = "k8s.io"
_RUN_DIRECTORY = Path("/run/containerd")
_CONFIG = """\
version = 2
root = "{folder}/root"
state = "{folder}/state"
# The CRI plugin (kubelet's) is not needed here; /opt/containerd and the other snapshotters neither.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "{folder}/containerd.sock"
[ttrpc]
  address = "{folder}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"""


class ContainerdError(RuntimeError):
    """containerd did not start, or a ctr command failed; the message holds its output."""


class Containerd:
    def __init__(self) -> None:
        self.folder: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._created_run_directory = False

    def __enter__(self) -> Containerd:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> None:
        ensure_packages(["containerd", "runc"])
        self.folder = Path(tempfile.mkdtemp(prefix="kubetune-containerd-"))
        (self.folder / "run").mkdir()
        (self.folder / "config.toml").write_text(_CONFIG.format(folder=self.folder))
        if not _RUN_DIRECTORY.exists():
            _RUN_DIRECTORY.mkdir(parents=True)
            self._created_run_directory = True
        script = (
            f"mount --bind {self.folder}/run {_RUN_DIRECTORY} && exec containerd --config {self.folder}/config.toml"
        )
        with open(self.folder / "containerd.log", "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ContainerdError(f"containerd exited {self.process.returncode}:\n{self.log()}")
            if self.ctr("version", check=False).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd did not answer within {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        assert self.folder is not None
        return (self.folder / "containerd.log").read_text(errors="replace")[-4000:]

    def ctr(self, *arguments: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run `ctr` against this containerd, in the k8s.io namespace (kubelet's)."""
        assert self.folder is not None and self.process is not None
        command = [
            "nsenter", f"--target={self.process.pid}", "--mount", "--",
            "ctr", "--address", f"{self.folder}/containerd.sock", "--namespace", NAMESPACE, *arguments,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(arguments)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def run(self, image: str, command: Sequence[str] = (), *, tmpfs: Sequence[str] = (), timeout: float = 600) -> str:
        """Run a container of `image` (its config's user, environment and working directory) with a
        read-only root file system and a tmpfs at each of `tmpfs`; returns its output. A `command`
        replaces the image's entry point and CMD both (ctr's way; kubelet's `args` keep the entry
        point). The container is removed afterwards."""
        name = f"kubetune-check-{uuid.uuid4().hex[:8]}"
        mounts = []
        for path in tmpfs:
            mounts += ["--mount", f"type=tmpfs,src=tmpfs,dst={path},options=rw:nosuid:nodev:mode=1777"]
        # One cgroup level of its own, which runc removes with the container.
        arguments = ["run", "--rm", "--read-only", "--cgroup", f"/{name}", *mounts, image, name, *command]
        result = self.ctr(*arguments, check=False, timeout=timeout)
        if result.returncode != 0:
            raise ContainerdError(
                f"{' '.join(command)} in {image} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout + result.stderr

    def _shims(self) -> list[int]:
        """Shim processes of this containerd (their command line names its socket)."""
        assert self.folder is not None
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    command_line = (entry / "cmdline").read_bytes()
                    if b"containerd-shim" in command_line and str(self.folder).encode() in command_line:
                        found.append(int(entry.name))
        return found

    def stop(self, timeout: float = 30) -> None:
        """Stop containerd and its shims, and remove its folder (and /run/containerd if it made it)."""
        if self.process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(sig)
                try:
                    self.process.wait(timeout)
                    break
                except subprocess.TimeoutExpired:
                    continue
            for pid in self._shims() if self.folder else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process = None
        if self.folder is not None:
            # The namespace, and with it every mount of containerd's, ends with its last process.
            shutil.rmtree(self.folder)
            self.folder = None
        if self._created_run_directory:
            with contextlib.suppress(OSError):
                _RUN_DIRECTORY.rmdir()
            self._created_run_directory = False
