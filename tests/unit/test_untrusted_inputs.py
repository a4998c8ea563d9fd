"""What the run's pod and KubeRay write reaches the status bounded and finite; bad specs stop cleanly.

Each test reproduces a way a report, a RayJob or a spec broke kubetune: NaN in a report
(invalid JSON for the API server, and a NaN metric passing the gate), a status over
etcd's size limit, an impossible schedule, quantities such as "-2", a long retrain value.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import (
    FineTuneJob,
    FineTuneJobStatus,
    GateReason,
    GateResult,
    JobPhase,
    RunFailure,
    RunRecord,
    Trigger,
)
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import ModelDeployment
from kubetune.operator.conditions import Reason
from kubetune.operator.observe.reports import observe_report, with_report
from kubetune.operator.planning.finetunejob import ScheduleError, name_conflict, plan, retrain_token
from kubetune.operator.planning.schedule import next_due
from kubetune.operator.policy import placement_violation
from kubetune.operator.settings import Settings
from kubetune.operator.status.finetunejob import compute_status
from kubetune.operator.status.gate import gate
from kubetune.operator.status.history import RUNS_MAX_BYTES, STATUS_MAX_BYTES, fit_history
from kubetune.runtime.contract.common import MESSAGE_MAX_LENGTH
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage

from ..conftest import mutated

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
DRIVER_LOG = "Traceback (most recent call last):\n" + "x" * 20_000  # what Ray puts in a RayJob's message


def job_of(document: dict[str, Any]) -> FineTuneJob:
    job = parse(mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "u-1"))
    assert isinstance(job, FineTuneJob)
    return job


def report_map(text: str, uid: str = "u-1") -> dict[str, Any]:
    owner = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "support-tickets"}
    return {
        "metadata": {
            "name": "support-tickets-r1-report",
            "labels": {"kubetune.io/run": "1", "kubetune.io/finetunejob": "support-tickets"},
            "ownerReferences": [{**owner, "controller": True, "uid": uid}],
        },
        "data": {REPORT_KEY: text},
    }


def wire_json(status: FineTuneJobStatus) -> str:
    """The status as the API server would take it: strict JSON (NaN is not JSON)."""
    return json.dumps(status.to_wire(), allow_nan=False)


def test_nan_in_a_report_becomes_a_finite_status_and_fails_the_gate(minimal_job: dict[str, Any]) -> None:
    """A learning rate of 1.0 gives a NaN loss: Python writes it as the JSON literal NaN."""
    text = (
        '{"stage": "done", "loss": NaN, "epoch": Infinity, "metricsBefore": {"accuracy": 0.25},'
        ' "metricsAfter": {"accuracy": NaN, "loss": -Infinity}, "bestHyperparameters": {"learningRate": NaN}}'
    )
    seen = observe_report(report_map(text))
    assert seen is not None and seen.number == 1 and seen.owner_uid == "u-1"
    assert seen.report is not None and seen.report.loss is None and seen.report.epoch is None
    record = RunRecord(
        number=1,
        ray_job_name="support-tickets-r1",
        trigger=Trigger.SPEC_CHANGE,
        spec_generation=1,
        phase=JobPhase.SUCCEEDED,
    )
    record = with_report(record, seen.report, "s3://b")
    assert record.metrics_after == {}
    assert record.not_finite == ["metricsAfter.accuracy", "metricsAfter.loss"]
    verdict = gate(job_of(minimal_job), record, seen.report)
    assert (verdict.passed, verdict.reason) == (False, GateReason.METRIC_NOT_FINITE)
    assert verdict.message == "run 1: the fine-tuned model's accuracy is not a finite number"
    status = compute_status([record.judged(verdict)], suspended=False, generation=1, previous=None, now=NOW)
    assert "NaN" not in wire_json(status) and "Infinity" not in wire_json(status)
    assert status.promoted_run is None


def test_a_base_model_metric_that_is_not_finite_fails_the_gate(minimal_job: dict[str, Any]) -> None:
    report = RunReport(stage=Stage.DONE, metrics_before={"accuracy": math.nan}, metrics_after={"accuracy": 0.9})
    record = with_report(
        RunRecord(
            number=2, ray_job_name="r2", trigger=Trigger.SPEC_CHANGE, spec_generation=1, phase=JobPhase.SUCCEEDED
        ),
        report,
        "s3://b",
    )
    verdict = gate(job_of(minimal_job), record)
    assert (verdict.reason, verdict.value) == (GateReason.METRIC_NOT_FINITE, 0.9)
    assert "base model's accuracy" in verdict.message


def test_the_runtime_writes_strict_json_even_when_training_diverges() -> None:
    report = RunReport(stage=Stage.TRAIN)
    report.loss = math.nan  # as the training loop assigns it
    report.metrics_after = {"loss": math.inf}
    assert json.loads(json.dumps(report.to_wire(), allow_nan=False)) == {
        "schemaVersion": 1,
        "stage": "train",
        "metricsAfter": {"loss": None},
    }


def test_user_specs_refuse_nan(minimal_job: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="finite number"):
        parse(mutated(minimal_job, "spec.promotion", {"minImprovement": math.nan}))


def failed_run(number: int, **extra: Any) -> RunRecord:
    return RunRecord(
        number=number,
        ray_job_name=f"support-tickets-r{number}",
        trigger=Trigger.ANNOTATION,
        trigger_detail=f"retry-{number}",
        spec_generation=1,
        phase=JobPhase.FAILED,
        message=DRIVER_LOG,
        ray_job={"name": f"support-tickets-r{number}", "reason": "AppFailed", "message": DRIVER_LOG},
        **extra,
    )


def test_long_kuberay_messages_are_cut_to_the_documented_length() -> None:
    run = failed_run(1)
    assert run.message is not None and len(run.message) == MESSAGE_MAX_LENGTH and run.message.endswith("…")
    assert run.ray_job is not None and run.ray_job.message is not None
    assert len(run.ray_job.message) == MESSAGE_MAX_LENGTH


def test_a_hundred_failed_runs_stay_under_the_status_budget() -> None:
    """36 failed runs with Ray's driver log in their message made a 1.6 MB status (etcd takes 1.5 MiB)."""
    records = [failed_run(n) for n in range(1, 101)]
    status = compute_status(fit_history(records)[0], suspended=False, generation=1, previous=None, now=NOW)
    assert len(wire_json(status)) <= STATUS_MAX_BYTES


def test_the_budget_summarises_then_drops_old_runs_never_the_promoted_one() -> None:
    promoted = failed_run(1).model_copy(
        update={
            "phase": JobPhase.SUCCEEDED,
            "gate": GateResult(passed=True, reason=GateReason.PASSED),
            "best_hyperparameters": {"note": "y" * 3000},
        }
    )
    records = [promoted, *(failed_run(n, best_hyperparameters={"note": "z" * 3000}) for n in range(2, 101))]
    kept, dropped = fit_history(records, budget=60_000)
    assert kept[0] == promoted  # whole, although it is the oldest
    assert dropped and all(r.number not in {1, 100} for r in dropped)
    assert [r.number for r in dropped] == list(range(2, 2 + len(dropped)))  # oldest first
    assert all(r.best_hyperparameters is None for r in kept[1:])  # what is left of the others is summarised
    assert sum(len(json.dumps(r.to_wire())) for r in kept) <= 60_000
    assert fit_history(records[:3], budget=RUNS_MAX_BYTES) == (records[:3], [])


def test_a_hostile_report_is_bounded_before_it_reaches_the_status() -> None:
    report = RunReport(
        stage=Stage.DONE,
        message="m" * 100_000,
        error="e" * 100_000,
        metrics_after={**{f"metric{n}": 0.5 for n in range(5000)}, "accuracy": 0.9},
        variants={f"v{n}": {"uri": f"s3://bucket/{n}"} for n in range(500)},
        best_hyperparameters={"junk": "j" * 100_000},
        manifest_uri="s3://b/" + "k" * 5000,
    )
    assert report.message is not None and len(report.message) == MESSAGE_MAX_LENGTH
    record = with_report(
        RunRecord(number=1, ray_job_name="r1", trigger=Trigger.SPEC_CHANGE, spec_generation=1, phase=JobPhase.RUNNING),
        report,
        "s3://bucket",
    )
    assert record.metrics_after is not None and len(record.metrics_after) == 32
    assert record.metrics_after["accuracy"] == 0.9  # kubetune's own metrics come first
    assert record.artifacts is not None and len(record.artifacts) == 16
    assert record.best_hyperparameters is None and record.manifest_uri is None
    assert len(json.dumps(record.to_wire())) < 10_000


def test_a_long_retrain_value_is_recorded_by_its_digest(minimal_job: dict[str, Any]) -> None:
    value = "r" * 5000  # annotations may hold up to 256 KiB
    token = retrain_token(value)
    assert token.startswith("sha256:") and retrain_token(value + "  ") == token
    assert retrain_token(" 2026-11-28 ") == "2026-11-28"
    job = job_of(minimal_job)
    first = plan(
        job, generation=1, annotations={"kubetune.io/retrain": value}, created=NOW, observed=[], reports={}, now=NOW
    )
    assert first.handled_retrain == token
    record = next(r for r in first.records if r.trigger == Trigger.ANNOTATION) if first.create is None else None
    assert record is None or record.trigger_detail == token


def test_name_conflict_fails_the_new_run_without_promoting(minimal_job: dict[str, Any]) -> None:
    job = job_of(minimal_job)
    decision = plan(job, generation=1, annotations={}, created=NOW, observed=[], reports={}, now=NOW)
    assert decision.create is not None
    message = "RayJob support-tickets-r1 already exists and does not belong to this FineTuneJob"
    after = name_conflict(job, decision, message, NOW)
    (run,) = after.records
    assert (run.phase, run.failure, run.message) == (JobPhase.FAILED, RunFailure.NAME_CONFLICT, message)
    assert run.gate is not None and not run.gate.passed
    assert after.create is None and after.finished == [run]
    assert [(e.type, e.reason) for e in after.events] == [("Warning", Reason.NAME_CONFLICT)]
    status = compute_status(after.records, suspended=False, generation=1, previous=None, now=NOW)
    degraded = next(c for c in status.conditions or [] if c.type == "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "NameConflict")
    assert status.promoted_run is None


@pytest.mark.parametrize("schedule", ["0 0 31 2 *", "0 0 30 feb ?", "15 3 31 4,6 *", "0 0 31 nov *"])
def test_a_schedule_that_never_fires_is_refused(minimal_job: dict[str, Any], schedule: str) -> None:
    with pytest.raises(SpecError, match="never fires"):
        parse(mutated(minimal_job, "spec.schedule", schedule))


def test_a_schedule_that_never_fires_stops_the_planner_with_the_field_named(minimal_job: dict[str, Any]) -> None:
    job = job_of(minimal_job)
    job.spec.__dict__["schedule"] = "0 0 31 2 *"  # as from an operator whose admission checks missed it
    with pytest.raises(ScheduleError, match=r"^spec\.schedule: '0 0 31 2 \*' never fires"):
        next_due(job, NOW)
    assert next_due(job_of(mutated(minimal_job, "spec.schedule", "0 0 29 2 *")), NOW) == datetime(
        2028, 2, 29, tzinfo=UTC
    )


@pytest.mark.parametrize("value", ["-2", "0", "0.0", "-500m", 0, -2, "0Gi", "abc"])
@pytest.mark.parametrize("field", ["cpuPerWorker", "memoryPerWorker", "head.cpu"])
def test_requested_quantities_must_be_positive(minimal_job: dict[str, Any], field: str, value: Any) -> None:
    with pytest.raises(SpecError, match="positive resource quantity"):
        parse(mutated(minimal_job, f"spec.resources.{field}", value))


@pytest.mark.parametrize("value", ["500m", "0.5", ".5", "2", 4, "16Gi", "1e3", "+1"])
def test_positive_quantities_are_accepted(minimal_job: dict[str, Any], value: Any) -> None:
    parse(mutated(minimal_job, "spec.resources.cpuPerWorker", value))


def test_deployment_quantities_must_be_positive(deployment: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="positive resource quantity"):
        parse(mutated(deployment, "spec.resources.memory", "0"))


def test_images_and_priority_classes_outside_the_settings_are_refused(
    minimal_job: dict[str, Any], deployment: dict[str, Any]
) -> None:
    settings = Settings(allowed_images="registry.example.com/kubetune/*", allowed_priority_classes="batch, serving")
    job = job_of(
        mutated(
            mutated(minimal_job, "spec.resources.image", "evil.example/miner:1"),
            "spec.resources.priorityClassName",
            "batch",
        )
    )
    assert placement_violation(job.spec.resources, "spec.resources", settings) == (
        "spec.resources.image: 'evil.example/miner:1' is not allowed here (allowed: registry.example.com/kubetune/*)"
    )
    allowed = job_of(mutated(minimal_job, "spec.resources.image", "registry.example.com/kubetune/runtime:1"))
    assert placement_violation(allowed.spec.resources, "spec.resources", settings) is None
    served = parse(mutated(deployment, "spec.resources.priorityClassName", "system-cluster-critical"))
    assert isinstance(served, ModelDeployment)
    violation = placement_violation(served.spec.resources, "spec.resources", settings)
    assert violation is not None and violation.startswith("spec.resources.priorityClassName: 'system-cluster-critical'")
    assert placement_violation(job.spec.resources, "spec.resources", Settings()) is None  # nothing configured


def test_allowed_lists_come_from_the_environment() -> None:
    settings = Settings.from_environment(
        {"KUBETUNE_ALLOWED_IMAGES": "a/*, b/c:1", "KUBETUNE_ALLOWED_PRIORITY_CLASSES": ""}
    )
    assert settings.allowed_image_patterns == ("a/*", "b/c:1")
    assert settings.allowed_priority_class_names == ()


def test_a_report_from_another_owner_is_told_apart() -> None:
    seen = observe_report(report_map('{"stage": "done"}', uid="someone-else"))
    assert seen is not None and seen.owner_uid == "someone-else"
    unowned = report_map('{"stage": "done"}')
    del unowned["metadata"]["ownerReferences"]
    assert observe_report(unowned) is None  # no FineTuneJob's: never parsed, never cached


def test_the_gate_keeps_missing_and_not_finite_apart(minimal_job: dict[str, Any]) -> None:
    record = RunRecord(
        number=1, ray_job_name="r1", trigger=Trigger.SPEC_CHANGE, spec_generation=1, phase=JobPhase.SUCCEEDED
    )
    assert gate(job_of(minimal_job), record).reason == GateReason.METRIC_MISSING


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("spec.hyperparameters.epochs", "3", "spec.hyperparameters.epochs: Input should be a valid integer"),
        ("spec.suspend", "true", "spec.suspend: Input should be a valid boolean"),
        (
            "spec.hyperparameters.learningRate",
            "0.001",
            "spec.hyperparameters.learningRate: Input should be a valid number",
        ),
        ("spec.resources.tolerations", [{"tolerationSeconds": 2**63}], "must fit in a 64-bit integer"),
    ],
)
def test_types_are_checked_as_the_api_server_checks_them(
    minimal_job: dict[str, Any], path: str, value: Any, message: str
) -> None:
    with pytest.raises(SpecError, match=re.escape(message)):
        parse(mutated(minimal_job, path, value))


def test_nulls_and_whole_decimals_read_as_the_api_server_reads_them(minimal_job: dict[str, Any]) -> None:
    job = parse(mutated(mutated(minimal_job, "spec.method", None), "spec.hyperparameters.epochs", 2.0))
    assert isinstance(job, FineTuneJob)
    assert job.spec.hyperparameters.epochs == 2 and job.spec.method.type.value == "lora"  # the default method


def test_named_settings_are_searched_with_options_and_counts_with_whole_numbers(minimal_job: dict[str, Any]) -> None:
    space = {
        "optimizer": {"type": "choice", "options": ["adamw", "sgd"]},
        "batchSize": {"type": "grid", "values": [8.0, 16]},
    }
    job = parse(mutated(minimal_job, "spec.search", {"space": space}))
    assert isinstance(job, FineTuneJob) and job.spec.search is not None
    assert job.spec.search.space["optimizer"].choices == ["adamw", "sgd"]
    assert job.spec.search.space["batchSize"].choices == [8, 16]
    assert all(type(v) is int for v in job.spec.search.space["batchSize"].choices)
    for wrong, message in [
        ({"optimizer": {"type": "choice", "values": [1]}}, "a named setting takes choice or grid with options"),
        ({"batchSize": {"type": "choice", "options": ["8"]}}, "a numeric setting takes values (numbers)"),
        ({"batchSize": {"type": "choice", "values": [8.5]}}, "values must be whole numbers"),
        ({"batchSize": {"type": "uniform", "low": 8, "high": 32}}, "takes randint, choice or grid, not uniform"),
    ]:
        with pytest.raises(SpecError, match=re.escape(message)):
            parse(mutated(minimal_job, "spec.search", {"space": wrong}))
