"""The plan report and its RunPlan summary; the plan entry's refusals and its write to the report ConfigMap."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.runtime.contract import RunSpec, WorkerResources
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.plan import PLAN_KEY, RunPlan
from kubetune.runtime.planner import GpuType, gpu_type
from kubetune.runtime.planner.report import PlanReport, TrainingData, build_report, run_plan
from kubetune.runtime.recipe.plan import _judged_gpu, refused_plan, write_to_config_map

from .model_configs import BERT_BASE_CASED, LLAMA_2_7B

TINY_BERT: dict[str, Any] = {**BERT_BASE_CASED, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}


def _spec(task: str, method: str, **hyperparameters: Any) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": {"uri": "/models/m", "task": task},
            "data": {"train": "/data/train.jsonl", "format": "jsonl"},
            "method": {"type": method},
            "output": {"uri": "/out"},
            "hyperparameters": hyperparameters,
        }
    )


def _report(config: dict[str, Any], spec: RunSpec, gpu: GpuType | None, data: TrainingData | None = None) -> PlanReport:
    return build_report(
        spec,
        WorkerResources(gpus_per_worker=1),
        job="planned",
        gpu=gpu,
        config=config,
        data=data,
        sequence_quantile=0.95,
        notes=["a note of the caller"],
    )


CAUSAL_BF16 = _spec("causal-lm", "full", batchSize=4, maxSequenceLength=1024, precision="bf16")
CASES = [
    pytest.param(TINY_BERT, _spec("text-classification", "lora"), "T4", "T4", True, id="tiny-fits-t4"),
    pytest.param(
        TINY_BERT, _spec("text-classification", "lora"), "NVIDIA-H100-80GB-HBM3", "H100-SXM", True, id="product-name"
    ),
    pytest.param(LLAMA_2_7B, CAUSAL_BF16, "L4", "L4", False, id="llama-full-does-not-fit-l4"),
    pytest.param(LLAMA_2_7B, CAUSAL_BF16, "Tesla-T4", "T4", False, id="llama-full-does-not-fit-t4"),
]


@pytest.mark.parametrize(("config", "spec", "named", "planner_name", "fits"), CASES)
def test_the_run_plan_summarises_the_report_on_its_gpu(
    config: dict[str, Any], spec: RunSpec, named: str, planner_name: str, fits: bool
) -> None:
    gpu = gpu_type(named)
    report = _report(config, spec, gpu)
    summary = run_plan(report)
    estimate = next(item for item in report.plan.gpus if item.gpu == planner_name)
    assert (summary.gpu, summary.fits, report.fits) == (planner_name, fits, fits)
    assert summary.devices == report.plan.devices == 1
    assert summary.memory_per_device_bytes == report.plan.memory.total_bytes
    assert summary.device_memory_bytes == gpu.memory_bytes
    assert summary.tokens_per_second == estimate.tokens_per_second
    assert summary.gpu_hours is None  # no data read: no token count
    assert summary.decisions == report.decisions and summary.notes[0] == "a note of the caller"
    assert summary.refused is not fits
    if fits:
        assert summary.message is None
    else:
        assert summary.message is not None and planner_name in summary.message


def test_without_a_gpu_nothing_is_judged() -> None:
    summary = run_plan(_report(TINY_BERT, _spec("text-classification", "lora"), None))
    assert (summary.gpu, summary.fits, summary.device_memory_bytes, summary.tokens_per_second) == (None,) * 4
    assert summary.memory_per_device_bytes is not None and not summary.refused


def test_data_gives_gpu_hours_and_the_decided_sequence_length() -> None:
    data = TrainingData(lengths=[10, 20, 30, 200] * 25, labels=["a", "b", "c"])
    spec = _spec("text-classification", "lora", maxSequenceLength="auto")
    report = _report(TINY_BERT, spec, gpu_type("A10"), data)
    summary = run_plan(report)
    assert report.sequence_lengths is not None and report.sequence_lengths.examples == 100
    decided = {d.field: d.value for d in summary.decisions}
    assert decided["spec.hyperparameters.maxSequenceLength"] == 200
    assert summary.gpu_hours is not None and summary.gpu_hours > 0
    empty = TrainingData(lengths=[], labels=[])
    with pytest.raises(SpecError, match="no training examples"):
        _report(TINY_BERT, spec, None, empty)


def test_the_run_plan_is_camel_case_on_the_wire() -> None:
    wire = run_plan(_report(TINY_BERT, _spec("text-classification", "lora"), gpu_type("T4"))).to_wire()
    assert {"memoryPerDeviceBytes", "deviceMemoryBytes", "tokensPerSecond", "decisions", "fits"} <= set(wire)
    assert RunPlan.model_validate(wire).fits is True


def test_an_unreadable_config_is_a_spec_error_on_the_model_uri() -> None:
    with pytest.raises(SpecError, match=r"spec\.model\.uri: .*gpt2"):
        _report({**TINY_BERT, "model_type": "gpt2"}, _spec("text-classification", "lora"), None)


@pytest.mark.parametrize(
    ("problems", "field"),
    [
        (["spec.model.uri: cannot read config.json of /m"], "model.uri"),
        (["data.format: format image does not hold records"], "data.format"),
        (["spec.data.train /data/train.jsonl: no training examples"], "data.train"),
        (["/data/train.jsonl: line 1 is not valid JSON"], "data.train"),
        (["s3://bucket/train.jsonl: cannot download: denied"], "data.train"),
    ],
)
def test_a_spec_that_cannot_be_planned_names_its_field(problems: list[str], field: str) -> None:
    plan = refused_plan(SpecError(problems))
    assert plan.invalid_field == field and plan.refused and plan.fits is None
    assert plan.error == problems[0].removeprefix("spec.")


@pytest.mark.parametrize(
    ("named", "expected", "note"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100-SXM", None),
        ("h100-sxm", "H100-SXM", None),
        ("NVIDIA-GeForce-RTX-4090", None, "resources.gpuType NVIDIA-GeForce-RTX-4090 is not in the planner's table"),
        (None, None, "resources.gpuType is not set"),
    ],
)
def test_the_plan_entry_judges_resources_gpu_type(named: str | None, expected: str | None, note: str | None) -> None:
    notes: list[str] = []
    gpu = _judged_gpu(named, notes)
    assert (gpu.name if gpu else None) == expected
    assert (notes[0].startswith(note) if note else notes == []) is True


class _Api:
    """Answers patches with the given errors in turn, then accepts; records what was sent."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[str, str, dict[str, Any], str]] = []

    def patch_namespaced_config_map(self, name: str, namespace: str, body: dict[str, Any], **options: Any) -> None:
        self.calls.append((name, namespace, body, options["_content_type"]))
        if self.errors:
            raise self.errors.pop(0)


def test_the_plan_is_merged_into_the_report_config_map(monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes.client

    monkeypatch.setattr("kubetune.runtime.recipe.plan.WRITE_RETRY_WAIT_S", 0.0)
    plan = RunPlan(gpu="T4", fits=False, message="needs 30 GiB")
    api = _Api(kubernetes.client.ApiException(status=503), ConnectionError("no route"))
    write_to_config_map(plan, "run-report", "team", api)
    assert len(api.calls) == 3
    name, namespace, body, content_type = api.calls[-1]
    assert (name, namespace, content_type) == ("run-report", "team", "application/merge-patch+json")
    assert RunPlan.model_validate_json(body["data"][PLAN_KEY]) == plan
    refused = _Api(kubernetes.client.ApiException(status=403))
    with pytest.raises(kubernetes.client.ApiException):
        write_to_config_map(plan, "run-report", "team", refused)
    assert len(refused.calls) == 1  # a refusal is not retried
