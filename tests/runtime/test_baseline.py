"""The classical baseline: fitted on the run's own split, and shown beside the fine-tuned model by `kubetune run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kubetune.cli.run import EXIT_OK
from kubetune.runtime import baseline as classical
from kubetune.runtime.baseline import IMAGE_MODEL, TEXT_MODEL, fit_baseline
from kubetune.runtime.contract import RunSpec, Task
from kubetune.runtime.contract.report import BaselineReport, RunReport
from kubetune.runtime.data.load import Examples, TaskData, load_data
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.reporting.base import read_events

from .conftest import make_spec

pytestmark = pytest.mark.runtime

ROOT = Path(__file__).resolve().parents[2]
KUBETUNE = Path(sys.executable).with_name("kubetune")


def topics_data(topics_jsonl: Path, tmp_path: Path) -> TaskData:
    spec = make_spec(tmp_path / "no-model", topics_jsonl, tmp_path / "out")
    return load_data(spec, RuntimeSettings(cache_dir=tmp_path / "cache"))


def test_the_text_baseline_is_fitted_on_the_training_split_and_measured_on_the_test_split(
    topics_jsonl: Path, tmp_path: Path
) -> None:
    data = topics_data(topics_jsonl, tmp_path)
    report = fit_baseline(Task.TEXT_CLASSIFICATION, data, seed=13)
    assert report.model == TEXT_MODEL and report.skipped is None
    assert (report.train_examples, report.test_examples) == (len(data.train), len(data.test)) == (256, 32)
    assert set(report.metrics) == {"accuracy", "f1", "loss"}
    accuracy, loss = report.metrics["accuracy"], report.metrics["loss"]
    assert accuracy is not None and accuracy > 0.8  # topics with their own words: a linear model reads them
    assert loss is not None and 0 < loss < 1.4  # below a uniform guess over four labels (ln 4)
    again = fit_baseline(Task.TEXT_CLASSIFICATION, data, seed=13)
    assert again.metrics == report.metrics  # deterministic


def test_a_large_training_split_is_sampled_to_the_bound(
    topics_jsonl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classical, "MAX_TRAIN_TEXTS", 100)
    data = topics_data(topics_jsonl, tmp_path)
    report = fit_baseline(Task.TEXT_CLASSIFICATION, data, seed=13)
    assert (report.train_examples, report.test_examples) == (100, 32)


def test_a_label_never_seen_in_training_costs_the_baseline_its_examples(topics_jsonl: Path, tmp_path: Path) -> None:
    data = topics_data(topics_jsonl, tmp_path)
    without_last = [i for i, label in enumerate(data.train.label_ids) if label != 3]
    narrowed = TaskData(data.train.subset(without_last), data.validation, data.test, data.labels, data.sources)
    report = fit_baseline(Task.TEXT_CLASSIFICATION, narrowed, seed=13)
    unseen = data.test.label_ids.count(3)
    accuracy = report.metrics["accuracy"]
    assert unseen and accuracy is not None and accuracy <= 1 - unseen / len(data.test)
    assert report.metrics["loss"] is not None  # the unseen label's examples count at the clipped probability


def test_the_image_baseline_reads_downsampled_pixels(tmp_path: Path) -> None:
    from PIL import Image

    def images(color: tuple[int, int, int], count: int, name: str) -> list[str]:
        paths = []
        for index in range(count):
            path = tmp_path / f"{name}-{index}.png"
            shade = tuple(max(0, value - 5 * index) for value in color)
            Image.new("RGB", (40 + index, 30), shade).save(path)
            paths.append(str(path))
        return paths

    def split(count: int, name: str) -> Examples:
        return Examples(images((200, 20, 20), count, f"{name}-red") + images((20, 20, 200), count, f"{name}-blue"),
                        [0] * count + [1] * count)  # fmt: skip

    data = TaskData(split(8, "train"), split(1, "validation"), split(3, "test"), ["red", "blue"], {})
    report = fit_baseline(Task.IMAGE_CLASSIFICATION, data, seed=1)
    assert (report.model, report.train_examples, report.test_examples) == (IMAGE_MODEL, 16, 6)
    assert report.metrics["accuracy"] == 1.0


def test_no_baseline_for_causal_lm_and_the_report_says_why() -> None:
    empty = Examples([], [])
    chat = Examples([{"prompt": "hi", "completion": "hello"}], [])
    data = TaskData(chat, empty, chat, [], {})
    report = fit_baseline(Task.CAUSAL_LM, data, seed=1)
    assert report == BaselineReport(
        skipped="causal-lm has no classical baseline: it is measured for classification tasks only"
    )
    one_label = TaskData(Examples(["a", "b"], [0, 0]), empty, Examples(["c"], [1]), ["x", "y"], {})
    assert "single label" in (fit_baseline(Task.TEXT_CLASSIFICATION, one_label, seed=1).skipped or "")


def _seeded_hub_cache(folder: Path) -> None:
    """MiniLM in a Hugging Face cache, as the example names it (hf://), from the package that ships it."""
    subprocess.run([sys.executable, ROOT / "scripts" / "seed_hf_cache.py", folder], check=True, timeout=120)


def test_kubetune_run_shows_the_baseline_beside_the_fine_tuned_model(tmp_path: Path) -> None:
    """The text-classification example: the console table, the events' report and kubetune.json carry the
    baseline, fitted on the split the fine-tuned model trained on and measured on its test split; the
    example's gate promotes the fine-tuned model only as it beats the baseline."""
    _seeded_hub_cache(tmp_path / "hf" / "hub")
    output = tmp_path / "tickets-run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(KUBETUNE), "run", "examples/text-classification/finetunejob.yaml", "--no-serve",
               "--output", str(output), "--workers", "1"]  # fmt: skip
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == EXIT_OK, run
    out = run.stdout
    # The example's gate asks the fine-tuned model to beat the baseline (promotion.minBaselineImprovement).
    promoted = [line for line in out.splitlines() if line.startswith("promoted:")]
    assert promoted and "classical baseline" in promoted[0], out

    manifest = json.loads((output / "kubetune.json").read_text())
    baseline = manifest["baseline"]
    examples = manifest["training"]["examples"]
    assert baseline["model"] == TEXT_MODEL
    assert (baseline["trainExamples"], baseline["testExamples"]) == (examples["train"], examples["test"]) == (210, 60)
    assert manifest["metrics"]["baseline"] == baseline["metrics"]
    assert set(baseline["metrics"]) == set(manifest["metrics"]["after"]) == {"accuracy", "f1", "loss"}

    events = read_events(output / "events.jsonl")
    result = RunReport.model_validate(events[-1]["result"])
    assert result.baseline == BaselineReport.model_validate(baseline)
    assert any(e["event"] == "metrics" and e["split"] == "test-baseline" for e in events)

    # The table: base model, baseline, fine-tuned, the baseline's row with its numbers as reported.
    rows = [line for line in out.splitlines() if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in rows]
    assert names[:3] == ["base model", f"baseline ({TEXT_MODEL})", "fine-tuned"], out
    assert f"{baseline['metrics']['accuracy']:.4f}" in rows[1]
    assert "test-baseline (step 0): accuracy" in out

    # The same split: the example's data, loaded as the run loaded it, gives the same baseline.
    spec = RunSpec.model_validate(manifest["lineage"]["spec"])
    data = load_data(spec, RuntimeSettings(cache_dir=tmp_path / "cache"))
    refitted = fit_baseline(spec.model.task, data, spec.hyperparameters.seed)
    assert refitted.metrics == baseline["metrics"]
    assert refitted.test_examples == len(data.test)
