"""Property over generated reports, against the real API server and the in-process operator.

Reports never stop status updates: whatever a run writes into its report ConfigMap, the
job's status goes on following the RayJob and the next valid report, finite and small.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.kube import ApiError, Kube, ObjectRef
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage
from prometheus_client import REGISTRY

from ..conftest import EXAMPLES
from .harness import InProcessOperator, eventually, set_ray_job_status
from .report_payloads import FIXED_PAYLOADS, Payload, report_payloads
from .spec_generation import SEED_SETTINGS, RecordProperty, write_counts
from .spec_mutations import Manifest, shown

REPORT_EXAMPLES = 40  # generated report payloads, on top of the fixed ones
REPORT_WAIT_SECONDS = 15.0
REPORT_BUDGET_SECONDS = 170.0  # the report property stops trying new payloads after this long
STATUS_MAX_BYTES = 256 * 1024
CONFIGMAP_PAYLOAD_MAX = 1_000_000  # a ConfigMap holds at most 1 MiB of data
JOB = (API_VERSION, "FineTuneJob")
RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}


def finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    if isinstance(value, list):
        return all(finite(item) for item in value)
    return True


def reconciles_done() -> float:
    return sum(
        REGISTRY.get_sample_value("kubetune_reconciles_total", {"kind": "FineTuneJob", "result": result}) or 0.0
        for result in ("ok", "error")
    )


@dataclass
class ReportRun:
    """A FineTuneJob with a running run whose report ConfigMap the test writes, as the runtime would."""

    kube: Kube
    namespace: str
    job: str

    @property
    def run(self) -> str:
        return f"{self.job}-r1"

    def start(self) -> None:
        document = yaml.safe_load((EXAMPLES / "finetunejob-minimal.yaml").read_text())
        document["metadata"] = {"name": self.job, "namespace": self.namespace}
        self.kube.create(document)
        eventually(lambda: self.kube.get("ray.io/v1", "RayJob", self.namespace, self.run), timeout=60, what=self.run)
        set_ray_job_status(self.kube, self.namespace, self.run, **RUNNING, message="started")
        eventually(lambda: self.status().get("phase") == "Running", what=f"{self.job} running")

    def status(self) -> Manifest:
        body = self.kube.get(*JOB, self.namespace, self.job)
        return (body or {}).get("status") or {}

    def last_run(self) -> Manifest:
        runs = self.status().get("runs") or [{}]
        return dict(runs[-1])

    def write(self, text: str) -> None:
        ref = ObjectRef("v1", "ConfigMap", self.namespace, f"{self.run}-report")
        self.kube.patch(ref, {"data": {REPORT_KEY: text}})

    def ray_job_message(self) -> Any:
        return (self.last_run().get("rayJob") or {}).get("message")

    def progress(self) -> Manifest:
        return dict(self.last_run().get("progress") or {})

    def follows(self, probe: Callable[[], bool]) -> bool:
        """Whether `probe` holds within REPORT_WAIT_SECONDS."""
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while time.monotonic() < deadline:
            if probe():
                return True
            time.sleep(0.1)
        return False

    def wait_for_a_reconcile_since(self, count: float, timeout: float = 3.0) -> None:
        """Give the operator a pass after a write (reconciles counted in-process); go on after `timeout`."""
        deadline = time.monotonic() + timeout
        while reconciles_done() <= count and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class ReportOutcomes:
    tried: int = 0
    not_written: int = 0
    skipped: int = 0
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    smallest: dict[str, Payload] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)

    def failed(self, payload: Payload, what: str) -> None:
        self.failures[payload.label].append(what)
        known = self.smallest.get(payload.kind)
        if known is None or len(payload.text) < len(known.text):
            self.smallest[payload.kind] = payload

    def counts(self) -> dict[str, Any]:
        return {
            "tried": self.tried,
            "not_written_too_large": self.not_written,
            "skipped": self.skipped,
            "failed": sum(len(f) for f in self.failures.values()),
            "failed_labels": len(self.failures),
            "by_kind": dict(self.kinds),
        }


def try_payload(run: ReportRun, payload: Payload, number: int, outcomes: ReportOutcomes) -> bool:
    """Write the payload, then check the status follows the RayJob and the next valid report.

    False when something failed (the next payloads then go to a fresh job).
    """
    before = reconciles_done()
    try:
        run.write(payload.text)
    except ApiError as error:
        if error.status in (413, 422):  # larger than a ConfigMap may be: nothing a run could write
            outcomes.not_written += 1
            return True
        raise
    outcomes.tried += 1
    outcomes.kinds[payload.kind] += 1
    run.wait_for_a_reconcile_since(before)
    failures = len(outcomes.failures.get(payload.label, []))
    marker = f"kuberay-{number}"
    set_ray_job_status(run.kube, run.namespace, run.run, **RUNNING, message=marker)
    if not run.follows(lambda: run.ray_job_message() == marker):
        outcomes.failed(
            payload, f"the status stopped following the RayJob while report.json held it: {shown_status(run)}"
        )
    step, message = 100_000 + number, f"probe-{number}"
    run.write(json.dumps(RunReport(stage=Stage.TRAIN, step=step, total_steps=10**6, message=message).to_wire()))
    if not run.follows(lambda: run.progress().get("step") == step and run.progress().get("message") == message):
        outcomes.failed(payload, f"the next valid report did not reach the status: {shown_status(run)}")
    status = run.status()
    if not finite(status):
        outcomes.failed(payload, "the status holds a non-finite number")
    size = len(json.dumps(status))
    if size > STATUS_MAX_BYTES:
        outcomes.failed(payload, f"the status is {size} bytes, over {STATUS_MAX_BYTES}")
    return len(outcomes.failures.get(payload.label, [])) == failures


def shown_status(run: ReportRun) -> str:
    last = run.last_run()
    return shown({"rayJob": last.get("rayJob"), "progress": last.get("progress")}, 300)


def report_failures(outcomes: ReportOutcomes) -> str:
    lines = [f"{sum(len(f) for f in outcomes.failures.values())} failures over {outcomes.tried} report payloads:"]
    for label, whats in sorted(outcomes.failures.items()):
        lines.append(f"  - {label} ({len(whats)} times): {whats[0][:400]}")
    lines.append("smallest failing payload per kind:")
    for kind, payload in sorted(outcomes.smallest.items()):
        lines.append(
            f"  - {kind}: {payload.detail}; report.json = {payload.text[:200]!r} ({len(payload.text)} characters)"
        )
    return "\n".join(lines)


def test_no_report_stops_status_updates(
    kube: Kube,
    namespace: str,
    operator: InProcessOperator,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: RecordProperty,
) -> None:
    outcomes, runs = ReportOutcomes(), [ReportRun(kube, namespace, "reports")]
    runs[-1].start()
    started = time.monotonic()

    def attempt(payload: Payload) -> None:
        stuck_before = len(outcomes.failures.get(payload.label, []))
        if stuck_before or time.monotonic() - started > REPORT_BUDGET_SECONDS:
            outcomes.skipped += 1  # one failure per label is enough; the budget bounds the test
            return
        if len(payload.text.encode()) > CONFIGMAP_PAYLOAD_MAX:
            outcomes.not_written += 1
            return
        if not try_payload(runs[-1], payload, outcomes.tried + outcomes.not_written, outcomes):
            runs.append(ReportRun(kube, namespace, f"reports-{len(runs)}"))  # a fresh job for the next payloads
            runs[-1].start()

    for payload in FIXED_PAYLOADS:
        attempt(payload)

    @settings(SEED_SETTINGS, max_examples=REPORT_EXAMPLES)
    @given(report_payloads())
    def attempt_generated(payload: Payload) -> None:
        attempt(payload)

    attempt_generated()
    write_counts(tmp_path_factory.getbasetemp(), "reports", outcomes.counts(), record_property)
    assert outcomes.tried >= len(FIXED_PAYLOADS)
    assert not outcomes.failures, report_failures(outcomes)
