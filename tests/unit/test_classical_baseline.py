"""The classical baseline beside the fine-tuned model: report, manifest, status mirroring, gate and console."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from kubetune.operator import crdgen
from kubetune.operator.api.finetunejob import FineTuneJob, GateReason, JobPhase, RunRecord, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.observe.reports import Report, bounded_report, read_report, with_report
from kubetune.operator.status.gate import gate
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.manifest import ArtifactManifest, ManifestMetrics
from kubetune.runtime.contract.report import REPORT_KEY, BaselineReport, RunReport, Stage
from kubetune.runtime.reporting.console import ConsoleReporter, baseline_line, results_table
from pydantic import ValidationError
from rich.console import Console

from ..conftest import mutated

TFIDF = BaselineReport(
    model="tfidf-logistic-regression",
    metrics={"accuracy": 0.95, "f1": 0.94, "loss": 0.3},
    train_examples=80,
    test_examples=20,
    seconds=0.4,
)
SKIPPED = BaselineReport(skipped="causal-lm has no classical baseline: it is measured for classification tasks only")


def record(**extra: Any) -> RunRecord:
    return RunRecord(number=2, ray_job_name="job-r2", trigger=Trigger.SPEC_CHANGE, spec_generation=1, **extra)


def job_with(minimal_job: dict[str, Any], promotion: dict[str, Any]) -> FineTuneJob:
    job = parse(mutated(minimal_job, "spec.promotion", promotion))
    assert isinstance(job, FineTuneJob)
    return job


def done(baseline: BaselineReport | None, after: float = 0.97) -> RunReport:
    return RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": 0.2, "f1": 0.1, "loss": 1.6},
        metrics_after={"accuracy": after, "f1": 0.96, "loss": 0.2},
        baseline=baseline,
    )


def finished_record(report: RunReport) -> RunRecord:
    return with_report(record(phase=JobPhase.SUCCEEDED), report, "s3://bucket/run")


def test_the_report_carries_the_baseline_on_the_wire_and_back() -> None:
    wire = done(TFIDF).to_wire()
    assert wire["baseline"] == {
        "model": "tfidf-logistic-regression",
        "metrics": {"accuracy": 0.95, "f1": 0.94, "loss": 0.3},
        "trainExamples": 80,
        "testExamples": 20,
        "seconds": 0.4,
    }
    assert RunReport.model_validate(wire) == done(TFIDF)
    with pytest.raises(ValidationError, match="testExamples"):
        BaselineReport.model_validate({"testExamples": -1})


def test_the_operator_reads_the_baseline_from_the_report_config_map_within_bounds() -> None:
    many = {f"extra-{i:02d}": 0.5 for i in range(40)}
    report = done(TFIDF.model_copy(update={"metrics": {**TFIDF.metrics, **many}}))
    meta = {
        "name": "tickets-r2-report",
        "labels": {"kubetune.io/finetunejob": "tickets", "kubetune.io/run": "2"},
        "ownerReferences": [
            {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "tickets", "uid": "u"}
            | {"controller": True}
        ],
    }
    seen = read_report({"metadata": meta, "data": {REPORT_KEY: json.dumps(report.to_wire())}})
    assert isinstance(seen, Report) and seen.report is not None and seen.report.baseline is not None
    kept = seen.report.baseline.metrics
    assert len(kept) == 32 and {"accuracy", "f1", "loss"} <= set(kept)  # kubetune's own metrics first
    assert bounded_report(done(TFIDF)) == done(TFIDF)


def test_the_status_mirrors_the_baseline_beside_the_base_and_fine_tuned_metrics() -> None:
    mirrored = finished_record(done(TFIDF))
    assert mirrored.metrics_baseline == {"accuracy": 0.95, "f1": 0.94, "loss": 0.3}
    assert mirrored.baseline_model == "tfidf-logistic-regression"
    assert mirrored.baseline_skipped is None
    assert mirrored.to_wire()["metricsBaseline"] == mirrored.metrics_baseline

    skipped = finished_record(done(SKIPPED))
    assert (skipped.metrics_baseline, skipped.baseline_model) == (None, None)
    assert skipped.baseline_skipped == SKIPPED.skipped

    diverged = finished_record(done(TFIDF.model_copy(update={"metrics": {"accuracy": 0.9, "loss": None}})))
    assert diverged.metrics_baseline == {"accuracy": 0.9}
    assert diverged.not_finite == ["metricsBaseline.loss"]

    assert finished_record(done(None)).metrics_baseline is None  # a report from before the baseline


# (promotion spec, fine-tuned accuracy, report's baseline, verdict, message fragment)
BASELINE_GATE_CASES = [
    ({}, 0.9, TFIDF, GateReason.PASSED, "accuracy 0.9 (base 0.2)"),  # the rule is off by default
    ({"minBaselineImprovement": 0}, 0.97, TFIDF, GateReason.PASSED, "classical baseline 0.95"),
    ({"minBaselineImprovement": 0}, 0.95, TFIDF, GateReason.PASSED, "accuracy 0.95"),  # as good is enough at 0
    (
        {"minBaselineImprovement": 0},
        0.9,
        TFIDF,
        GateReason.BASELINE_NOT_BEATEN,
        "accuracy 0.9 beats the classical baseline tfidf-logistic-regression (0.95) by -0.05, "
        "less than promotion.minBaselineImprovement 0",
    ),
    ({"minBaselineImprovement": 0.05}, 0.97, TFIDF, GateReason.BASELINE_NOT_BEATEN, "by 0.02, less than"),
    ({"minBaselineImprovement": 0}, 0.9, SKIPPED, GateReason.BASELINE_MISSING, "causal-lm has no classical baseline"),
    ({"minBaselineImprovement": 0}, 0.9, None, GateReason.BASELINE_MISSING, "reported no classical baseline accuracy"),
]


@pytest.mark.parametrize(("promotion", "after", "baseline", "reason", "fragment"), BASELINE_GATE_CASES)
def test_the_gate_can_ask_the_fine_tuned_model_to_beat_the_baseline(
    minimal_job: dict[str, Any],
    promotion: dict[str, Any],
    after: float,
    baseline: BaselineReport | None,
    reason: GateReason,
    fragment: str,
) -> None:
    verdict = gate(job_with(minimal_job, promotion), finished_record(done(baseline, after)))
    assert (verdict.passed, verdict.reason) == (reason == GateReason.PASSED, reason)
    assert fragment in verdict.message
    assert (verdict.value, verdict.baseline) == (after, 0.2)  # the base model's value stays where it was
    compared = "minBaselineImprovement" in promotion and baseline is not None and baseline.metrics
    assert verdict.classical_baseline == (0.95 if compared else None)


def test_the_baseline_rule_follows_the_metrics_direction_and_refuses_a_diverged_baseline(
    minimal_job: dict[str, Any],
) -> None:
    on_loss = job_with(minimal_job, {"metric": "loss", "minBaselineImprovement": 0.05})
    assert gate(on_loss, finished_record(done(TFIDF))).passed is True  # 0.2 is 0.1 below the baseline's 0.3
    worse = done(TFIDF.model_copy(update={"metrics": {"loss": 0.22}}))
    verdict = gate(on_loss, finished_record(worse))
    assert (verdict.reason, verdict.classical_baseline) == (GateReason.BASELINE_NOT_BEATEN, 0.22)
    diverged = done(TFIDF.model_copy(update={"metrics": {"accuracy": None}}))
    refused = gate(job_with(minimal_job, {"minBaselineImprovement": 0}), finished_record(diverged))
    assert refused.reason == GateReason.METRIC_NOT_FINITE and "classical baseline" in refused.message


def test_the_gate_rule_is_described_and_optional(minimal_job: dict[str, Any]) -> None:
    assert job_with(minimal_job, {}).spec.promotion.min_baseline_improvement is None
    schema = crdgen.crd_for(crdgen.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    promotion = schema["properties"]["spec"]["properties"]["promotion"]["properties"]
    assert "classical baseline" in promotion["minBaselineImprovement"]["description"]
    record_fields = schema["properties"]["status"]["properties"]["runs"]["items"]["properties"]
    assert {"metricsBaseline", "baselineModel", "baselineSkipped"} <= set(record_fields)
    with pytest.raises(SpecError, match=r"spec\.promotion\.minBaselineImprovement"):
        parse(mutated(minimal_job, "spec.promotion", {"minBaselineImprovement": "a lot"}))


def render(report: RunReport) -> str:
    stream = StringIO()
    ConsoleReporter(Console(file=stream, width=200, force_terminal=False)).result(report)
    return stream.getvalue()


def test_the_console_table_shows_the_baseline_between_the_base_and_fine_tuned_models() -> None:
    text = render(done(TFIDF))
    rows = [line for line in text.splitlines() if "base model" in line or "baseline" in line or "fine-tuned" in line]
    assert [row.split("│")[1].strip() for row in rows] == [
        "base model",
        "baseline (tfidf-logistic-regression)",
        "fine-tuned",
    ]
    assert "0.9500" in rows[1] and "0.3000" in rows[1]
    assert "no classical baseline" not in text


def test_the_console_says_why_there_is_no_baseline() -> None:
    text = render(done(SKIPPED))
    assert "baseline (" not in text
    assert "no classical baseline: causal-lm has no classical baseline" in text
    assert baseline_line(done(None)) is None  # a report that says nothing of a baseline
    table = results_table(done(SKIPPED))
    assert [str(cell) for cell in table.columns[0].cells] == ["base model", "fine-tuned"]


def test_the_manifest_keeps_the_baseline_beside_the_metrics(tmp_path: Path) -> None:
    manifest = ArtifactManifest(
        metrics=ManifestMetrics(before={"accuracy": 0.2}, after={"accuracy": 0.97}, baseline=TFIDF.metrics),
        baseline=TFIDF,
    )
    manifest.save(tmp_path)
    document = json.loads((tmp_path / "kubetune.json").read_text())
    assert document["metrics"]["baseline"] == TFIDF.metrics
    assert document["baseline"]["model"] == "tfidf-logistic-regression"
    assert ArtifactManifest.load(tmp_path) == manifest
    older: dict[str, Any] = {"metrics": {"before": {}, "after": {}}}  # a manifest written before the baseline
    (tmp_path / "kubetune.json").write_text(json.dumps(older))
    loaded = ArtifactManifest.load(tmp_path)
    assert loaded is not None and loaded.baseline is None and loaded.metrics.baseline == {}
