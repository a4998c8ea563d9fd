"""A run survives a lost worker by resuming from its checkpoint; a run reads and writes S3 end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubetune.runtime.io.settings import Faults
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events

from .conftest import artifacts, fast_options, finite, make_spec, manifest_file
from .s3server import s3_endpoint

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name

NO_COMPRESSION = {"quantization": {"method": "none"}}
# 256 training examples, batches of 32 on one worker: 8 steps per epoch, checkpoints every 4 steps.
FAST_TRAINING = {"epochs": 2, "batchSize": 32, "evaluationsPerEpoch": 2, "learningRate": 1e-3}


def test_a_failed_worker_resumes_from_the_latest_checkpoint(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    spec = make_spec(
        tiny_bert_dir,
        topics_jsonl,
        output,
        method={"type": "full"},
        hyperparameters=FAST_TRAINING,
        compression=NO_COMPRESSION,
    )
    events = tmp_path / "events.jsonl"
    # The worker raises once after step 6; the newest checkpoint then is the one of step 4.
    result = run_pipeline(spec, fast_options(output, faults=Faults(train_step=6)), JsonLinesReporter(events))
    assert result.resumed_from_step == 4
    assert result.step == 16  # the whole plan, not 16 + the 6 steps of the failed attempt
    manifest = json.loads(manifest_file(result).read_text())
    assert manifest["training"]["resumedFromStep"] == 4
    steps = [e["step"] for e in read_events(events) if e["event"] == "progress"]
    restart = next((i for i in range(1, len(steps)) if steps[i] < steps[i - 1]), None)
    if restart is not None:  # progress is throttled, so the failed attempt may have reported nothing
        assert min(steps[restart:]) > 4, steps


def test_a_run_reads_and_writes_s3(
    ray_session: str, s3_endpoint: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    from kubetune.runtime.data.load import load_data
    from kubetune.runtime.evaluate import evaluate
    from kubetune.runtime.io.settings import RuntimeSettings
    from kubetune.runtime.io.storage import s3_client
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    client = s3_client()
    for bucket in ("datasets", "models", "runs"):
        client.create_bucket(Bucket=bucket)
    client.upload_file(str(topics_jsonl), "datasets", "topics/train.jsonl")
    for file in tiny_bert_dir.iterdir():
        client.upload_file(str(file), "models", f"tiny-bert/{file.name}")

    spec = make_spec(
        tiny_bert_dir,
        "s3://datasets/topics/train.jsonl",
        tmp_path,
        method={"type": "full"},
        # Also exercises mixed precision, activation checkpointing and gradient accumulation on CPU.
        hyperparameters={
            **FAST_TRAINING,
            "epochs": 1,
            "precision": "bf16",
            "gradientCheckpointing": True,
            "gradientAccumulationSteps": 2,
        },
        model={"uri": "s3://models/tiny-bert"},
        output={"uri": "s3://runs/job-1"},
    )
    result = run_pipeline(spec, fast_options(tmp_path / "local"))
    assert result.manifest_uri == "s3://runs/job-1/kubetune.json"
    assert artifacts(result)["full"] == "s3://runs/job-1/variants/full"
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="runs")["Contents"]}
    assert {"job-1/kubetune.json", "job-1/variants/full/model.safetensors", "job-1/variants/int8/config.json"} <= keys
    assert any(key.startswith("job-1/tensorboard/events.out.tfevents") for key in keys)
    assert any(key.startswith("job-1/checkpoints/train/checkpoint_") for key in keys)
    # Nothing stays behind in the local staging folder.
    assert not (tmp_path / "local" / "cache" / "outputs").exists() or not any(
        (tmp_path / "local" / "cache" / "outputs").iterdir()
    )

    manifest = json.loads(client.get_object(Bucket="runs", Key="job-1/kubetune.json")["Body"].read())
    assert manifest["lineage"]["baseModel"]["uri"] == "s3://models/tiny-bert"
    assert manifest["lineage"]["data"]["train"] == "s3://datasets/topics/train.jsonl"
    downloaded = tmp_path / "download"
    for key in (k for k in keys if k.startswith("job-1/variants/full/")):
        target = downloaded / key.removeprefix("job-1/variants/full/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("runs", key, str(target))
    model = AutoModelForSequenceClassification.from_pretrained(downloaded)
    data = load_data(spec, RuntimeSettings(cache_dir=tmp_path / "check"))
    metrics = evaluate(model, AutoTokenizer.from_pretrained(downloaded), data.test, 4, 32)
    assert metrics["accuracy"] == finite(result.metrics_after)["accuracy"]
