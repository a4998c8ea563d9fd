"""Mutations of the manifests: a catalogue of named mistakes with their intended verdict, and how they are built.

A mutation is one mistake (or one right change): edits applied together, and the verdict they call for. The
catalogue holds semantic mistakes that are wrong by intent (a quantity of -2, a cron that never fires, remote code
at a branch), changes that are right by intent, and doubtful ones whose verdict is a policy question. Mutations
drawn from the CRD schema are in schema_mutations.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

Manifest = dict[str, Any]
FieldPath = tuple[str | int, ...]
Intent = Literal["valid", "invalid", "unknown"]

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Remove:
    def __repr__(self) -> str:
        return "<removed>"


REMOVE = _Remove()


@dataclass(frozen=True)
class Mutation:
    """One mistake (or one right change): edits applied together, and the verdict they call for."""

    label: str
    edits: tuple[tuple[FieldPath, Any], ...]
    intent: Intent = "unknown"
    catalogued: bool = False

    def describe(self) -> str:
        return ", ".join(f"{dotted(path)} = {shown(value)}" for path, value in self.edits)


def dotted(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def shown(value: Any, limit: int = 100) -> str:
    text = repr(value) if value is REMOVE else json.dumps(value, allow_nan=True)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def with_edit(document: Manifest, path: FieldPath, value: Any) -> Manifest:
    """A deep copy of `document` with `path` set to `value` (or removed); missing containers are made."""
    result = copy.deepcopy(document)
    node: Any = result
    for part, following in itertools.pairwise(path):
        wanted: type = list if isinstance(following, int) else dict
        if isinstance(node, list):
            assert isinstance(part, int)
            if part >= len(node):
                node.append(wanted())
                part = len(node) - 1
            if not isinstance(node[part], wanted):
                node[part] = wanted()
        elif not isinstance(node.get(part), wanted):
            node[part] = wanted()
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        assert isinstance(last, int)
        if value is REMOVE:
            if last < len(node):
                del node[last]
        elif last < len(node):
            node[last] = value
        else:
            node.append(value)
    elif value is REMOVE:
        node.pop(last, None)
    else:
        node[last] = value
    return result


def edit(path: str, value: Any) -> tuple[FieldPath, Any]:
    return tuple(path.split(".")), value


def mistake(label: str, *edits: tuple[FieldPath, Any]) -> Mutation:
    return Mutation(label, edits, "invalid", catalogued=True)


def fine(label: str, *edits: tuple[FieldPath, Any]) -> Mutation:
    return Mutation(label, edits, "valid", catalogued=True)


def doubtful(label: str, *edits: tuple[FieldPath, Any]) -> Mutation:
    """A change whose verdict is a policy question (the two checkers must still agree)."""
    return Mutation(label, edits, "unknown", catalogued=True)


def hf_model(revision: Any, trust: bool = True) -> tuple[tuple[FieldPath, Any], ...]:
    return (
        edit("spec.model.uri", "hf://example-org/example-model"),
        edit("spec.model.revision", revision),
        edit("spec.model.trustRemoteCode", trust),
    )


def search(space: Manifest, **options: Any) -> tuple[FieldPath, Any]:
    return edit("spec.search", {**options, "space": space})


LEARNING_RATE_CHOICE = {"learningRate": {"type": "choice", "values": [0.0001, 0.001]}}
NAME_MUTATIONS = [
    mistake("name over 253 characters", edit("metadata.name", "a" * 254)),
    mistake("name with capitals", edit("metadata.name", "Support-Tickets")),
    mistake("name with an underscore", edit("metadata.name", "support_tickets")),
    mistake("name starting with a dash", edit("metadata.name", "-tickets")),
    mistake("empty name", edit("metadata.name", "")),
    mistake("name removed", (("metadata", "name"), REMOVE)),
    doubtful("name with a dot", edit("metadata.name", "tickets.v2")),
    doubtful("name with a leading digit", edit("metadata.name", "2024-tickets")),
    doubtful("name of 64 characters", edit("metadata.name", "t" * 64)),
    doubtful("name of 200 characters", edit("metadata.name", "tickets-" + "x" * 192)),
    doubtful("name with a dot where it is shortened", edit("metadata.name", "a" * 36 + ".b" + "c" * 20)),
    fine("short name", edit("metadata.name", "t")),
]
JOB_MUTATIONS = [
    *NAME_MUTATIONS,
    # Schedules: the pattern admits what no calendar has.
    mistake("cron on February 31", edit("spec.schedule", "0 0 31 2 *")),
    mistake("cron on February 30", edit("spec.schedule", "0 0 30 2 *")),
    mistake("cron on April 31", edit("spec.schedule", "0 12 31 4 *")),
    mistake("cron minute 61", edit("spec.schedule", "61 * * * *")),
    mistake("cron hour 24", edit("spec.schedule", "0 24 * * *")),
    mistake("cron month 13", edit("spec.schedule", "0 0 1 13 *")),
    mistake("cron day 0", edit("spec.schedule", "0 0 0 * *")),
    mistake("cron weekday 8", edit("spec.schedule", "0 0 * * 8")),
    mistake("cron step 0", edit("spec.schedule", "*/0 * * * *")),
    fine("cron range that wraps around midnight", edit("spec.schedule", "0 22-2 * * *")),
    mistake("cron with two spaces", edit("spec.schedule", "0  0 * * *")),
    mistake("cron on February 31 and April 31", edit("spec.schedule", "0 0 31 2,4 *")),
    mistake("cron with six fields", edit("spec.schedule", "0 0 * * * *")),
    mistake("cron in words", edit("spec.schedule", "every day")),
    mistake("unknown cron macro", edit("spec.schedule", "@fortnightly")),
    mistake("unknown time zone", edit("spec.timeZone", "Mars/Olympus_Mons")),
    fine("weekly cron", edit("spec.schedule", "0 3 * * 0")),
    fine("cron on February 29", edit("spec.schedule", "0 0 29 2 *")),
    fine("cron every 15 minutes", edit("spec.schedule", "*/15 * * * *")),
    fine("cron macro", edit("spec.schedule", "@daily")),
    fine("cron with month names", edit("spec.schedule", "0 6 1 jan,jul *")),
    fine("known time zone", edit("spec.timeZone", "America/New_York")),
    # Quantities: the pattern admits negative and zero amounts.
    mistake("cpu per worker -2", edit("spec.resources.cpuPerWorker", "-2")),
    mistake("cpu per worker 0", edit("spec.resources.cpuPerWorker", "0")),
    mistake("cpu per worker integer -2", edit("spec.resources.cpuPerWorker", -2)),
    mistake("cpu per worker integer 0", edit("spec.resources.cpuPerWorker", 0)),
    mistake("cpu per worker 0m", edit("spec.resources.cpuPerWorker", "0m")),
    mistake("cpu per worker abc", edit("spec.resources.cpuPerWorker", "abc")),
    mistake("memory per worker -2", edit("spec.resources.memoryPerWorker", "-2")),
    mistake("memory per worker 0", edit("spec.resources.memoryPerWorker", "0")),
    mistake("memory per worker 0Gi", edit("spec.resources.memoryPerWorker", "0Gi")),
    mistake("memory per worker 16GB", edit("spec.resources.memoryPerWorker", "16GB")),
    mistake("head cpu 0", edit("spec.resources.head.cpu", "0")),
    mistake("head memory -1Gi", edit("spec.resources.head.memory", "-1Gi")),
    fine("cpu per worker 500m", edit("spec.resources.cpuPerWorker", "500m")),
    fine("cpu per worker integer 4", edit("spec.resources.cpuPerWorker", 4)),
    fine("memory per worker 512Mi", edit("spec.resources.memoryPerWorker", "512Mi")),
    # URIs.
    mistake("ftp model URI", edit("spec.model.uri", "ftp://example.com/model")),
    mistake("s3 URI without a bucket", edit("spec.model.uri", "s3://")),
    mistake("s3 bucket of one character", edit("spec.data.train", "s3://a/train.jsonl")),
    mistake("pvc claim with capitals", edit("spec.data.train", "pvc://Bad_Claim/train.jsonl")),
    mistake("empty output URI", edit("spec.output.uri", "")),
    mistake("hf URI without a name", edit("spec.model.uri", "hf://")),
    mistake("URI with a scheme-like colon", edit("spec.data.validation", "c:/data/validation.jsonl")),
    mistake("output URI of 2049 characters", edit("spec.output.uri", "s3://bucket/" + "k" * 2037)),
    fine("pvc output URI", edit("spec.output.uri", "pvc://training-outputs/runs/tickets")),
    fine("file data URI", edit("spec.data.train", "file:///data/train.jsonl")),
    # Remote code.
    mistake("remote code at a branch", *hf_model("main")),
    mistake("remote code at a tag", *hf_model("v1.0")),
    mistake("remote code at a short commit", *hf_model("0123abc")),
    mistake("remote code at an upper-case commit", *hf_model(COMMIT.upper())),
    mistake("remote code unpinned", *hf_model(REMOVE)),
    fine("remote code at a commit", *hf_model(COMMIT)),
    fine("branch revision without remote code", *hf_model("main", trust=False)),
    doubtful(
        "remote code from s3", edit("spec.model.uri", "s3://models/base"), edit("spec.model.trustRemoteCode", True)
    ),
    # Cross-field rules.
    mistake("qlora without GPUs", edit("spec.method", {"type": "qlora"}), edit("spec.resources.gpusPerWorker", 0)),
    mistake(
        "fp16 without GPUs", edit("spec.hyperparameters.precision", "fp16"), edit("spec.resources.gpusPerWorker", 0)
    ),
    mistake(
        "fsdp with qlora",
        edit("spec.method", {"type": "qlora"}),
        edit("spec.resources.gpusPerWorker", 1),
        edit("spec.resources.sharding", "fsdp"),
    ),
    fine("fsdp with lora", edit("spec.resources.sharding", "fsdp")),
    mistake(
        "gpuType without GPUs", edit("spec.resources.gpuType", "NVIDIA-A100"), edit("spec.resources.gpusPerWorker", 0)
    ),
    mistake("lora options with method full", edit("spec.method", {"type": "full", "lora": {"rank": 8}})),
    mistake("freeze options with method lora", edit("spec.method", {"type": "lora", "freeze": {"trainableLayers": 1}})),
    mistake("qlora options with method dora", edit("spec.method", {"type": "dora", "qlora": {"quantType": "nf4"}})),
    mistake(
        "warmup steps and ratio",
        edit("spec.hyperparameters.warmupSteps", 10),
        edit("spec.hyperparameters.warmupRatio", 0.1),
    ),
    mistake("split leaves no training data", edit("spec.data.split", {"validationFraction": 0.5, "testFraction": 0.5})),
    mistake(
        "imagefolder for text", edit("spec.data.format", "imagefolder"), edit("spec.model.task", "text-classification")
    ),
    mistake(
        "perplexity for a classifier",
        edit("spec.model.task", "text-classification"),
        search(LEARNING_RATE_CHOICE, metric="perplexity"),
    ),
    mistake(
        "promotion on accuracy for a causal LM",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.data.format", "jsonl"),
        edit("spec.search", REMOVE),
        edit("spec.promotion.metric", "accuracy"),
    ),
    mistake(
        "labels for a causal LM",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", ["a", "b"]),
        edit("spec.data.format", "jsonl"),
        edit("spec.search", REMOVE),
        edit("spec.promotion", REMOVE),
    ),
    mistake(
        "packing for a classifier", edit("spec.model.task", "text-classification"), edit("spec.data.packing", True)
    ),
    fine(
        "packing for a causal LM",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.data.format", "jsonl"),
        edit("spec.search", REMOVE),
        edit("spec.promotion", REMOVE),
        edit("spec.data.packing", True),
    ),
    mistake("a model's hf:// URI as data", edit("spec.data.train", "hf://example-org/example-model")),
    mistake("a Hub split for data that is not on the Hub", edit("spec.data.hub", {"testSplit": "test"})),
    mistake("Hub options without Hub data", edit("spec.data.hub", {"revision": COMMIT})),
    fine(
        "a dataset on the Hub, pinned, with its test split",
        edit("spec.data.train", "hf://datasets/example-org/example-data"),
        edit("spec.data.test", "hf://datasets/example-org/example-data"),
        edit("spec.data.hub", {"revision": COMMIT, "config": "default", "testSplit": "test[:50%]"}),
    ),
    mistake(
        "dpo for a classifier", edit("spec.model.task", "text-classification"), edit("spec.method.objective", "dpo")
    ),
    fine(
        "dpo with its options for a causal LM",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.data.format", "jsonl"),
        edit("spec.search", REMOVE),
        edit("spec.promotion", {"metric": "preferenceAccuracy"}),
        edit("spec.method.objective", "dpo"),
        edit("spec.method.preference", {"beta": 0.2, "lossType": "ipo"}),
    ),
    mistake(
        "kto weights with simpo",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.search", REMOVE),
        edit("spec.promotion", REMOVE),
        edit("spec.method.objective", "simpo"),
        edit("spec.method.preference", {"desirableWeight": 2}),
    ),
    mistake("preference options without an objective", edit("spec.method.preference", {"beta": 0.2})),
    mistake(
        "lm-eval for a classifier",
        edit("spec.model.task", "text-classification"),
        edit("spec.evaluation", {"lmEval": {"tasks": ["arc_easy"]}}),
    ),
    fine(
        "lm-eval tasks for a causal LM",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.data.format", "jsonl"),
        edit("spec.search", REMOVE),
        edit("spec.promotion", REMOVE),
        edit(
            "spec.evaluation",
            {"lmEval": {"tasks": ["arc_easy", "topics"], "taskFolder": "pvc://tasks/lm", "maxDrop": 0.02}},
        ),
    ),
    mistake(
        "packing with orpo",
        edit("spec.model.task", "causal-lm"),
        edit("spec.model.labels", REMOVE),
        edit("spec.search", REMOVE),
        edit("spec.promotion", REMOVE),
        edit("spec.method.objective", "orpo"),
        edit("spec.data.packing", True),
    ),
    mistake("duplicate labels", edit("spec.model.labels", ["bug", "bug"])),
    mistake("one label", edit("spec.model.labels", ["bug"])),
    mistake("mode against the metric", search(LEARNING_RATE_CHOICE, metric="loss", mode="max")),
    mistake("loguniform from 0", search({"learningRate": {"type": "loguniform", "low": 0, "high": 0.01}})),
    mistake("uniform with low above high", search({"weightDecay": {"type": "uniform", "low": 0.5, "high": 0.1}})),
    mistake("randint with fractions", search({"batchSize": {"type": "randint", "low": 1.5, "high": 8}})),
    mistake("choice with low and high", search({"batchSize": {"type": "choice", "values": [8], "low": 1, "high": 2}})),
    mistake("choice value out of range", search({"batchSize": {"type": "choice", "values": [0, 8]}})),
    mistake("choice value of the wrong type", search({"learningRate": {"type": "choice", "values": ["fast"]}})),
    mistake("empty search space", search({})),
    mistake("optimizer searched as numbers", search({"optimizer": {"type": "choice", "values": [1, 2]}})),
    mistake("unknown optimizer option", search({"optimizer": {"type": "choice", "options": ["adamw", "lion"]}})),
    mistake("batch size searched as options", search({"batchSize": {"type": "choice", "options": ["8"]}})),
    mistake("fractional batch size", search({"batchSize": {"type": "choice", "values": [8.5]}})),
    mistake("uniform batch size", search({"batchSize": {"type": "uniform", "low": 8, "high": 32}})),
    mistake("learning rate above its bound", search({"learningRate": {"type": "uniform", "low": 0.1, "high": 2}})),
    mistake(
        "values and options together", search({"lrSchedule": {"type": "choice", "values": [1], "options": ["cosine"]}})
    ),
    fine("optimizer options", search({"optimizer": {"type": "choice", "options": ["adamw", "sgd"]}})),
    fine("whole batch sizes written as decimals", search({"batchSize": {"type": "choice", "values": [8.0, 16]}})),
    fine("randint lora rank", search({"lora.rank": {"type": "randint", "low": 4, "high": 33}})),
    mistake("unknown search parameter", search({"dropout": {"type": "choice", "values": [0.1]}})),
    mistake(
        "grid algorithm with a uniform parameter",
        search({"weightDecay": {"type": "uniform", "low": 0.0, "high": 0.1}}, algorithm="grid"),
    ),
    mistake("tpe with a grid parameter", search({"batchSize": {"type": "grid", "values": [8, 16]}}, algorithm="tpe")),
    mistake("asha options without asha", search(LEARNING_RATE_CHOICE, scheduler="none", asha={"gracePeriod": 1})),
    mistake("magnitude pruning of nothing", edit("spec.compression.pruning", {"method": "magnitude", "amount": 0.0})),
    mistake("node selector key with a space", edit("spec.resources.nodeSelector", {"node pool": "gpu"})),
    mistake("toleration operator Maybe", edit("spec.resources.tolerations", [{"operator": "Maybe"}])),
    mistake("image with a space", edit("spec.resources.image", "kubetune/runtime latest")),
    mistake("priority class with an underscore", edit("spec.resources.priorityClassName", "high_priority")),
    mistake("credentials secret with a space", edit("spec.storage.credentialsSecret", {"name": "storage keys"})),
    mistake("s3 endpoint without a scheme", edit("spec.storage.s3Endpoint", "minio.storage.svc:9000")),
    fine("hub mirror", edit("spec.storage.huggingFace", {"endpoint": "http://hf-mirror.models.svc:8080"})),
    fine("hub offline", edit("spec.storage.huggingFace", {"offline": True})),
    mistake("hub endpoint without a scheme", edit("spec.storage.huggingFace", {"endpoint": "hf-mirror:8080"})),
    mistake(
        "hub offline with an endpoint",
        edit("spec.storage.huggingFace", {"offline": True, "endpoint": "http://hf-mirror.models.svc:8080"}),
    ),
    mistake("queue name with a dot", edit("spec.queueName", "ml.training")),
    mistake("data field with a space", edit("spec.data.fields", {"text": "ticket body"})),
    mistake("route prefix without a slash", edit("spec.serving.routePrefix", "tickets")),
    # Bounds and shapes.
    mistake("negative backoff limit", edit("spec.backoffLimit", -1)),
    mistake("history limit 0", edit("spec.historyLimit", 0)),
    mistake("active deadline 0", edit("spec.activeDeadlineSeconds", 0)),
    mistake("no workers", edit("spec.resources.workers", 0)),
    mistake("17 GPUs per worker", edit("spec.resources.gpusPerWorker", 17)),
    mistake("learning rate 0", edit("spec.hyperparameters.learningRate", 0)),
    mistake("learning rate above 1", edit("spec.hyperparameters.learningRate", 1.5)),
    mistake("epochs as a word", edit("spec.hyperparameters.epochs", "three")),
    mistake("epochs as a numeric string", edit("spec.hyperparameters.epochs", "3")),
    mistake("epochs as a boolean", edit("spec.hyperparameters.epochs", True)),
    mistake("epochs as a fraction", edit("spec.hyperparameters.epochs", 2.5)),
    mistake("learning rate as a numeric string", edit("spec.hyperparameters.learningRate", "0.001")),
    mistake("suspend as a string", edit("spec.suspend", "true")),
    mistake("weight decay NaN", edit("spec.hyperparameters.weightDecay", math.nan)),
    mistake("promotion minimum NaN", edit("spec.promotion.minValue", math.nan)),
    mistake("promotion improvement infinite", edit("spec.promotion.minImprovement", math.inf)),
    mistake("unknown task", edit("spec.model.task", "translation")),
    mistake("concurrency policy Allow", edit("spec.concurrencyPolicy", "Allow")),
    mistake("unknown spec field", edit("spec.replicas", 2)),
    mistake("misspelt hyperparameter", edit("spec.hyperparameters.learningrate", 0.1)),
    mistake("model removed", edit("spec.model", REMOVE)),
    mistake("training data removed", edit("spec.data.train", REMOVE)),
    mistake("output removed", edit("spec.output", REMOVE)),
    mistake("spec removed", (("spec",), REMOVE)),
    fine("epochs as an integral float", edit("spec.hyperparameters.epochs", 2.0)),
    fine("learning rate as an integer", edit("spec.hyperparameters.learningRate", 1)),
    fine("qlora with a GPU", edit("spec.method", {"type": "qlora"}), edit("spec.resources.gpusPerWorker", 1)),
    fine("suspended", edit("spec.suspend", True)),
]
DEPLOYMENT_MUTATIONS = [
    *NAME_MUTATIONS,
    mistake("no model", edit("spec.model", {})),
    mistake("uri and fromFineTuneJob", edit("spec.model", {"uri": "s3://models/a", "fromFineTuneJob": {"name": "x"}})),
    mistake("run 0", edit("spec.model.fromFineTuneJob.run", 0)),
    mistake("variant fp8", edit("spec.model.fromFineTuneJob.variant", "fp8")),
    mistake("job name with a dot", edit("spec.model.fromFineTuneJob.name", "tickets.v2")),
    mistake("min above max replicas", edit("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2})),
    mistake("target of 0 requests", edit("spec.autoscaling.targetOngoingRequests", 0)),
    mistake("cpu -2", edit("spec.resources.cpu", "-2")),
    mistake("cpu 0", edit("spec.resources.cpu", "0")),
    mistake("memory 0", edit("spec.resources.memory", "0")),
    mistake("memory abc", edit("spec.resources.memory", "abc")),
    mistake("gpuType without gpus", edit("spec.resources.gpuType", "NVIDIA-A100"), edit("spec.resources.gpus", 0)),
    mistake("batch of 0", edit("spec.batching.maxBatchSize", 0)),
    mistake("auth without a secret", edit("spec.auth", {})),
    mistake("token key with a space", edit("spec.auth.tokenSecret.key", "the token")),
    mistake("route prefix without a slash", edit("spec.routePrefix", "tickets")),
    mistake("rollout deadline of 10 s", edit("spec.rolloutDeadlineSeconds", 10)),
    mistake("max new tokens 0", edit("spec.maxNewTokens", 0)),
    mistake("unknown spec field", edit("spec.replicas", 3)),
    mistake("compile as a string", edit("spec.compile", "yes")),
    fine("pinned URI", edit("spec.model", {"uri": "s3://models/tickets/best"})),
    fine("pinned run", edit("spec.model.fromFineTuneJob.run", 3)),
    fine("scale to zero", edit("spec.autoscaling", {"minReplicas": 0, "maxReplicas": 1})),
    fine("GPU replicas", edit("spec.resources.gpus", 1), edit("spec.resources.gpuType", "NVIDIA-A100")),
    fine("compiled", edit("spec.compile", True)),
]
CATALOGUE = {"FineTuneJob": JOB_MUTATIONS, "ModelDeployment": DEPLOYMENT_MUTATIONS}
