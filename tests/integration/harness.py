"""What the integration tests drive: the operator (in-process or as a process), a movable clock, polling.

The tests play KubeRay's part: no KubeRay operator runs, so a test moves a RayJob
along by patching its status the way KubeRay would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from kubetune.operator.kube import Kube, ObjectRef
from kubetune.operator.settings import Settings
from kubetune.runtime.contract.plan import PLAN_KEY, RunPlan

from ..controlplane import process_cpu_seconds

T = TypeVar("T")
Manifest = dict[str, Any]
# Where the runs of the example job (examples/finetunejob-minimal.yaml) write: run N under EXAMPLE_RUNS/N.
# The operator keeps only the artifacts a report names there.
EXAMPLE_RUNS = "s3://kubetune-examples/runs/support-tickets/runs"


def eventually(
    probe: Callable[[], T | Literal[False] | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.1,
    what: str = "",
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` (and `diagnose()`) after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        last = value
        time.sleep(interval)
    details = f"\n{diagnose()}" if diagnose is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what or probe}; last value: {last!r}{details}")


class MovableClock:
    """Real time plus an offset that a test may move forward (for schedules)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def set(self, moment: datetime) -> None:
        self.offset = moment - datetime.now(UTC)

    def reset(self) -> None:
        self.offset = timedelta()


class InProcessOperator:
    """`kubetune operator` running in a thread of the test process.

    With the default settings, nothing is looked at again without an event for
    10 minutes, so the tests show that watches, not polling, move every job.
    """

    def __init__(
        self,
        kubeconfig: Path,
        clock: Callable[[], datetime],
        settings: Settings | None = None,
        namespaces: list[str] | None = None,
    ) -> None:
        self.kubeconfig, self.clock = kubeconfig, clock
        self.settings = settings or Settings(metrics_port=0, recheck_seconds=600)
        self.namespaces = namespaces or []
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        from kubetune.operator import main

        self._stop, ready = threading.Event(), threading.Event()
        self._thread = threading.Thread(
            target=main.run,
            args=(self.namespaces, self.settings),
            kwargs={"stop": self._stop, "ready": ready, "clock": self.clock, "kubeconfig": str(self.kubeconfig)},
            name="kubetune-operator",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise AssertionError(f"the operator was not ready after {timeout} s")

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop is None or self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the operator did not stop within {timeout} s")
        self._stop = self._thread = None


class OperatorProcess:
    """`kubetune operator` as a separate process, which a test may kill like a crashed pod."""

    def __init__(
        self,
        kubeconfig: Path,
        log_path: Path,
        metrics_port: int,
        workers: int = 16,
        *,
        kopf_run: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        self.kubeconfig, self.log_path, self.metrics_port, self.workers = kubeconfig, log_path, metrics_port, workers
        # `kopf run -m kubetune.operator.main` instead of `kubetune operator`.
        self.kopf_run = kopf_run
        self.args = list(args)  # more flags of `kubetune operator`
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBETUNE_WORKERS": str(self.workers),
            "NO_PROXY": "127.0.0.1,localhost",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
        }
        command = (
            ["-m", "kopf", "run", "--standalone", "--all-namespaces", "-m", "kubetune.operator.main"]
            if self.kopf_run
            else ["-m", "kubetune.cli.main", "operator", f"--metrics-port={self.metrics_port}", *self.args]
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *command],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        eventually(self._serving, timeout=timeout, interval=0.2, what="the operator's metrics endpoint")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the operator exited {self.proc.returncode}:\n{self.log_tail()}")
        return self.metrics() is not None

    def metrics(self) -> str | None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return None

    def rss_bytes(self) -> int:
        """Resident memory of the operator process (Linux)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the operator process has used (Linux)."""
        assert self.proc is not None
        return process_cpu_seconds(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, as when a node dies."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def create_secret(kube: Kube, namespace: str, name: str, values: dict[str, str]) -> None:
    """A Secret, as a user makes it (the operator's client knows no Secret kind: it never touches one)."""
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}}
    kube.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body={**body, "stringData": values})


def set_ray_job_status(kube: Kube, namespace: str, name: str, **status: Any) -> Manifest:
    """Do what KubeRay does: write the RayJob's status (camelCase keys as given)."""
    return kube.patch_status(ObjectRef("ray.io/v1", "RayJob", namespace, name), status)


def write_plan(kube: Kube, namespace: str, run: str, plan: RunPlan) -> None:
    """Play a GPU run's plan Job: write its plan into the run's report ConfigMap, as the plan entry point does."""
    kube.patch(ObjectRef("v1", "ConfigMap", namespace, f"{run}-report"), {"data": {PLAN_KEY: plan.model_dump_json()}})


def conditions(body: Manifest | None) -> dict[str, Manifest]:
    return {item["type"]: item for item in ((body or {}).get("status") or {}).get("conditions", [])}


class CapturedLogs(logging.Handler):
    """Every log record of this process while attached, the in-process operator's included.

    `levels` lowers the named loggers' levels for the while (restored on exit), so that
    their INFO or DEBUG records are kept too.
    """

    def __init__(self, levels: dict[str, int] | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._levels = levels or {}
        self._saved: dict[str, int] = {}
        self._lock_records = threading.Lock()
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def __enter__(self) -> CapturedLogs:
        for name, level in self._levels.items():
            self._saved[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(level)
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *_: object) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self._saved.items():
            logging.getLogger(name).setLevel(level)

    def lines(self) -> list[str]:
        """Every record as the operator's log would show it, tracebacks included."""
        with self._lock_records:
            records = list(self.records)
        return [self.format(record) for record in records]

    def unhandled(self, *mentioning: str) -> list[str]:
        """ERROR records with a traceback (an exception nobody handled) that mention any of `mentioning`."""
        with self._lock_records:
            records = [r for r in self.records if r.levelno >= logging.ERROR and r.exc_info]
        formatted = [self.format(record) for record in records]
        return [line for line in formatted if not mentioning or any(text in line for text in mentioning)]
