"""FineTuneJob status: the gate, the conditions, the history's budget, and their assembly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import (
    FineTuneJob,
    FineTuneJobStatus,
    GateReason,
    GateResult,
    JobPhase,
    RunRecord,
    Trigger,
)
from kubetune.operator.api.manifests import parse
from kubetune.operator.conditions import ConditionType, Reason
from kubetune.operator.model.events import Problem
from kubetune.operator.status.finetunejob import compute_status
from kubetune.operator.status.gate import best_metric, gate
from kubetune.operator.status.history import trim_history
from kubetune.runtime.contract.report import RunReport, Stage, VariantReport
from kubetune.runtime.contract.search import Metric

from ..conftest import load_example, mutated

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def record(number: int, phase: JobPhase, **extra: Any) -> RunRecord:
    return RunRecord(
        number=number,
        ray_job_name=f"job-r{number}",
        trigger=Trigger.SPEC_CHANGE,
        spec_generation=1,
        phase=phase,
        **extra,
    )


@pytest.fixture
def job(minimal_job: dict[str, Any]) -> FineTuneJob:
    parsed = parse(minimal_job)
    assert isinstance(parsed, FineTuneJob)
    return parsed


GATE_CASES = [
    # (promotion spec, before, after, verdict, message fragment)
    ({}, 0.25, 0.9, GateReason.PASSED, "accuracy 0.9 (base 0.25)"),
    ({}, 0.9, 0.85, GateReason.IMPROVEMENT_TOO_SMALL, "improved by -0.05"),
    ({"minImprovement": 0.1}, 0.8, 0.85, GateReason.IMPROVEMENT_TOO_SMALL, "less than promotion.minImprovement 0.1"),
    ({"minValue": 0.95}, 0.5, 0.9, GateReason.OUT_OF_BOUND, "is not at least promotion.minValue 0.95"),
    ({"metric": "loss"}, 1.2, 0.4, GateReason.PASSED, "loss 0.4"),
    ({"metric": "loss", "minValue": 0.3}, 1.2, 0.4, GateReason.OUT_OF_BOUND, "is not at most"),
    ({"enabled": False}, 0.2, 0.9, GateReason.PROMOTION_DISABLED, "promotion is disabled"),
]


@pytest.mark.parametrize(("promotion", "before", "after", "reason", "fragment"), GATE_CASES)
def test_gate(
    minimal_job: dict[str, Any],
    promotion: dict[str, Any],
    before: float,
    after: float,
    reason: GateReason,
    fragment: str,
) -> None:
    job = parse(mutated(minimal_job, "spec.promotion", promotion))
    assert isinstance(job, FineTuneJob)
    metric = promotion.get("metric", "accuracy")
    run = record(1, JobPhase.SUCCEEDED, metrics_before={metric: before}, metrics_after={metric: after})
    verdict = gate(job, run)
    assert (verdict.passed, verdict.reason) == (reason == GateReason.PASSED, reason)
    assert fragment in verdict.message
    if reason != GateReason.PROMOTION_DISABLED:  # the numbers the verdict rests on travel as data
        assert (verdict.metric, verdict.value, verdict.baseline) == (Metric(metric), after, before)


def test_gate_rejects_failed_runs_and_missing_metrics(job: FineTuneJob) -> None:
    assert gate(job, record(1, JobPhase.FAILED)).reason == GateReason.RUN_NOT_SUCCEEDED
    missing = gate(job, record(1, JobPhase.SUCCEEDED))
    assert (missing.passed, missing.reason, missing.value) == (False, GateReason.METRIC_MISSING, None)
    assert "reported no accuracy" in missing.message


def test_gate_can_require_a_compressed_variant(minimal_job: dict[str, Any]) -> None:
    job = parse(mutated(minimal_job, "spec.promotion", {"requireCompressed": True}))
    assert isinstance(job, FineTuneJob)
    run = record(1, JobPhase.SUCCEEDED, metrics_before={"accuracy": 0.3}, metrics_after={"accuracy": 0.9})
    rejected = RunReport(
        stage=Stage.DONE,
        variants={"full": VariantReport(uri="s3://b/full"), "int8": VariantReport(uri="s3://b/int8", accepted=False)},
    )
    accepted = RunReport(stage=Stage.DONE, variants={"int8": VariantReport(uri="s3://b/int8")})
    verdict = gate(job, run, rejected)
    assert (verdict.passed, verdict.reason) == (False, GateReason.NO_COMPRESSED_VARIANT)
    assert verdict.message == "no compressed variant within compression.maxAccuracyDrop"
    assert gate(job, run, accepted).passed is True


def test_gate_bounds_how_far_a_benchmark_metric_may_fall() -> None:
    """evaluation.lmEval.maxDrop: each benchmark metric the run names may fall at most that far."""
    document = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.output.uri", "pvc://runs/lm")
    document = mutated(document, "spec.evaluation", {"lmEval": {"tasks": ["topics", "arc_easy"], "maxDrop": 0.02}})
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    names = ["arc_easy.acc", "topics.acc"]
    report = RunReport(stage=Stage.DONE, benchmark_metrics=names)
    before = {"loss": 2.0, "arc_easy.acc": 0.40, "topics.acc": 0.50}

    def verdict(after: dict[str, float], given: RunReport | None = report) -> GateResult:
        return gate(job, record(1, JobPhase.SUCCEEDED, metrics_before=before, metrics_after=after), given)

    kept = verdict({"loss": 1.0, "arc_easy.acc": 0.39, "topics.acc": 0.9})
    assert (kept.passed, kept.reason) == (True, GateReason.PASSED)
    forgot = verdict({"loss": 1.0, "arc_easy.acc": 0.30, "topics.acc": 0.9})
    assert (forgot.passed, forgot.reason) == (False, GateReason.BENCHMARK_DROPPED)
    assert forgot.message == "arc_easy.acc fell by 0.1 (0.4 to 0.3), more than evaluation.lmEval.maxDrop 0.02"
    assert verdict({"loss": 1.0, "topics.acc": 0.9}).reason == GateReason.METRIC_MISSING
    assert verdict({"loss": 1.0, "arc_easy.acc": 0.5, "topics.acc": 0.9}, None).reason == GateReason.METRIC_MISSING


def conditions_of(job: FineTuneJob, records: list[RunRecord], **extra: Any) -> dict[str, tuple[str, str]]:
    status = compute_status(records, suspended=job.spec.suspend, generation=3, previous=None, now=NOW, **extra)
    assert all(c.observed_generation == 3 for c in status.conditions or [])
    return {c.type: (c.status.value, c.reason) for c in status.conditions or []}


def test_conditions_while_running(job: FineTuneJob) -> None:
    conditions = conditions_of(job, [record(1, JobPhase.RUNNING)])
    assert conditions[ConditionType.PROGRESSING] == ("True", "RunRunning")
    assert conditions[ConditionType.READY] == ("False", "NoRunYet")
    assert ConditionType.SUCCEEDED not in conditions


def test_conditions_after_success_and_promotion(job: FineTuneJob) -> None:
    done = record(1, JobPhase.SUCCEEDED).judged(passed("accuracy", 0.9, 0.3))
    status = compute_status([done], suspended=job.spec.suspend, generation=3, previous=None, now=NOW)
    conditions = {c.type: (c.status.value, c.reason) for c in status.conditions or []}
    assert conditions[ConditionType.READY] == ("True", "Promoted")
    assert conditions[ConditionType.SUCCEEDED] == ("True", "RunSucceeded")
    assert conditions[ConditionType.FAILED] == ("False", "RunSucceeded")
    assert conditions[ConditionType.PROGRESSING] == ("False", "Idle")
    assert (status.phase, status.promoted_run, status.best_metric) == (JobPhase.SUCCEEDED, 1, "accuracy=0.9")


def test_a_failed_retrain_keeps_the_promoted_run(job: FineTuneJob) -> None:
    records = [
        record(1, JobPhase.SUCCEEDED).judged(passed("accuracy", 0.9, None)),
        record(2, JobPhase.FAILED, message="AppFailed"),
    ]
    status = compute_status(records, suspended=job.spec.suspend, generation=3, previous=None, now=NOW)
    conditions = {c.type: (c.status.value, c.reason) for c in status.conditions or []}
    assert conditions[ConditionType.DEGRADED] == ("True", "RunFailed")
    assert conditions[ConditionType.READY] == ("True", "Promoted")
    assert (status.phase, status.promoted_run) == (JobPhase.FAILED, 1)


def passed(metric: str, value: float, baseline: float | None) -> GateResult:
    return GateResult(passed=True, reason=GateReason.PASSED, metric=Metric(metric), value=value, baseline=baseline)


def test_best_metric_comes_from_the_verdict_not_its_message() -> None:
    verdict = passed("accuracy", 0.91234, 0.5).model_copy(update={"message": "anything (at all)"})
    assert best_metric(verdict) == "accuracy=0.9123"
    assert best_metric(None) is None


def test_a_job_that_cannot_run_says_why(job: FineTuneJob) -> None:
    reason = Reason.INVALID_SPEC
    problem = Problem(reason, "spec.resources.image: not in the allowed images")
    conditions = conditions_of(job, [], problem=problem)
    assert conditions[ConditionType.READY] == ("False", reason.value)
    assert conditions[ConditionType.DEGRADED] == ("True", reason.value)


def test_transition_time_changes_only_with_status(job: FineTuneJob) -> None:
    first = compute_status([record(1, JobPhase.RUNNING)], suspended=False, generation=1, previous=None, now=NOW)
    later = NOW + timedelta(minutes=5)
    same = compute_status([record(1, JobPhase.RUNNING)], suspended=False, generation=1, previous=first, now=later)
    changed = compute_status([record(1, JobPhase.SUCCEEDED)], suspended=False, generation=1, previous=first, now=later)

    def stamp(status: FineTuneJobStatus, kind: str) -> datetime | None:
        return next(c.last_transition_time for c in status.conditions or [] if c.type == kind)

    assert stamp(same, "Progressing") == NOW
    assert stamp(changed, "Progressing") == later


def test_history_keeps_active_runs_and_the_newest_finished() -> None:
    records = [record(n, JobPhase.SUCCEEDED) for n in range(1, 6)] + [record(6, JobPhase.RUNNING)]
    kept, dropped = trim_history(records, 2)
    assert [r.number for r in kept] == [4, 5, 6]
    assert [r.number for r in dropped] == [1, 2, 3]
