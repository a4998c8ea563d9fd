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
from .topics import make_examples, write_jsonl

pytestmark = pytest.mark.runtime

LORA: dict[str, Any] = {"type": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0}}
FULL: dict[str, Any] = {"type": "full"}
# 288 training examples (320 less the test split) on 2 workers, batches of 16: 9 steps per epoch, 18 in all,
# checkpoints after steps 4, 9, 13 and 18. 33 validation examples: shards of 17 and 16, so 2 batches on
# rank 0 and 1 on rank 1, which must still take part in the sharded model's second forward pass.
TRAINING = {"epochs": 2, "batchSize": 16, "evaluationsPerEpoch": 2, "learningRate": 2e-2}
VALIDATION_EXAMPLES = 33
VALIDATION_FILE = "validation.jsonl"
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


def _exported_weights(trained: Trained) -> dict[str, torch.Tensor]:
    """The tensors of the run's `full` variant: the whole model, or for LoRA the adapter."""
    from safetensors.torch import load_file

    files = sorted(Path(artifacts(trained.result)["full"]).glob("*.safetensors"))
    assert files, artifacts(trained.result)
    return {name: value for file in files for name, value in load_file(file).items()}


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
    data_section = {"train": str(data), "validation": str(data.with_name(VALIDATION_FILE))}
    spec = make_spec(
        model, data, output, method=method, hyperparameters=hyperparameters, compression=compression, data=data_section
    )
    options = fast_options(output, faults=faults or Faults())
    options = replace(options, resources=WorkerResources(workers=2, cpus_per_worker=0.45, sharding=sharding))
    events = output.parent / f"{output.name}.events.jsonl"
    return Trained(spec, run_pipeline(spec, options, JsonLinesReporter(events)), events)


@pytest.fixture(scope="module")
def topics_with_validation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """320 examples to train on (and test), and beside them a validation file of its own."""
    folder = tmp_path_factory.mktemp("topics")
    write_jsonl(folder / VALIDATION_FILE, make_examples(VALIDATION_EXAMPLES, seed=11))
    return write_jsonl(folder / "train.jsonl", make_examples(320, seed=7))


@pytest.fixture(scope="module")
def full_runs(
    ray_session: str,
    deterministic_bert: Path,
    topics_with_validation: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[Sharding, Trained]:
    root = tmp_path_factory.mktemp("full")
    return {
        mode: _train(deterministic_bert, topics_with_validation, root / mode.value, FULL, mode) for mode in Sharding
    }


@pytest.fixture(scope="module")
def lora_runs(
    ray_session: str, deterministic_bert: Path, topics_with_validation: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[Sharding, Trained]:
    root = tmp_path_factory.mktemp("lora")
    return {
        mode: _train(deterministic_bert, topics_with_validation, root / mode.value, LORA, mode) for mode in Sharding
    }


@pytest.mark.parametrize("runs_name", ["full_runs", "lora_runs"])
def test_fsdp_trains_as_ddp_does(runs_name: str, request: pytest.FixtureRequest) -> None:
    runs: dict[Sharding, Trained] = request.getfixturevalue(runs_name)
    ddp, fsdp = runs[Sharding.NONE], runs[Sharding.FSDP]
    assert fsdp.result.step == ddp.result.step == 18
    assert fsdp.final_loss == pytest.approx(ddp.final_loss, abs=LOSS_TOLERANCE)
    ddp_validation, fsdp_validation = finite(ddp.result.validation), finite(fsdp.result.validation)
    assert fsdp_validation["loss"] == pytest.approx(ddp_validation["loss"], abs=LOSS_TOLERANCE)
    assert fsdp_validation["accuracy"] == ddp_validation["accuracy"]
    # Both export the same weights: all of them for a full fine-tune, the adapters and head for LoRA.
    ddp_weights, fsdp_weights = _exported_weights(ddp), _exported_weights(fsdp)
    assert ddp_weights.keys() == fsdp_weights.keys()
    for name, value in fsdp_weights.items():
        torch.testing.assert_close(value, ddp_weights[name], atol=1e-5, rtol=1e-4, msg=name)
    # And the weights did train: a full fine-tune learns; LoRA on the tiny random base hardly moves the
    # loss, but its adapters left their start (lora_B starts at zero).
    first = next(event for event in read_events(fsdp.events) if event["event"] == "progress")
    if runs_name == "full_runs":
        assert fsdp.final_loss < float(first["loss"]) - 0.2
    else:
        lora_b = [value for name, value in fsdp_weights.items() if "lora_B" in name]
        assert lora_b and all(float(value.abs().sum()) > 0 for value in lora_b)
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
    length = trained.spec.hyperparameters.resolved_max_sequence_length
    metrics = evaluate(model, tokenizer, data.validation, len(data.labels), length)
    sharded = finite(trained.result.validation)  # measured on the sharded model, at the best step
    assert metrics["accuracy"] == sharded["accuracy"]
    assert metrics["loss"] == pytest.approx(sharded["loss"], abs=1e-5)


def test_a_failed_fsdp_run_resumes_from_its_sharded_checkpoint(
    full_runs: dict[Sharding, Trained], deterministic_bert: Path, topics_with_validation: Path, tmp_path: Path
) -> None:
    output = tmp_path / "resumed"
    # Rank 0 raises once after step 6; the newest checkpoint then is the one of step 4.
    resumed = _train(deterministic_bert, topics_with_validation, output, FULL, Sharding.FSDP, Faults(train_step=6))
    assert resumed.result.resumed_from_step == 4
    assert resumed.result.step == 18
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
    full_runs: dict[Sharding, Trained], deterministic_bert: Path, topics_with_validation: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    trained = _train(
        deterministic_bert, topics_with_validation, tmp_path / "bf16", FULL, Sharding.FSDP, precision="bf16"
    )
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
