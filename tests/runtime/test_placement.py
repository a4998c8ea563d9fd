"""Where each part of a run runs: model-holding stages in Ray shaped like a worker pod, a Ray Train worker per GPU.

The session's Ray has logical GPUs and torch sees no CUDA, so Ray places GPU work as it
would in a cluster, and the CUDA checks fail where CUDA is used: never on the driver.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubetune.runtime.contract import WorkerResources
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.data.load import load_data
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.recipe.pipeline import RunOptions, run_pipeline
from kubetune.runtime.recipe.stages import STAGE_OUTPUTS, StagePlacement, evaluate_base, stage_placement
from kubetune.runtime.reporting.base import JsonLinesReporter, Reporters, read_events
from kubetune.runtime.training.plan import TrainingPlan
from kubetune.runtime.training.train import build_trainer, train, worker_shape
from kubetune.runtime.variants.build import planned_variants

from .conftest import RAY_GPUS, finite, make_spec, variants_of
from .s3server import S3_ENVIRONMENT, s3_endpoint

pytestmark = pytest.mark.runtime
__all__ = ["s3_endpoint"]  # a fixture, used by name

FAST_TRAINING = {"epochs": 1, "batchSize": 32, "evaluationsPerEpoch": 1, "learningRate": 1e-3}
# Any of the session's logical GPUs, as Ray names them in the CUDA check's message.
GPU_ID = r"\d+"


@pytest.mark.parametrize(
    ("resources", "ray_address", "expected"),
    [
        # A local CPU run keeps its stages in the driver's process, as `kubetune run` always did.
        (WorkerResources(workers=2), None, StagePlacement(False)),
        (WorkerResources(cpus_per_worker=3), "", StagePlacement(False)),
        # GPUs: a task with one worker pod's GPUs and CPUs, even on this machine.
        (WorkerResources(gpus_per_worker=1), None, StagePlacement(True, 1, None)),
        (WorkerResources(workers=3, gpus_per_worker=4, cpus_per_worker=16), None, StagePlacement(True, 4, 16)),
        # Inside a RayJob (RAY_ADDRESS): on a worker pod, even without GPUs, never on the head.
        (WorkerResources(), "10.0.0.1:6379", StagePlacement(True, 0, None)),
        (WorkerResources(cpus_per_worker=2), "auto", StagePlacement(True, 0, 2)),
    ],
)
def test_stage_placement(resources: WorkerResources, ray_address: str | None, expected: StagePlacement) -> None:
    assert stage_placement(resources, ray_address) == expected


def test_stage_tasks_ask_for_a_worker_pod_and_run_once() -> None:
    placement = StagePlacement(True, 2, 8.0)
    assert placement.task_options() == {"num_gpus": 2, "num_cpus": 8.0, "max_retries": 0, "max_calls": 1}
    assert placement.actor_options() == {"num_gpus": 2, "num_cpus": 8.0, "max_restarts": 0}
    # Without CPUs given, Ray's defaults place it: a CPU for a task, so never on a head with none.
    assert "num_cpus" not in StagePlacement(True, 0, None).task_options()


@pytest.mark.parametrize(
    ("gpus", "cpus", "workers", "cpus_each", "threads"),
    [
        (0, None, 2, 0.9, 1),  # CPU: one per worker, sharing this machine's 2 CPUs
        (0, 4.0, 2, 4.0, 4),
        (1, 4.0, 2, 4.0, 4),
        (2, 4.0, 4, 2.0, 2),  # a pod's CPUs are shared by its GPUs' processes
        (4, 6.0, 8, 1.5, 1),
        (4, None, 8, 0.22, 1),
    ],
)
def test_every_gpu_of_a_worker_runs_a_ray_train_worker(
    gpus: int, cpus: float | None, workers: int, cpus_each: float, threads: int
) -> None:
    shape = worker_shape(WorkerResources(workers=2, gpus_per_worker=gpus, cpus_per_worker=cpus), cluster_cpus=2)
    assert (shape.workers, shape.cpus_per_worker, shape.use_gpu, shape.threads_per_worker) == (
        workers,
        cpus_each,
        gpus > 0,
        threads,
    )


def test_three_gpus_never_ask_for_more_cpus_than_their_pod_has() -> None:
    shape = worker_shape(WorkerResources(gpus_per_worker=3, cpus_per_worker=1), cluster_cpus=8)
    assert shape.cpus_per_worker == 0.3333 and 3 * shape.cpus_per_worker <= 1


def _plan(spec_dir: Path, data_path: Path, output: Path) -> TrainingPlan:
    spec = make_spec(spec_dir, data_path, output, method={"type": "full"}, hyperparameters=FAST_TRAINING)
    settings = RuntimeSettings(cache_dir=output / "cache")
    data = load_data(spec, settings)
    return TrainingPlan(spec, data.labels, data.train, data.validation, settings)


def test_the_trainer_asks_for_one_gpu_per_ray_train_worker(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    shape = worker_shape(WorkerResources(workers=2, gpus_per_worker=2, cpus_per_worker=1), cluster_cpus=2)
    scaling = build_trainer(_plan(tiny_bert_dir, topics_jsonl, tmp_path), shape, str(tmp_path), "x").scaling_config
    assert (scaling.num_workers, scaling.use_gpu, scaling.resources_per_worker) == (4, True, {"CPU": 0.5, "GPU": 1})


def test_a_gpu_stage_checks_cuda_in_its_task_not_on_the_driver(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    output, events = tmp_path / "out", tmp_path / "events.jsonl"
    spec = make_spec(tiny_bert_dir, topics_jsonl, output, hyperparameters={"precision": "fp16"})
    options = RunOptions(
        resources=WorkerResources(cpus_per_worker=0.45, gpus_per_worker=2),
        settings=RuntimeSettings(cache_dir=tmp_path / "cache"),
    )
    with pytest.raises(InvalidRunError) as caught:
        run_pipeline(spec, options, JsonLinesReporter(events))
    # The driver loaded the data and started the base evaluation; its task, given 2 GPUs, found no CUDA.
    assert caught.value.where == "resources.gpusPerWorker"
    assert re.search(rf"the base evaluation task .* GPU\(s\) {GPU_ID}, {GPU_ID} \(", caught.value.problem)
    stages = [event["stage"] for event in read_events(events) if event["event"] == "stage"]
    assert stages == ["load", "evaluate-base"]
    assert read_events(events)[-1]["event"] == "failed"


def test_more_gpus_than_this_machine_has_are_refused_before_any_work(tmp_path: Path, ray_session: str) -> None:
    spec = make_spec(tmp_path, tmp_path / "absent.jsonl", tmp_path / "out")
    options = RunOptions(resources=WorkerResources(workers=RAY_GPUS, gpus_per_worker=2))
    with pytest.raises(InvalidRunError, match=r"8 GPU\(s\) were requested .* this machine's Ray has 4"):
        run_pipeline(spec, options)
    assert not (tmp_path / "out").exists()


def test_ray_train_workers_check_cuda_before_nccl_and_are_not_retried(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    import ray
    from ray.train import ControllerError

    resources = WorkerResources(gpus_per_worker=1, cpus_per_worker=0.8)
    with pytest.raises(InvalidRunError) as caught:
        train(_plan(tiny_bert_dir, topics_jsonl, tmp_path), resources, tmp_path / "checkpoints", "gpu", Reporters([]))
    assert caught.value.where == "resources.gpusPerWorker"
    assert re.search(rf"a Ray Train worker .* GPU\(s\) {GPU_ID} \(", caught.value.problem)
    # Raised from Ray Train's setup: a controller error, which FailureConfig does not retry (worker errors it does).
    assert isinstance(caught.value.__context__, ControllerError)

    # The failed training gives back what it reserved: later runs find the whole cluster.
    def free_gpus() -> float:
        return float(ray.available_resources().get("GPU", 0))  # type: ignore[no-untyped-call]

    deadline = time.monotonic() + 30
    while free_gpus() < RAY_GPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert free_gpus() == RAY_GPUS


def test_a_run_in_a_ray_cluster_runs_its_stages_on_the_workers(
    ray_session: str, s3_endpoint: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    """The entry point as a RayJob starts it: joining the cluster at RAY_ADDRESS, writing to S3."""
    from kubetune.runtime.evaluate import evaluate
    from kubetune.runtime.io.storage import s3_client
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    client = s3_client()
    client.create_bucket(Bucket="runs")
    spec = make_spec(
        tiny_bert_dir, topics_jsonl, tmp_path, hyperparameters=FAST_TRAINING, output={"uri": "s3://runs/j"}
    )
    config = {"spec": spec.to_wire(), "resources": {"workers": 1, "cpusPerWorker": 0.45}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    cache = tmp_path / "cache"
    # What `ray job submit` hands its entrypoint: the cluster's address and the job's runtime env,
    # here the S3 settings the pods of a RayJob get from their environment.
    runtime_env = {"env_vars": {**S3_ENVIRONMENT, "AWS_ENDPOINT_URL": s3_endpoint}}
    environment = {
        **os.environ,
        "RAY_ADDRESS": ray_session,
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": runtime_env}),
        "KUBETUNE_CACHE_DIR": str(cache),
    }
    command = [sys.executable, "-m", "kubetune.runtime.recipe.finetune", "--config", str(tmp_path / "run.json")]
    command += ["--result", str(tmp_path / "result.json"), "--events", str(tmp_path / "events.jsonl")]
    # Run elsewhere than the repository root, whose operator/ folder would shadow the standard library's.
    finished = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    result = RunReport.model_validate_json((tmp_path / "result.json").read_text())
    variants, before, after = variants_of(result), finite(result.metrics_before), finite(result.metrics_after)

    # The variants, reported by a stage in Ray, and the manifest are in S3, uploaded by that stage.
    assert list(variants) == planned_variants(spec) == ["full", "merged", "int8"]
    assert result.manifest_uri == "s3://runs/j/kubetune.json"
    variant_events = {
        e["name"]: e["report"]["uri"] for e in read_events(tmp_path / "events.jsonl") if e["event"] == "variant"
    }
    assert variant_events == {name: f"s3://runs/j/variants/{name}" for name in variants}
    keys = {item["Key"] for item in client.list_objects_v2(Bucket="runs")["Contents"]}
    assert {"j/kubetune.json", "j/variants/merged/model.safetensors", "j/variants/int8/config.json"} <= keys
    assert any(key.startswith("j/tensorboard/") for key in keys)
    # The stage staged its files in a folder of its own and removed them; so did the driver.
    assert not any((cache / STAGE_OUTPUTS).iterdir())
    assert not any((cache / "outputs").iterdir())

    # The same numbers as the inline path: the base model's, and the exported model's, measured here.
    settings = RuntimeSettings(cache_dir=tmp_path / "check")
    data = load_data(spec, settings)
    base = evaluate_base(spec, settings, data=data)
    assert {k: before[k] for k in ("accuracy", "f1")} == {k: base[k] for k in ("accuracy", "f1")}
    assert before["loss"] == pytest.approx(base["loss"], rel=1e-5)
    merged = tmp_path / "merged"
    merged.mkdir()
    for key in (k for k in keys if k.startswith("j/variants/merged/")):
        client.download_file("runs", key, str(merged / key.removeprefix("j/variants/merged/")))
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    metrics = evaluate(model, AutoTokenizer.from_pretrained(merged), data.test, len(data.labels), 32)
    assert metrics["accuracy"] == after["accuracy"] == variants["merged"].metrics["accuracy"]
    manifest = json.loads(client.get_object(Bucket="runs", Key="j/kubetune.json")["Body"].read())
    assert manifest["metrics"] == {
        "before": result.metrics_before,
        "after": result.metrics_after,
        "validation": result.validation,
        "baseline": result.baseline.metrics if result.baseline else {},
    }
    assert result.baseline is not None and result.baseline.test_examples == len(data.test)
    assert manifest["bestVariant"] == result.best_variant
    assert manifest["labels"] == data.labels and manifest["lineage"]["data"] == data.sources
    assert manifest["training"]["workers"] == 1 and manifest["training"]["steps"] == result.step == 8
    for name, entry in manifest["variants"].items():
        assert entry["path"] == f"variants/{name}"
        assert (entry["sizeBytes"], entry["accepted"]) == (
            variants[name].size_bytes,
            variants[name].accepted,
        )
