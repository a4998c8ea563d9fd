"""End to end on CPU: MiniLM fine-tuned on generated topics with LoRA and fully, on 2 Ray Train workers."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubetune.runtime.contract import RunSpec, WorkerResources
from kubetune.runtime.contract.report import RunReport, VariantReport
from kubetune.runtime.data.load import load_data
from kubetune.runtime.evaluate import evaluate, predict
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.pipeline import RunOptions, run_pipeline
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events
from kubetune.runtime.variants.export import library_versions, spec_digest
from kubetune.runtime.variants.measure import MAX_SLOWDOWN

from .conftest import artifacts, finite, make_spec, manifest_file, variants_of

pytestmark = pytest.mark.runtime

# Fine-tuning must beat the base model (whose head is untrained) by at least this much accuracy.
REQUIRED_GAIN = 0.2


@dataclass(frozen=True)
class FinishedRun:
    spec: RunSpec
    result: RunReport
    output: Path
    events: Path

    @property
    def before(self) -> dict[str, float]:
        return finite(self.result.metrics_before)

    @property
    def after(self) -> dict[str, float]:
        return finite(self.result.metrics_after)

    @property
    def variants(self) -> dict[str, VariantReport]:
        return variants_of(self.result)


def _run(spec: RunSpec, output: Path) -> FinishedRun:
    events = output.parent / f"{output.name}-events.jsonl"
    # Latency is measured without torch.compile here: compiling costs more time than this tier has.
    settings = RuntimeSettings(cache_dir=output / "cache")
    options = RunOptions(resources=WorkerResources(workers=2), settings=settings)
    result = run_pipeline(spec, options, JsonLinesReporter(events))
    return FinishedRun(spec, result, output, events)


@pytest.fixture(scope="module")
def lora_run(
    ray_session: str, model_dir: Path, topics_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> FinishedRun:
    output = tmp_path_factory.mktemp("lora") / "out"
    return _run(make_spec(model_dir, topics_jsonl, output), output)


@pytest.fixture(scope="module")
def full_run(
    ray_session: str, model_dir: Path, topics_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> FinishedRun:
    output = tmp_path_factory.mktemp("full") / "out"
    spec = make_spec(
        model_dir,
        f"file://{topics_jsonl}",
        output,
        method={"type": "full"},
        hyperparameters={
            "learningRate": 1e-4,
            "epochs": 3,
            "evaluationsPerEpoch": 2,
            "earlyStopping": {"patience": 1},
            "gradientAccumulationSteps": 2,
            "lrSchedule": "cosine",
        },
        # Pruning 90% of the weights wrecks the model: the variant must be rejected, with the reason.
        compression={"quantization": {"method": "none"}, "pruning": {"method": "magnitude", "amount": 0.9}},
        output={"keepCheckpoints": 1},
    )
    return _run(spec, output)


def _accuracies(run: FinishedRun) -> tuple[float, float]:
    return run.before["accuracy"], run.after["accuracy"]


def test_lora_beats_the_base_model(lora_run: FinishedRun) -> None:
    before, after = _accuracies(lora_run)
    assert after >= before + REQUIRED_GAIN, (before, after)
    assert lora_run.after["f1"] >= lora_run.before["f1"] + REQUIRED_GAIN
    assert lora_run.result.step == 16  # 2 epochs x 256 examples / 2 workers / batch 16
    assert set(artifacts(lora_run.result)) == {"full", "merged", "int8"}


def test_int8_variant_is_small_and_judged_by_its_accuracy(lora_run: FinishedRun) -> None:
    variants = lora_run.variants
    int8, merged = variants["int8"], variants["merged"]
    assert int8.size_bytes is not None and merged.size_bytes is not None
    # Linear and embedding weights in int8: about a quarter of fp32.
    assert int8.size_bytes <= 0.35 * merged.size_bytes
    assert int8.latency_ms_p50 is not None and int8.latency_ms_p50 > 0
    int8_accuracy = int8.metrics["accuracy"]
    assert int8_accuracy is not None
    drop = lora_run.after["accuracy"] - int8_accuracy
    assert int8.accepted == (drop <= 0.01 + 1e-9), (drop, int8.reason)
    assert merged.latency_ms_p50 is not None
    deployable = int8.accepted and int8.latency_ms_p50 <= MAX_SLOWDOWN * merged.latency_ms_p50
    assert lora_run.result.best_variant == ("int8" if deployable else "merged")
    assert (int8.reason is None) == int8.accepted


def test_full_fine_tune_beats_the_base_model_and_stops_early(full_run: FinishedRun) -> None:
    before, after = _accuracies(full_run)
    assert after >= before + REQUIRED_GAIN, (before, after)
    assert set(artifacts(full_run.result)) == {"full", "pruned"}
    # Validation accuracy peaks early on this easy data; patience 1 then stops before 3 epochs.
    assert full_run.result.stopped_early
    assert full_run.result.epoch is not None and full_run.result.epoch < 3
    assert (
        full_run.result.step is not None and full_run.result.step < 3 * 4
    )  # 3 epochs of 8 batches, 2 per optimizer step
    checkpoints = [p for p in (full_run.output / "checkpoints" / "train").glob("checkpoint_*") if p.is_dir()]
    assert len(checkpoints) == 1  # keepCheckpoints


def test_heavily_pruned_variant_is_rejected_with_the_reason(full_run: FinishedRun) -> None:
    from kubetune.runtime.variants.pruning import sparsity
    from transformers import AutoModelForSequenceClassification

    pruned = full_run.variants["pruned"]
    assert not pruned.accepted
    assert pruned.reason is not None and "accuracy dropped by" in pruned.reason and "maxAccuracyDrop" in pruned.reason
    assert full_run.result.best_variant == "full"
    model = AutoModelForSequenceClassification.from_pretrained(pruned.uri)
    assert sparsity(model) == pytest.approx(0.9, abs=0.01)


def _test_split(run: FinishedRun):  # type: ignore[no-untyped-def]
    return load_data(run.spec, RuntimeSettings())


@pytest.mark.parametrize("run_name", ["lora_run", "full_run"])
def test_exported_variants_reproduce_the_reported_metrics(run_name: str, request: pytest.FixtureRequest) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run: FinishedRun = request.getfixturevalue(run_name)
    data = _test_split(run)
    plain = "merged" if "merged" in artifacts(run.result) else "full"
    folder = Path(artifacts(run.result)[plain])
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    metrics = evaluate(
        model, tokenizer, data.test, len(data.labels), run.spec.hyperparameters.resolved_max_sequence_length
    )
    assert metrics["accuracy"] == run.after["accuracy"]
    assert metrics["f1"] == run.after["f1"]
    assert metrics["loss"] == pytest.approx(run.after["loss"], abs=1e-4)
    assert model.config.id2label == dict(enumerate(data.labels))


def test_the_adapter_and_the_merged_model_predict_alike(lora_run: FinishedRun, model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = _test_split(lora_run)
    length = lora_run.spec.hyperparameters.resolved_max_sequence_length
    merged_folder = Path(artifacts(lora_run.result)["merged"])
    tokenizer = AutoTokenizer.from_pretrained(merged_folder)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_folder)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(data.labels))
    adapter = PeftModel.from_pretrained(base, artifacts(lora_run.result)["full"])
    assert (
        predict(adapter, tokenizer, data.test, length).label_ids
        == predict(merged, tokenizer, data.test, length).label_ids
    )


def test_manifest_records_lineage_and_metrics(lora_run: FinishedRun, topics_jsonl: Path) -> None:
    manifest = json.loads(manifest_file(lora_run.result).read_text())
    lineage = manifest["lineage"]
    assert lineage["specDigest"] == spec_digest(lora_run.spec) == lora_run.result.spec_digest
    assert lineage["baseModel"]["uri"] == lora_run.spec.model.uri
    assert lineage["data"] == {
        "train": str(topics_jsonl),
        "validation": f"{topics_jsonl}#validation",
        "test": f"{topics_jsonl}#test",
    }
    assert {"torch", "transformers", "peft", "ray"} <= set(lineage["libraries"])
    assert lineage["libraries"] == library_versions()
    assert RunSpec.model_validate(lineage["spec"]) == lora_run.spec
    assert manifest["hyperparameters"]["learningRate"] == lora_run.spec.hyperparameters.learning_rate
    assert manifest["metrics"]["before"] == lora_run.result.metrics_before
    assert manifest["metrics"]["after"] == lora_run.result.metrics_after
    variants = manifest["variants"]
    assert variants["merged"]["format"] == "hf" and variants["full"]["format"] == "peft-adapter"
    assert variants["int8"]["format"] == "hf-torchao"
    assert manifest["bestVariant"] == lora_run.result.best_variant
    for name, variant in variants.items():
        reported = lora_run.variants[name]
        assert (variant["sizeBytes"], variant["accepted"]) == (reported.size_bytes, reported.accepted)
    assert variants["merged"]["metrics"]["accuracy"] == lora_run.after["accuracy"]
    assert variants["full"]["sizeBytes"] < variants["merged"]["sizeBytes"] / 5  # an adapter is small
    assert manifest["labels"] == ["cooking", "finance", "sports", "weather"]


def test_tensorboard_has_training_and_validation_scalars(lora_run: FinishedRun) -> None:
    from tensorboard.backend.event_processing.event_accumulator import (  # type: ignore[import-untyped]
        EventAccumulator,
    )

    assert lora_run.result.tensorboard_uri is not None
    events = EventAccumulator(lora_run.result.tensorboard_uri)
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "validation/accuracy", "test-before/accuracy"} <= tags
    assert {"test-after/accuracy", "test-after/f1"} <= tags
    assert events.Scalars("train/loss")[-1].step == lora_run.result.step


def test_progress_events_tell_the_whole_story(lora_run: FinishedRun) -> None:
    events = read_events(lora_run.events)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["load", "evaluate-base", "train", "evaluate", "compress", "export"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total_steps"] == lora_run.result.step
    assert all(a["step"] <= b["step"] for a, b in itertools.pairwise(progress))
    validations = [e for e in events if e["event"] == "metrics" and e["split"] == "validation"]
    assert len(validations) == 2  # one per epoch
    assert events[-1]["event"] == "result"
    assert RunReport.model_validate(events[-1]["result"]) == lora_run.result
