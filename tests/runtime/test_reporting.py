"""Reporters: the ConfigMap reporter against a fake Kubernetes API, the console, and the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.contract import RunIdentity
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage, Unavailable, VariantReport
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.base import (
    JsonLinesReporter,
    TrainingProgress,
    TrialBoard,
    TrialRow,
    TrialState,
    read_events,
)
from kubetune.runtime.reporting.console import LINE_INTERVAL_S, ConsoleReporter
from kubetune.runtime.reporting.kube_reporter import ConfigMapReporter, kubernetes_reporter
from rich.console import Console

from .conftest import fast_options, make_spec, manifest_file, spec_document, variants_of

pytestmark = pytest.mark.runtime


class FakeCoreV1:
    """Records patches like the API server would apply them; can fail on demand."""

    def __init__(self, failures: int = 0) -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.failures = failures

    def patch_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any], **options: Any) -> None:
        # As CoreV1Api takes them: a JSON merge patch (its default would be a JSON patch), bounded in time.
        assert options == {"_content_type": "application/merge-patch+json", "_request_timeout": 10.0}
        if self.failures:
            self.failures -= 1
            raise ConnectionError("apiserver unavailable")
        self.patches.append((name, namespace, body))

    def reports(self) -> list[RunReport]:
        return [RunReport.model_validate(json.loads(body["data"][REPORT_KEY])) for _, _, body in self.patches]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _progress(step: int, total: int = 10) -> TrainingProgress:
    return TrainingProgress(
        step=step, total_steps=total, epoch=step / 5, loss=1.0 / step, learning_rate=1e-3,
        epochs=2, epoch_steps=5, samples_per_second=12.5,
    )  # fmt: skip


def _board(done: int, total: int) -> TrialBoard:
    rows = [
        TrialRow(f"t{i}", TrialState.DONE if i < done else TrialState.RUNNING, {"learningRate": 0.001 * (i + 1)})
        for i in range(total)
    ]
    return TrialBoard("accuracy", rows, total)


def _result() -> RunReport:
    return RunReport(
        stage=Stage.DONE,
        metrics_before={"accuracy": 0.25},
        metrics_after={"accuracy": 0.9},
        variants={
            "full": VariantReport(uri="s3://b/run/variants/full", size_bytes=100, metrics={"accuracy": 0.9}),
            "int8": VariantReport(uri="s3://b/run/variants/int8", size_bytes=25, accepted=False, reason="too lossy"),
        },
        best_variant="full",
        manifest_uri="s3://b/run/kubetune.json",
        spec_digest="0" * 64,
        step=10,
        best_hyperparameters={"learningRate": 0.001},
    )


def test_configmap_reporter_throttles_progress_but_not_stages_or_the_result() -> None:
    api, clock = FakeCoreV1(), Clock()
    reporter = ConfigMapReporter(api, "run-1-report", "ml", min_interval_s=5.0, clock=clock)
    reporter.stage_started(Stage.TRAIN, "lora on 2 workers")
    for step in range(1, 6):
        clock.now += 1.0
        reporter.progress(_progress(step))
    assert len(api.patches) == 2  # the stage, then one progress write 5 s later
    assert api.reports()[-1].step == 5
    clock.now += 1.0
    reporter.progress(_progress(6))
    assert len(api.patches) == 2  # throttled
    reporter.metrics("test-before", {"accuracy": 0.25}, 0)  # test metrics are written at once
    reporter.progress(_progress(10))  # the last step always goes out
    reporter.result(_result())
    reports = api.reports()
    assert all(name == "run-1-report" and namespace == "ml" for name, namespace, _ in api.patches)
    final = reports[-1]
    assert final.stage == Stage.DONE and final.step == 10
    assert final.metrics_before == {"accuracy": 0.25} and final.metrics_after == {"accuracy": 0.9}
    assert final.variants is not None and final.variants["int8"].reason == "too lossy"
    assert final.best_variant == "full" and final.manifest_uri == "s3://b/run/kubetune.json"
    assert final.best_hyperparameters == {"learningRate": 0.001}
    # camelCase on the wire, as the operator reads it.
    wire = json.loads(api.patches[-1][2]["data"][REPORT_KEY])
    assert {"metricsBefore", "bestVariant", "manifestUri", "updatedAt"} <= set(wire)


def test_configmap_reporter_survives_api_errors_and_reports_failure() -> None:
    api = FakeCoreV1(failures=1)
    reporter = ConfigMapReporter(api, "r", "ns", min_interval_s=0.0)
    reporter.stage_started(Stage.LOAD)  # first attempt fails, the retry lands
    assert len(api.patches) == 1
    reporter.trials(_board(2, 4))
    reporter.failed("data.train: no examples in s3://b/x.jsonl")
    final = api.reports()[-1]
    assert final.stage == Stage.FAILED and final.error == "data.train: no examples in s3://b/x.jsonl"
    assert (final.trials_completed, final.trials_total) == (2, 4)


def test_configmap_reporter_says_what_a_failed_run_could_not_reach() -> None:
    api = FakeCoreV1()
    reporter = ConfigMapReporter(api, "r", "ns", min_interval_s=0.0)
    reporter.failed("model.uri: cannot reach the model hub at http://h", unavailable=Unavailable.MODEL_HUB)
    wire = json.loads(api.patches[-1][2]["data"][REPORT_KEY])
    assert (wire["stage"], wire["unavailable"], "invalidField" in wire) == ("failed", "ModelHub", False)


def test_no_kubernetes_reporter_for_a_local_run() -> None:
    assert kubernetes_reporter(RunIdentity()) is None
    assert kubernetes_reporter(RunIdentity(namespace="ml")) is None


def test_console_reporter_shows_progress_and_the_result() -> None:
    """Captured output (no terminal): a line per epoch, per trial change and per variant, then the table."""
    stream = StringIO()
    clock = Clock()
    reporter = ConsoleReporter(Console(file=stream, width=160, force_terminal=False), clock=clock)
    reporter.stage_started(Stage.TRAIN, "lora")
    reporter.progress(_progress(3))  # mid-epoch, moments after the start: no line
    clock.now += 1
    reporter.progress(_progress(5))  # the epoch's last step
    clock.now += 1
    reporter.progress(_progress(6))
    clock.now += LINE_INTERVAL_S + 1
    reporter.progress(_progress(8))  # a long epoch: a line with its ETA
    reporter.progress(_progress(10))
    reporter.trials(_board(0, 2))
    reporter.trials(_board(1, 2))
    reporter.trials(_board(1, 2))  # nothing changed: no new line
    reporter.variant("int8", variants_of(_result())["int8"])
    reporter.result(_result())
    text = stream.getvalue()
    lines = text.splitlines()
    assert "train" in text and "lora" in text
    assert [line.strip() for line in lines if line.strip().startswith("epoch")] == [
        "epoch 1/2: step 5/5, loss 0.2000, 12.5 samples/s, 1 s",
        "epoch 2/2: step 3/5, loss 0.1250, 12.5 samples/s, ETA 11 s",
        "epoch 2/2: step 5/5, loss 0.1000, 12.5 samples/s, 16 s",
    ]
    trial_lines = [line.strip() for line in lines if line.strip().startswith("trial")]
    assert trial_lines == [
        "trial t0 running (0/2 done): learningRate 0.001",
        "trial t1 running (0/2 done): learningRate 0.002",
        "trial t0 done (1/2 done): learningRate 0.001",
    ]
    assert "int8: 0.0 MB, p50 — ms, not accepted: too lossy" in text
    assert "0.2500" in text and "0.9000" in text  # the base and fine-tuned rows
    assert "no: too lossy" in text and "full (best)" in text
    assert "s3://b/run/kubetune.json" in text


def test_console_reporter_on_a_terminal_draws_bars_and_a_trial_table() -> None:
    stream = StringIO()
    reporter = ConsoleReporter(Console(file=stream, width=160, force_terminal=True, color_system=None))
    reporter.progress(_progress(3))
    reporter.progress(_progress(7))
    reporter.metrics("validation", {"accuracy": 0.5}, 7)
    reporter.trials(_board(1, 2))
    reporter.result(_result())
    text = stream.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "12.5 samples/s" in text
    assert "search: 1/2 trials done" in text and "learningRate 0.001" in text
    assert "validation (step 7): accuracy 0.5000" in text


def _entry_point(config: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune.runtime.recipe.finetune", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )


def test_entry_point_rejects_an_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"spec": {"model": {"uri": "m"}, "data": {}, "output": {"uri": "o"}}}))
    finished = _entry_point(config)
    assert finished.returncode == 2
    assert "spec.data.train: required field is missing" in finished.stderr


def test_entry_point_runs_a_config_end_to_end(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    import os

    document = spec_document(
        tiny_bert_dir,
        topics_jsonl,
        tmp_path / "out",
        method={"type": "full"},
        hyperparameters={"epochs": 1, "batchSize": 32},
        compression={"quantization": {"method": "none"}},
    )
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "spec": document,
                "run": {"jobName": "topics", "runNumber": 3},
                "resources": {"workers": 1, "cpusPerWorker": 0.45},
            }
        )
    )
    # The command joins the test session's Ray, as a RayJob's entry point joins its cluster.
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_session,
        "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
    }
    finished = _entry_point(config, "--result", str(tmp_path / "result.json"), env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = RunReport.model_validate_json((tmp_path / "result.json").read_text())
    manifest = json.loads(manifest_file(result).read_text())
    assert manifest["run"] == {"jobName": "topics", "runNumber": 3}
    assert "results (test set)" in finished.stdout
    # The stages ran in Ray, the baseline in the driver: the manifest the stage wrote still carries it.
    assert result.baseline is not None and result.baseline.test_examples == 32
    assert manifest["metrics"]["baseline"] == result.baseline.metrics and manifest["baseline"]["model"]
    assert "test-baseline (step 0): accuracy" in finished.stdout


def test_a_run_that_cannot_work_reports_which_field(tmp_path: Path, model_dir: Path, topics_jsonl: Path) -> None:
    """The report names the field, so the operator stops the run instead of letting KubeRay retry it."""
    spec = make_spec(model_dir, topics_jsonl, tmp_path / "out", method={"type": "qlora"})
    events_file = tmp_path / "events.jsonl"
    with pytest.raises(InvalidRunError):
        run_pipeline(spec, fast_options(tmp_path / "out"), JsonLinesReporter(events_file))
    (failed,) = [event for event in read_events(events_file) if event["event"] == "failed"]
    assert failed["invalidField"] == "method.type" and "qlora needs a CUDA GPU" in failed["message"]
    api = FakeCoreV1()
    reporter = ConfigMapReporter(api, "r", "ns", min_interval_s=0.0)
    reporter.failed(failed["message"], failed["invalidField"])
    assert api.reports()[-1].invalid_field == "method.type"
