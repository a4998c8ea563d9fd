"""Sharded training (`resources.sharding: fsdp`) on 2 CPU workers over gloo: it trains as DDP does,
resumes from its sharded checkpoints, and exports weights that plain transformers loads."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from kubetune.runtime.contract import RunSpec, Sharding, WorkerResources
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.data.load import load_data
from kubetune.runtime.evaluate import evaluate
from kubetune.runtime.io.settings import Faults, RuntimeSettings
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events

from .conftest import artifacts, fast_options, finite, make_spec, manifest_file

pytestmark = pytest.mark.runtime

LORA: dict[str, Any] = {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
FULL: dict[str, Any] = {"type": "full"}
# 256 training examples on 2 workers, batches of 16: 8 steps per epoch, 16 in all, a checkpoint every 4 steps.
TRAINING = {"epochs": 2, "batchSize": 16, "evaluationsPerEpoch": 2, "learningRate": 2e-2}
# How much the training loss falls at least in these 16 steps: LoRA on the tiny random base learns slowly.
LOSS_DROP = {"full_runs": 0.2, "lora_runs": 1e-3}
# DDP and FSDP average the same gradients, but in another order of floating-point additions.
LOSS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class Trained:
    spec: RunSpec
    result: RunReport
    events: Path

    @property
    def final_loss(self) -> float:
        """Training loss of the last optimizer step (its progress event is always sent)."""
        progress = [event for event in read_events(self.events) if event["event"] == "progress"]
        last = progress[-1]
        assert last["step"] == self.result.step, progress
        return float(last["loss"])


@pytest.fixture(scope="module")
def deterministic_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT without dropout, so that two runs of one spec train alike step by step."""
    from .tiny import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=0.0)


def _train(
    model: Path,
    data: Path,
    output: Path,
    method: dict[str, Any],
    sharding: Sharding,
    faults: Faults | None = None,
    precision: str = "fp32",
) -> Trained:
    hyperparameters = {**TRAINING, "precision": precision}
    compression = {"quantization": {"method": "none"}}
    spec = make_spec(model, data, output, method=method, hyperparameters=hyperparameters, compression=compression)
    options = fast_options(output, faults=faults or Faults())
    options = replace(options, resources=WorkerResources(workers=2, cpus_per_worker=0.45, sharding=sharding))
    events = output.parent / f"{output.name}.events.jsonl"
    return Trained(spec, run_pipeline(spec, options, JsonLinesReporter(events)), events)


@pytest.fixture(scope="module")
def full_runs(
    ray_session: str, deterministic_bert: Path, topics_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[Sharding, Trained]:
    root = tmp_path_factory.mktemp("full")
    return {mode: _train(deterministic_bert, topics_jsonl, root / mode.value, FULL, mode) for mode in Sharding}


@pytest.fixture(scope="module")
def lora_runs(
    ray_session: str, deterministic_bert: Path, topics_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[Sharding, Trained]:
    root = tmp_path_factory.mktemp("lora")
    return {mode: _train(deterministic_bert, topics_jsonl, root / mode.value, LORA, mode) for mode in Sharding}


@pytest.mark.parametrize("runs_name", ["full_runs", "lora_runs"])
def test_fsdp_trains_as_ddp_does(runs_name: str, request: pytest.FixtureRequest) -> None:
    runs: dict[Sharding, Trained] = request.getfixturevalue(runs_name)
    ddp, fsdp = runs[Sharding.NONE], runs[Sharding.FSDP]
    assert fsdp.result.step == ddp.result.step == 16
    assert fsdp.final_loss == pytest.approx(ddp.final_loss, abs=LOSS_TOLERANCE)
    ddp_validation, fsdp_validation = finite(ddp.result.validation), finite(fsdp.result.validation)
    assert fsdp_validation["loss"] == pytest.approx(ddp_validation["loss"], abs=LOSS_TOLERANCE)
    assert fsdp_validation["accuracy"] == ddp_validation["accuracy"]
    # The model did learn, so the two agree on a training that changed the weights.
    first = next(event for event in read_events(fsdp.events) if event["event"] == "progress")
    assert fsdp.final_loss < float(first["loss"]) - LOSS_DROP[runs_name]
    manifest = json.loads(manifest_file(fsdp.result).read_text())
    assert manifest["training"]["sharding"] == "fsdp"
    assert "sharding" not in json.loads(manifest_file(ddp.result).read_text())["training"]


@pytest.mark.parametrize(("runs_name", "variant"), [("full_runs", "full"), ("lora_runs", "merged")])
def test_exported_weights_load_with_plain_transformers(
    runs_name: str, variant: str, request: pytest.FixtureRequest
) -> None:
    """The gathered weights, loaded by transformers alone, score the validation set as the sharded model did."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trained: Trained = request.getfixturevalue(runs_name)[Sharding.FSDP]
    folder = Path(artifacts(trained.result)[variant])
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = load_data(trained.spec, RuntimeSettings())
    length = trained.spec.hyperparameters.max_sequence_length
    metrics = evaluate(model, tokenizer, data.validation, len(data.labels), length)
    sharded = finite(trained.result.validation)  # measured on the sharded model, at the best step
    assert metrics["accuracy"] == sharded["accuracy"]
    assert metrics["loss"] == pytest.approx(sharded["loss"], abs=1e-5)


def test_a_failed_fsdp_run_resumes_from_its_sharded_checkpoint(
    full_runs: dict[Sharding, Trained], deterministic_bert: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    output = tmp_path / "resumed"
    # Rank 0 raises once after step 6; the newest checkpoint then is the one of step 4.
    resumed = _train(deterministic_bert, topics_jsonl, output, FULL, Sharding.FSDP, Faults(train_step=6))
    assert resumed.result.resumed_from_step == 4
    assert resumed.result.step == 16
    # Every worker wrote its shard of the checkpoints: torch.distributed.checkpoint's index and two shards.
    checkpoints = sorted((output / "checkpoints" / "train").glob("checkpoint_*"))
    sharded = [folder for folder in checkpoints if (folder / ".metadata").is_file()]
    assert sharded, checkpoints
    assert {path.name for path in sharded[0].glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    # Resumed from the shards (weights and optimizer state), it ends where the uninterrupted run ended;
    # from the schedule's position alone, on fresh weights, it would not.
    uninterrupted = full_runs[Sharding.FSDP]
    assert resumed.final_loss == pytest.approx(uninterrupted.final_loss, abs=1e-5)
    assert finite(resumed.result.validation) == pytest.approx(finite(uninterrupted.result.validation), abs=1e-5)


def test_fsdp_in_bf16_computes_in_bf16_and_exports_fp32_weights(
    full_runs: dict[Sharding, Trained], deterministic_bert: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    trained = _train(deterministic_bert, topics_jsonl, tmp_path / "bf16", FULL, Sharding.FSDP, precision="bf16")
    fp32 = full_runs[Sharding.FSDP]
    # bf16 rounds every activation, so it does not end exactly where fp32 does, but close to it.
    assert trained.final_loss == pytest.approx(fp32.final_loss, abs=0.1)
    assert trained.final_loss != fp32.final_loss
    model = AutoModelForSequenceClassification.from_pretrained(Path(artifacts(trained.result)["full"]))
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_a_run_config_asking_fsdp_for_qlora_is_refused_naming_the_field(tmp_path: Path) -> None:
    """An operator of another release may send it: the runtime refuses it before any work."""
    from kubetune.runtime.io.errors import InvalidRunError
    from kubetune.runtime.recipe.pipeline import check_runnable

    spec = make_spec(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out", method={"type": "qlora"})
    with pytest.raises(InvalidRunError) as caught:
        check_runnable(spec, WorkerResources(gpus_per_worker=1, sharding=Sharding.FSDP))
    assert caught.value.where == "resources.sharding" and "method.type qlora" in caught.value.problem
    check_runnable(spec, WorkerResources(gpus_per_worker=1))
