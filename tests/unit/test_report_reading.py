"""Which report ConfigMaps the operator reads, and what it keeps of them: ownership and size before parsing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubetune.operator.api.finetunejob import MAX_ARTIFACTS, MAX_METRICS
from kubetune.operator.observe.reports import (
    HYPERPARAMETERS_MAX_BYTES,
    REPORT_MAX_BYTES,
    Refusal,
    Refused,
    Report,
    bounded_report,
    read_report,
)
from kubetune.runtime.contract.common import (
    ERROR_MAX_LENGTH,
    MESSAGE_MAX_LENGTH,
    SHORT_TEXT_MAX_LENGTH,
    URI_MAX_LENGTH,
)
from kubetune.runtime.contract.report import REPORT_KEY, BaselineReport, RunReport, Stage, VariantReport

JOB = "tickets"
OWNER = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": JOB, "uid": "u-1", "controller": True}
DONE = '{"stage": "done", "metricsAfter": {"accuracy": 0.9}}'


def config_map(
    text: str | None = DONE, owners: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": f"{JOB}-r3-report",
        "labels": {"kubetune.io/finetunejob": JOB, "kubetune.io/run": "3"} if labels is None else labels,
        "ownerReferences": [OWNER] if owners is None else owners,
    }
    return {"metadata": meta, "data": {} if text is None else {REPORT_KEY: text}}


def variants_text(count: int) -> str:
    """A report with `count` variants, each as small as the model takes (~20 bytes)."""
    return json.dumps({"stage": "done", "variants": {f"{i:x}": {"uri": ""} for i in range(count)}})


CASES: list[tuple[str, dict[str, Any], Refusal | None]] = [
    ("the run's own report", config_map(), None),
    ("no controller reference", config_map(owners=[]), Refusal.NOT_OWNED),
    ("a FineTuneJob owner that is not the controller", config_map(owners=[{**OWNER, "controller": False}]),
     Refusal.NOT_OWNED),
    ("a controller of another kind", config_map(owners=[{**OWNER, "kind": "Deployment"}]), Refusal.NOT_OWNED),
    ("a FineTuneJob of another group", config_map(owners=[{**OWNER, "apiVersion": "evil.io/v1"}]),
     Refusal.NOT_OWNED),
    ("a controller that is not the job the label names", config_map(owners=[{**OWNER, "name": "other"}]),
     Refusal.NOT_OWNED),
    ("a controller without a UID", config_map(owners=[{**OWNER, "uid": ""}]), Refusal.NOT_OWNED),
    ("no job label", config_map(labels={"kubetune.io/run": "3"}), Refusal.NOT_OWNED),
    ("another object's controller first", config_map(owners=[{**OWNER, "kind": "Pod"}, OWNER]), Refusal.NOT_OWNED),
    ("a plain owner besides the job", config_map(owners=[{**OWNER, "kind": "Pod", "controller": False}, OWNER]),
     None),
    ("any version of kubetune's group", config_map(owners=[{**OWNER, "apiVersion": "kubetune.io/v1"}]), None),
    ("one byte over the cap", config_map(DONE[:-1] + " " * (REPORT_MAX_BYTES - len(DONE) + 1) + "}"),
     Refusal.TOO_LARGE),
    ("exactly the cap", config_map(DONE[:-1] + " " * (REPORT_MAX_BYTES - len(DONE)) + "}"), None),
    ("fewer characters than the cap but more bytes",
     config_map('{"stage": "done", "message": "' + "é" * (REPORT_MAX_BYTES // 2) + '"}'), Refusal.TOO_LARGE),
    ("50,000 variants near the ConfigMap limit", config_map(variants_text(50_000)), Refusal.TOO_LARGE),
    ("a huge report of nobody's: refused for its owner first", config_map(variants_text(50_000), owners=[]),
     Refusal.NOT_OWNED),
    ("no run label", config_map(labels={"kubetune.io/finetunejob": JOB}), Refusal.MALFORMED),
    ("a run label that is not a number", config_map(labels={"kubetune.io/finetunejob": JOB, "kubetune.io/run": "x"}),
     Refusal.MALFORMED),
    ("not JSON", config_map("{stage"), Refusal.MALFORMED),
    ("not a report", config_map('{"stage": "dancing"}'), Refusal.MALFORMED),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "refusal"), CASES, ids=[case for case, _, _ in CASES])
def test_what_is_read_of_a_report_config_map(case: str, body: dict[str, Any], refusal: Refusal | None) -> None:
    seen = read_report(body)
    if refusal is None:
        assert isinstance(seen, Report), seen
        assert (seen.number, seen.owner_uid) == (3, body["metadata"]["ownerReferences"][-1]["uid"])
    else:
        assert isinstance(seen, Refused) and seen.reason == refusal, seen
        assert len(seen.detail) <= MESSAGE_MAX_LENGTH


@pytest.mark.parametrize("body", [config_map(None), config_map(""), {"metadata": {"name": "x"}}])
def test_a_report_not_written_yet_is_nothing(body: dict[str, Any]) -> None:
    assert read_report(body) is None


def test_what_is_refused_is_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(*_: object, **__: object) -> RunReport:
        raise AssertionError("parsed")

    monkeypatch.setattr(RunReport, "model_validate_json", parse)
    for body in (config_map(variants_text(50_000)), config_map(owners=[]), config_map(owners=[{**OWNER, "name": "x"}])):
        assert isinstance(read_report(body), Refused)


def metrics(count: int, length: int = 12) -> dict[str, float | None]:
    return {f"m{i:03d}".ljust(length, "x"): 0.5 for i in range(count)}


BOUNDS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("variants: MAX_ARTIFACTS, by name", {"variants": {f"v{i:03d}": {"uri": "u"} for i in range(500)}},
     {"variants": [f"v{i:03d}" for i in range(MAX_ARTIFACTS)]}),
    ("a variant whose URI is over a URI's length is left out",
     {"variants": {"a": {"uri": "u" * (URI_MAX_LENGTH + 1)}, "b": {"uri": "u"}}}, {"variants": ["b"]}),
    ("a variant whose name is over a short text is left out",
     {"variants": {"n" * (SHORT_TEXT_MAX_LENGTH + 1): {"uri": "u"}, "b": {"uri": "u"}}}, {"variants": ["b"]}),
    ("a variant's metrics: MAX_METRICS", {"variants": {"full": {"uri": "u", "metrics": metrics(100)}}},
     {"variant_metrics": MAX_METRICS}),
    ("metrics: MAX_METRICS, kubetune's own first",
     {"metricsAfter": {**metrics(100), "accuracy": 0.9, "loss": None}, "metricsBefore": metrics(40)},
     {"metrics_after": MAX_METRICS, "metrics_before": MAX_METRICS, "kept": ["accuracy", "loss"]}),
    ("a metric name over a short text is left out", {"metricsAfter": metrics(2, SHORT_TEXT_MAX_LENGTH + 1)},
     {"metrics_after": 0}),
    ("hyperparameters over the record's cap are left out",
     {"bestHyperparameters": {"x": "y" * HYPERPARAMETERS_MAX_BYTES}}, {"hyperparameters": False}),
    ("small hyperparameters are kept", {"bestHyperparameters": {"learningRate": 0.001}}, {"hyperparameters": True}),
    ("a manifest URI over a URI's length is left out", {"manifestUri": "s3://b/" + "x" * URI_MAX_LENGTH},
     {"manifest": False}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "fields", "expected"), BOUNDS, ids=[case for case, _, _ in BOUNDS])
def test_a_report_is_cut_to_what_a_run_record_holds(
    case: str, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    seen = read_report(config_map(json.dumps({"stage": "done", **fields})))
    assert isinstance(seen, Report), seen
    report = seen.report
    assert report is not None
    if "variants" in expected:
        assert list(report.variants or {}) == expected["variants"]
    if "variant_metrics" in expected:
        assert report.variants is not None and len(report.variants["full"].metrics) == expected["variant_metrics"]
    if "metrics_after" in expected:
        assert len(report.metrics_after or {}) == expected["metrics_after"]
    if "metrics_before" in expected:
        assert len(report.metrics_before or {}) == expected["metrics_before"]
    for name in expected.get("kept", []):
        assert name in (report.metrics_after or {})
    if "hyperparameters" in expected:
        assert (report.best_hyperparameters is not None) == expected["hyperparameters"]
    if "manifest" in expected:
        assert (report.manifest_uri is not None) == expected["manifest"]


def largest_legitimate_report() -> RunReport:
    """Every field at the largest a run record keeps: what the cap on the text must let through."""
    most = {f"metric-{i:02d}".ljust(32, "m"): 0.123456789012345 for i in range(MAX_METRICS)}

    def uri(name: str) -> str:
        return f"s3://bucket/{name}/".ljust(URI_MAX_LENGTH, "x")

    variant = {"size_bytes": 10**12, "latency_ms_p50": 12.5, "metrics": most, "accepted": False}
    return RunReport(
        stage=Stage.DONE,
        step=10**6,
        total_steps=10**6,
        epoch=3.0,
        loss=0.1,
        trials_completed=100,
        trials_total=100,
        message="m" * MESSAGE_MAX_LENGTH,
        metrics_before=most,
        metrics_after=most,
        baseline=BaselineReport(
            model="m" * SHORT_TEXT_MAX_LENGTH,
            metrics=most,
            train_examples=10**9,
            test_examples=10**9,
            seconds=12345.678,
            skipped="s" * MESSAGE_MAX_LENGTH,
        ),
        variants={
            f"variant-{i:02d}": VariantReport(uri=uri(str(i)), reason="r" * MESSAGE_MAX_LENGTH, **variant)
            for i in range(MAX_ARTIFACTS)
        },
        best_variant="b" * SHORT_TEXT_MAX_LENGTH,
        manifest_uri=uri("manifest"),
        best_hyperparameters={f"k{i}": "v" * 40 for i in range(80)},  # just under the record's cap
        error="e" * ERROR_MAX_LENGTH,
        invalid_field="f" * SHORT_TEXT_MAX_LENGTH,
    )


def test_the_largest_legitimate_report_fits_the_cap_and_is_kept_whole() -> None:
    report = largest_legitimate_report()
    text = json.dumps(report.to_wire(), sort_keys=True)  # as the runtime writes it
    assert len(text) < REPORT_MAX_BYTES, len(text)
    seen = read_report(config_map(text))
    assert isinstance(seen, Report) and seen.report == report
    assert bounded_report(report) == report
