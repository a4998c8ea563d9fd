"""FineTuneJob validation: good specs parse with defaults, each bad one names its field."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.finetunejob import ConcurrencyPolicy, FineTuneJob
from kubetune.operator.api.manifests import parse
from kubetune.runtime.contract import Algorithm, MethodType, Metric, Mode, QuantizationMethod, Sharding, Task
from kubetune.runtime.contract.errors import SpecError

from ..conftest import DELETE, mutated


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse(document)
    return caught.value.problems


def test_minimal_spec_gets_defaults(minimal_job: dict[str, Any]) -> None:
    job = parse(minimal_job)
    assert isinstance(job, FineTuneJob)
    spec = job.spec
    assert spec.model.task == Task.TEXT_CLASSIFICATION
    assert spec.method.type == MethodType.LORA
    assert spec.method.lora_options.rank == 8
    assert spec.hyperparameters.epochs == 3
    assert spec.search is None
    assert spec.compression.quantization.method == QuantizationMethod.INT8_DYNAMIC
    assert spec.resources.workers == 1 and spec.resources.gpus_per_worker == 0
    assert spec.concurrency_policy == ConcurrencyPolicy.FORBID
    assert spec.search_metric == Metric.ACCURACY and spec.search_mode == Mode.MAX


def test_complete_spec_keeps_every_value(complete_job: dict[str, Any]) -> None:
    job = parse(complete_job)
    assert isinstance(job, FineTuneJob)
    spec = job.spec
    assert spec.search is not None and spec.search.algorithm == Algorithm.TPE
    assert spec.search.space["lora.rank"].values == [8, 16, 32]
    assert spec.resources.tolerations is not None and spec.resources.tolerations[0].key == "nvidia.com/gpu"
    assert spec.schedule == "0 3 * * 0" and spec.time_zone == "Europe/Berlin"
    assert spec.storage is not None and spec.storage.credentials_secret is not None
    # The wire form round-trips: what the operator reads is what the user wrote.
    assert FineTuneJob.model_validate(job.to_wire()).to_wire() == job.to_wire()


def test_causal_lm_defaults_to_loss(minimal_job: dict[str, Any]) -> None:
    job = parse(mutated(minimal_job, "spec.model.task", "causal-lm"))
    assert job.spec.search_metric == Metric.LOSS  # type: ignore[union-attr]


BAD_SPECS: list[tuple[str, Any, str]] = [
    # (dotted path, value, field path the error must name)
    ("spec.model", DELETE, "spec.model"),
    ("spec.model.uri", "ftp://example.com/model", "spec.model.uri"),
    ("spec.model.uri", "s3://", "spec.model.uri"),
    ("spec.model.uri", "pvc://Bad_Claim/x", "spec.model.uri"),
    ("spec.model.task", "translation", "spec.model.task"),
    ("spec.model.labels", ["a"], "spec.model.labels"),
    ("spec.model.labels", ["a", "a"], "spec.model"),
    ("spec.data.train", DELETE, "spec.data.train"),
    ("spec.data.format", "xml", "spec.data.format"),
    ("spec.data.split", {"validationFraction": 0.6, "testFraction": 0.5}, "spec.data.split"),
    ("spec.data.split.testFraction", 1.5, "spec.data.split.testFraction"),
    ("spec.data.fields.text", "has space", "spec.data.fields.text"),
    ("spec.data.maxSamples", 0, "spec.data.maxSamples"),
    ("spec.data.format", "imagefolder", "data.format"),
    ("spec.method.type", "adapter", "spec.method.type"),
    ("spec.method", {"type": "full", "lora": {"rank": 8}}, "spec.method"),
    ("spec.method", {"type": "lora", "freeze": {"trainableLayers": 1}}, "spec.method"),
    ("spec.method", {"type": "lora", "lora": {"rank": 0}}, "spec.method.lora.rank"),
    ("spec.method", {"type": "qlora"}, "method.type qlora needs GPUs"),
    ("spec.hyperparameters", {"learningRate": -1}, "spec.hyperparameters.learningRate"),
    ("spec.hyperparameters", {"epochs": "three"}, "spec.hyperparameters.epochs"),
    ("spec.hyperparameters", {"batchSize": 0}, "spec.hyperparameters.batchSize"),
    ("spec.hyperparameters", {"optimizer": "lion"}, "spec.hyperparameters.optimizer"),
    ("spec.hyperparameters", {"warmupSteps": 10, "warmupRatio": 0.1}, "spec.hyperparameters"),
    ("spec.hyperparameters", {"precision": "fp16"}, "hyperparameters.precision fp16 needs GPUs"),
    ("spec.hyperparameters", {"learningrate": 0.1}, "spec.hyperparameters.learningrate"),
    ("spec.search", {"space": {}}, "spec.search.space"),
    ("spec.search", {"space": {"lr": {"type": "choice", "values": [1]}}}, "space: unknown parameter 'lr'"),
    ("spec.search", {"space": {"batchSize": {"type": "choice", "values": [0]}}}, "space.batchSize"),
    (
        "spec.search",
        {"space": {"learningRate": {"type": "loguniform", "low": 0, "high": 1}}},
        "spec.search.space.learningRate",
    ),
    (
        "spec.search",
        {"space": {"learningRate": {"type": "uniform", "low": 1, "high": 0.1}}},
        "spec.search.space.learningRate",
    ),
    ("spec.search", {"space": {"learningRate": {"type": "choice"}}}, "spec.search.space.learningRate"),
    (
        "spec.search",
        {"space": {"learningRate": {"type": "gaussian", "low": 0.1, "high": 1}}},
        "spec.search.space.learningRate.type",
    ),
    (
        "spec.search",
        {"algorithm": "grid", "space": {"learningRate": {"type": "uniform", "low": 0.1, "high": 1}}},
        "algorithm grid needs grid or choice",
    ),
    (
        "spec.search",
        {"algorithm": "tpe", "space": {"epochs": {"type": "grid", "values": [1, 2]}}},
        "algorithm tpe cannot take grid",
    ),
    (
        "spec.search",
        {"metric": "accuracy", "mode": "min", "space": {"epochs": {"type": "choice", "values": [1]}}},
        "contradicts metric",
    ),
    (
        "spec.search",
        {"metric": "perplexity", "space": {"epochs": {"type": "choice", "values": [1]}}},
        "search.metric perplexity does not apply",
    ),
    ("spec.search", {"asha": {}, "space": {"epochs": {"type": "choice", "values": [1]}}}, "asha is set"),
    (
        "spec.search",
        {"maxConcurrentTrials": 0, "space": {"epochs": {"type": "choice", "values": [1]}}},
        "spec.search.maxConcurrentTrials",
    ),
    ("spec.compression.pruning", {"method": "magnitude", "amount": 1.0}, "spec.compression.pruning.amount"),
    ("spec.compression.quantization.method", "int4", "spec.compression.quantization.method"),
    ("spec.compression.maxAccuracyDrop", -0.1, "spec.compression.maxAccuracyDrop"),
    ("spec.output", DELETE, "spec.output"),
    ("spec.resources.workers", 0, "spec.resources.workers"),
    ("spec.resources.gpusPerWorker", -1, "spec.resources.gpusPerWorker"),
    ("spec.resources.cpuPerWorker", "two", "spec.resources.cpuPerWorker"),
    ("spec.resources.memoryPerWorker", 1.5, "spec.resources.memoryPerWorker"),
    ("spec.resources.gpuType", "NVIDIA-A100", "resources.gpuType needs"),
    ("spec.resources.nodeSelector", {"bad key!": "x"}, "spec.resources.nodeSelector"),
    ("spec.resources.tolerations", [{"operator": "Maybe"}], "spec.resources.tolerations[0].operator"),
    ("spec.resources.priorityClassName", "High_Priority", "spec.resources.priorityClassName"),
    ("spec.storage.credentialsSecret", {"name": "Not A Name"}, "spec.storage.credentialsSecret.name"),
    ("spec.storage.s3Endpoint", "minio:9000", "spec.storage.s3Endpoint"),
    ("spec.storage.huggingFace", {"endpoint": "hf-mirror:8080"}, "spec.storage.huggingFace.endpoint"),
    ("spec.storage.huggingFace", {"offline": "yes"}, "spec.storage.huggingFace.offline"),
    ("spec.storage.huggingFace", {"mirror": "http://m"}, "spec.storage.huggingFace.mirror"),
    (
        "spec.storage.huggingFace",
        {"offline": True, "endpoint": "http://hf-mirror:8080"},
        "spec.storage.huggingFace: offline never contacts a hub: set endpoint or offline, not both",
    ),
    ("spec.queueName", "Queue!", "spec.queueName"),
    ("spec.backoffLimit", -1, "spec.backoffLimit"),
    ("spec.schedule", "every day", "spec.schedule"),
    ("spec.schedule", "61 * * * *", "spec.schedule"),
    ("spec.schedule", "0 3 * * mon-xyz", "spec.schedule"),
    ("spec.timeZone", "Mars/Olympus", "spec.timeZone"),
    ("spec.concurrencyPolicy", "Allow", "spec.concurrencyPolicy"),
    ("spec.historyLimit", 0, "spec.historyLimit"),
    ("spec.promotion.metric", "perplexity", "promotion.metric perplexity does not apply"),
    ("spec.unknownField", 1, "spec.unknownField"),
    # Node placement: label values, and the core/v1 Affinity shape, field by field.
    ("spec.resources.nodeSelector", {"pool": "gpu pool"}, "spec.resources.nodeSelector.pool"),
    ("spec.resources.nodeSelector", {"pool": "g" * 64}, "spec.resources.nodeSelector.pool"),
    ("spec.resources.nodeSelector", {"bad key!": "gpu"}, "not a valid label key"),
    ("spec.resources.head.nodeSelector", {"pool": "-cpu"}, "spec.resources.head.nodeSelector.pool"),
    ("spec.resources.affinity", {"podAntiAffinity": {"x": 1}}, "spec.resources.affinity.podAntiAffinity.x"),
    ("spec.resources.affinity", {"nodeAffinity": []}, "spec.resources.affinity.nodeAffinity"),
    (
        "spec.resources.affinity",
        {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
        "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
    ),
    (
        "spec.resources.affinity",
        {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}},
        "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
    ),
    (
        "spec.resources.head.affinity",
        {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 0}]}},
        "spec.resources.head.affinity.podAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight",
    ),
    ("apiVersion", "kubetune.io/v1", "apiVersion"),
    ("kind", "TrainingJob", "kind"),
    ("metadata.name", "Bad_Name", "metadata.name"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD_SPECS, ids=[f"{p}={v!r}"[:80] for p, v, _ in BAD_SPECS])
def test_bad_spec_names_the_field(minimal_job: dict[str, Any], path: str, value: Any, expected: str) -> None:
    problems = problems_of(mutated(minimal_job, path, value))
    assert any(expected in problem for problem in problems), problems


def test_every_problem_is_reported_at_once(minimal_job: dict[str, Any]) -> None:
    document = mutated(mutated(minimal_job, "spec.resources.workers", 0), "spec.backoffLimit", -1)
    problems = problems_of(document)
    assert any(p.startswith("spec.resources.workers:") for p in problems)
    assert any(p.startswith("spec.backoffLimit:") for p in problems)


@pytest.mark.parametrize("schedule", ["@daily", "*/15 * * * *", "0 3 * * sun", "0 0 1 jan,jul *", "5 4-6 * * 1-5"])
def test_good_schedules(minimal_job: dict[str, Any], schedule: str) -> None:
    parse(mutated(minimal_job, "spec.schedule", schedule))


def test_qlora_with_gpus_is_accepted(minimal_job: dict[str, Any]) -> None:
    document = mutated(
        mutated(minimal_job, "spec.method", {"type": "qlora", "qlora": {"quantType": "nf4"}}),
        "spec.resources.gpusPerWorker",
        1,
    )
    job = parse(document)
    assert job.spec.method.type == MethodType.QLORA  # type: ignore[union-attr]


def test_fsdp_shards_lora_and_full_but_not_qlora(minimal_job: dict[str, Any]) -> None:
    sharded = mutated(mutated(minimal_job, "spec.resources.sharding", "fsdp"), "spec.resources.gpusPerWorker", 1)
    for method in ({"type": "lora"}, {"type": "full"}):
        job = parse(mutated(sharded, "spec.method", method))
        assert job.spec.resources.sharding == Sharding.FSDP  # type: ignore[union-attr]
    problems = problems_of(mutated(sharded, "spec.method", {"type": "qlora", "qlora": {"quantType": "nf4"}}))
    assert any("resources.sharding fsdp does not work with method.type qlora" in p for p in problems), problems
    unknown = problems_of(mutated(sharded, "spec.resources.sharding", "zero"))
    assert any(p.startswith("spec.resources.sharding:") for p in unknown), unknown


FULL_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("revision", [None, "main", "v1.0", "0123abc", FULL_COMMIT.upper(), FULL_COMMIT + "8"])
def test_remote_code_needs_a_pinned_commit(minimal_job: dict[str, Any], revision: str | None) -> None:
    # A branch, a tag or a short hash would run whatever code is pushed to the model repository later.
    document = mutated(minimal_job, "spec.model.trustRemoteCode", True)
    if revision is not None:
        document = mutated(document, "spec.model.revision", revision)
    problems = problems_of(document)
    assert any(p.startswith("spec.model:") and "model.revision" in p and "commit hash" in p for p in problems), problems


def test_remote_code_at_a_full_commit_is_accepted(minimal_job: dict[str, Any]) -> None:
    document = mutated(mutated(minimal_job, "spec.model.trustRemoteCode", True), "spec.model.revision", FULL_COMMIT)
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    assert job.spec.model.trust_remote_code and job.spec.model.revision == FULL_COMMIT


def test_remote_code_of_a_local_model_needs_no_revision(minimal_job: dict[str, Any]) -> None:
    # Only hf:// resolves a revision; a pvc:// or s3:// folder is what it is.
    document = mutated(mutated(minimal_job, "spec.model.trustRemoteCode", True), "spec.model.uri", "pvc://models/x")
    assert parse(document).spec.model.trust_remote_code  # type: ignore[union-attr]
