"""`python -m kubetune.runtime.recipe.plan`: the cluster's plan of a GPU run, the same as `kubetune plan`'s.

The entry runs as the plan Job runs it, in a process of its own on a run config, and writes its
RunPlan to a file (--output) instead of the report ConfigMap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.cli.main import main as kubetune
from kubetune.runtime.contract.plan import RunPlan
from kubetune.runtime.planner.report import PlanReport, run_plan

from ..unit.model_configs import LLAMA_2_7B
from .conftest import spec_document
from .s3server import s3_endpoint  # noqa: F401  (a fixture)

pytestmark = pytest.mark.runtime

H100_PRODUCT = "NVIDIA-H100-80GB-HBM3"
AUTO_SEQUENCE = {"batchSize": 8, "maxSequenceLength": "auto", "precision": "bf16"}


def _run_config(tmp_path: Path, spec: dict[str, Any], gpu_type: str) -> Path:
    document = {
        "spec": spec,
        "run": {"jobName": "planned", "namespace": "team", "runNumber": 1},
        "resources": {"workers": 1, "gpusPerWorker": 1, "gpuType": gpu_type},
    }
    path = tmp_path / "run.json"
    path.write_text(json.dumps(document))
    return path


def _plan(config: Path, tmp_path: Path, **environment: str) -> tuple[subprocess.CompletedProcess[str], RunPlan | None]:
    output = tmp_path / "plan.json"
    command = [sys.executable, "-m", "kubetune.runtime.recipe.plan", "--config", str(config), "--output", str(output)]
    env = {**os.environ, "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"), **environment}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    plan = RunPlan.model_validate_json(output.read_text()) if output.exists() else None
    return result, plan


def test_the_plan_entry_plans_as_kubetune_plan_does(
    model_dir: Path, topics_jsonl: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = spec_document(model_dir, topics_jsonl, tmp_path / "out", hyperparameters=AUTO_SEQUENCE)
    result, plan = _plan(_run_config(tmp_path, spec, H100_PRODUCT), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Memory per device" in result.stdout and "fits on the H100-SXM" in " ".join(result.stdout.split())
    assert plan is not None and plan.fits is True and plan.gpu == "H100-SXM"

    job = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "planned"}}
    job["spec"] = {**spec, "resources": {"gpusPerWorker": 1, "gpuType": H100_PRODUCT}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert kubetune(["plan", str(tmp_path / "job.yaml"), "--json", "--gpu", "H100-SXM"]) == 0
    expected = run_plan(PlanReport.model_validate_json(capsys.readouterr().out))
    assert plan == expected
    decided = {decision.field.rpartition(".")[2] for decision in plan.decisions}
    assert "maxSequenceLength" in decided and plan.gpu_hours is not None and plan.gpu_hours > 0


def test_a_run_that_does_not_fit_is_written_with_what_would(topics_jsonl: Path, tmp_path: Path) -> None:
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_2_7B))
    hyperparameters = {"batchSize": 4, "maxSequenceLength": 1024, "precision": "fp16"}
    spec = spec_document(model, topics_jsonl, tmp_path / "out", hyperparameters=hyperparameters)
    spec["model"]["task"], spec["method"] = "causal-lm", {"type": "full"}
    result, plan = _plan(_run_config(tmp_path, spec, "Tesla-T4"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert plan is not None and plan.fits is False and plan.refused and plan.gpu == "T4"
    assert plan.message is not None and "T4" in plan.message
    assert plan.memory_per_device_bytes is not None and plan.device_memory_bytes is not None
    assert plan.memory_per_device_bytes > plan.device_memory_bytes


def test_a_model_that_cannot_be_read_is_written_as_an_invalid_field(topics_jsonl: Path, tmp_path: Path) -> None:
    spec = spec_document(tmp_path / "nowhere", topics_jsonl, tmp_path / "out")
    result, plan = _plan(_run_config(tmp_path, spec, H100_PRODUCT), tmp_path)
    assert result.returncode == 0, result.stderr
    assert plan is not None and plan.invalid_field == "model.uri" and plan.fits is None
    assert plan.error is not None and plan.error.startswith("model.uri: cannot read config.json")


def test_an_unknown_gpu_type_is_not_judged(model_dir: Path, topics_jsonl: Path, tmp_path: Path) -> None:
    spec = spec_document(model_dir, topics_jsonl, tmp_path / "out")
    result, plan = _plan(_run_config(tmp_path, spec, "NVIDIA-GeForce-RTX-4090"), tmp_path)
    assert result.returncode == 0, result.stderr
    assert plan is not None and plan.fits is None and plan.gpu is None and not plan.refused
    assert plan.memory_per_device_bytes is not None
    assert any("NVIDIA-GeForce-RTX-4090 is not in the planner's table" in note for note in plan.notes)


def test_an_s3_model_gives_its_config_and_tokenizer_never_its_weights(
    s3_endpoint: str,  # noqa: F811
    model_dir: Path,
    topics_jsonl: Path,
    tmp_path: Path,
) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="models")
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix in {".json", ".txt"}:
            client.upload_file(str(path), "models", f"minilm/{path.name}")
    client.put_object(Bucket="models", Key="minilm/model.safetensors", Body=b"not to be read")
    spec = spec_document(model_dir, topics_jsonl, tmp_path / "out", hyperparameters=AUTO_SEQUENCE)
    spec["model"]["uri"] = "s3://models/minilm"
    result, plan = _plan(_run_config(tmp_path, spec, H100_PRODUCT), tmp_path)
    assert result.returncode == 0, result.stderr
    assert plan is not None and plan.fits is True and plan.gpu_hours is not None
    downloaded = {path.name for path in (tmp_path / "cache").rglob("*") if path.is_file()}
    assert "config.json" in downloaded and "model.safetensors" not in downloaded


def test_a_store_that_does_not_answer_fails_for_the_job_to_retry(topics_jsonl: Path, tmp_path: Path) -> None:
    spec = spec_document(Path("/unused"), topics_jsonl, tmp_path / "out")
    spec["model"]["uri"] = "s3://models/minilm"
    closed = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1", "AWS_ACCESS_KEY_ID": "test",
              "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    result, plan = _plan(_run_config(tmp_path, spec, H100_PRODUCT), tmp_path, **closed)
    assert result.returncode == 1 and plan is None
    assert "unreachable or busy" in result.stderr


def test_a_run_config_without_a_report_config_map_needs_output(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"spec": spec_document(Path("/m"), "/d.jsonl", tmp_path / "out")}))
    command = [sys.executable, "-m", "kubetune.runtime.recipe.plan", "--config", str(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "give --output" in result.stderr
    config.write_text("{not json")
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "not valid JSON" in result.stderr
