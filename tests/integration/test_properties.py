"""Properties over generated specs and reports, against the real API server and the in-process operator.

Hypothesis draws the examples with a fixed seed (derandomized, no example database) and
bounded counts, so every run tries the same ones:

- same verdict: `kubetune validate` (its checker, called directly) and the API server's
  admission (a server-side dry run with strict field validation, as kubectl sends it)
  accept and refuse the same FineTuneJob and ModelDeployment manifests; and manifests that
  are wrong by intent (a quantity of -2, a cron that never fires, remote code at a branch)
  are refused by both, while ones that are right by intent are accepted by both.
- no wedge: admitted manifests, created for real, each get a status with a condition that
  carries a reason and the observed generation, and the operator logs no unhandled exception.
- reports never stop status updates: whatever a run writes into its report ConfigMap, the
  job's status goes on following the RayJob and the next valid report, finite and small.

The manifests start from the examples (and the unit tests' manifest of mistakes) and get
one or two mutations: from a catalogue of semantic mistakes with their intended verdict,
or drawn from the CRD schema (wrong types, bounds, enums, patterns, unknown and removed
fields). Each property writes its counts to `<pytest basetemp>/kubetune-properties/*.json`
and to `record_property`.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kubetune.cli.validate import problems_of
from kubetune.operator.api.common import API_VERSION
from kubetune.operator.kube import ApiError, Kube, ObjectRef, collection_path
from kubetune.runtime.contract.report import REPORT_KEY, RunReport, Stage
from prometheus_client import REGISTRY

from ..conftest import EXAMPLES, REPO_ROOT
from .harness import CapturedLogs, InProcessOperator, conditions, eventually, set_ray_job_status

Manifest = dict[str, Any]
Schema = dict[str, Any]
FieldPath = tuple[str | int, ...]
Intent = Literal["valid", "invalid", "unknown"]
RecordProperty = Callable[[str, object], None]

SPEC_EXAMPLES = 550  # generated manifests, on top of one per catalogue entry
NO_WEDGE_SAMPLE = 24  # admitted manifests created for real
NO_WEDGE_SECONDS = 30.0
REPORT_EXAMPLES = 40  # generated report payloads, on top of the fixed ones
REPORT_WAIT_SECONDS = 15.0
REPORT_BUDGET_SECONDS = 170.0  # the report property stops trying new payloads after this long
STATUS_MAX_BYTES = 256 * 1024
CONFIGMAP_PAYLOAD_MAX = 1_000_000  # a ConfigMap holds at most 1 MiB of data
SEED_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.generate),  # failures are collected and reported, not shrunk
)
JOB = (API_VERSION, "FineTuneJob")
RUNNING = {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _Remove:
    def __repr__(self) -> str:
        return "<removed>"


REMOVE = _Remove()


# Where the counts go.


def write_counts(base: Path, name: str, counts: dict[str, Any], record_property: RecordProperty) -> Path:
    """The counts as JSON under pytest's base temp folder, and as properties of the test (JUnit XML)."""
    folder = base / "kubetune-properties"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    for key, value in counts.items():
        record_property(f"{name}.{key}", value)
    print(f"{name}: {json.dumps(counts, sort_keys=True)} ({path})")
    return path


# Manifests and their mutations.


@dataclass(frozen=True)
class Base:
    """A manifest the mutations start from."""

    name: str
    document: Manifest
    intent: Intent

    @property
    def kind(self) -> str:
        return str(self.document["kind"])


@dataclass(frozen=True)
class Mutation:
    """One mistake (or one right change): edits applied together, and the verdict they call for."""

    label: str
    edits: tuple[tuple[FieldPath, Any], ...]
    intent: Intent = "unknown"
    catalogued: bool = False

    def describe(self) -> str:
        return ", ".join(f"{dotted(path)} = {shown(value)}" for path, value in self.edits)


@dataclass(frozen=True)
class SpecCase:
    base: Base
    mutations: tuple[Mutation, ...]

    @property
    def document(self) -> Manifest:
        document = self.base.document
        for mutation in self.mutations:
            for path, value in mutation.edits:
                document = with_edit(document, path, value)
        return document

    @property
    def kind(self) -> str:
        return self.base.kind

    @property
    def intent(self) -> Intent:
        """What the manifest should get: a wrong-by-intent mutation makes it invalid, unless edits overlap."""
        paths = [[path for path, _ in mutation.edits] for mutation in self.mutations]
        for i, mine in enumerate(paths):
            for theirs in paths[i + 1 :]:
                if any(overlap(a, b) for a in mine for b in theirs):
                    return "unknown"
        intents = {mutation.intent for mutation in self.mutations}
        if "invalid" in intents or (self.base.intent == "invalid" and not self.mutations):
            return "invalid"
        if self.base.intent == "valid" and intents <= {"valid"}:
            return "valid"
        return "unknown"

    def describe(self) -> str:
        edits = "; ".join(f"[{m.label}] {m.describe()}" for m in self.mutations) or "(unchanged)"
        return f"{self.base.name}: {edits}"


def dotted(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def shown(value: Any, limit: int = 100) -> str:
    text = repr(value) if value is REMOVE else json.dumps(value, allow_nan=True)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def overlap(a: FieldPath, b: FieldPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


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


@cache
def bases() -> tuple[Base, ...]:
    """Every FineTuneJob and ModelDeployment of the examples (valid) and of the unit tests' mistakes (invalid)."""
    sources = [
        *((path, "valid") for path in sorted(EXAMPLES.glob("*.yaml"))),
        *((path, "valid") for path in sorted(EXAMPLES.glob("*/finetunejob.yaml"))),
        *((path, "invalid") for path in sorted((REPO_ROOT / "tests" / "unit" / "manifests").glob("*.yaml"))),
    ]
    found = []
    for path, intent in sources:
        for index, document in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(document, dict) and document.get("kind") in CATALOGUE:
                name = f"{path.relative_to(REPO_ROOT)}#{index + 1}"
                found.append(Base(name, document, "valid" if intent == "valid" else "invalid"))
    return tuple(found)


def weighted_bases() -> tuple[Base, ...]:
    """The bases to draw from: the valid examples three times as often as the manifests of mistakes."""
    return tuple(base for base in bases() for _ in range(3 if base.intent == "valid" else 1))


def base_named(kind: str, stem: str) -> Base:
    return next(base for base in bases() if base.kind == kind and stem in base.name)


# Mutations drawn from the CRD schema.


@dataclass(frozen=True)
class Spot:
    """A field of the schema: where it is, its schema, and whether its object requires it."""

    path: FieldPath
    schema: Schema
    required: bool


MAP_KEYS = {"space": "learningRate", "nodeSelector": "team"}


@cache
def crd_schema(kind: str) -> Schema:
    """The openAPIV3Schema of the kind's served version, as the API server has it (crds/)."""
    for path in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v["served"])
            schema: Schema = version["schema"]["openAPIV3Schema"]
            return schema
    raise LookupError(kind)


def spots_of(schema: Schema, at: FieldPath) -> Iterator[Spot]:
    required = set(schema.get("required", []))
    for key, child in schema.get("properties", {}).items():
        yield Spot((*at, key), child, key in required)
        yield from spots_of(child, (*at, key))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict) and at:
        key = MAP_KEYS.get(str(at[-1]), "example")
        yield Spot((*at, key), extra, False)
        yield from spots_of(extra, (*at, key))
    items = schema.get("items")
    if isinstance(items, dict) and items.get("properties"):
        yield Spot((*at, 0), items, False)
        yield from spots_of(items, (*at, 0))


@cache
def spots(kind: str) -> tuple[Spot, ...]:
    return tuple(spots_of(crd_schema(kind)["properties"]["spec"], ("spec",)))


Labelled = tuple[str, Any]
WRONG_TYPES: dict[str, Labelled] = {
    "null": ("null", None),
    "boolean": ("a boolean", True),
    "string": ("a string", "x"),
    "integer": ("an integer", 7),
    "array": ("a list", ["x"]),
    "object": ("an object", {"x": 1}),
}
QUANTITIES: list[Labelled] = [
    ("quantity -2", "-2"),
    ("quantity 0", "0"),
    ("quantity abc", "abc"),
    ("quantity 1.5.2", "1.5.2"),
    ("quantity 16GB", "16GB"),
    ("quantity 500m", "500m"),
    ("quantity 2Gi", "2Gi"),
    ("quantity 1e3", "1e3"),
    ("quantity +1", "+1"),
    ("quantity integer 2", 2),
    ("quantity integer 0", 0),
    ("quantity integer -1", -1),
    ("quantity fraction 1.5", 1.5),
    ("quantity boolean", True),
    ("null", None),
]
TEXTS: list[Labelled] = [
    ("empty string", ""),
    ("string with a space", "a b"),
    ("capitals", "UPPER"),
    ("non-ASCII", "ünïcode"),
    ("leading digit", "1abc"),
    ("dot", "a.b"),
    ("slash", "a/b"),
    ("colon", "a:b"),
    ("trailing newline", "abc\n"),
    ("plain word", "abc"),
]


def wrong_types(*exempt: str) -> list[Labelled]:
    return [value for name, value in WRONG_TYPES.items() if name not in exempt]


def integer_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    low, high = schema.get("minimum"), schema.get("maximum")
    fixed: list[Labelled] = [
        ("zero", 0),
        ("minus one", -1),
        ("2^63", 2**63),
        ("numeric string", "3"),
        ("fraction", 2.5),
        ("integral float", 3.0),
        *wrong_types("integer", "string"),
    ]
    if low is not None:
        fixed += [("below the minimum", low - 1), ("the minimum", low)]
    if high is not None:
        fixed += [("above the maximum", high + 1), ("the maximum", high)]
    in_range = st.integers(-1000 if low is None else low, 10**6 if high is None else high)
    return st.one_of(st.sampled_from(fixed), in_range.map(lambda v: ("in range", v)))


def number_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    low, high = schema.get("minimum"), schema.get("maximum")
    fixed: list[Labelled] = [
        ("zero", 0.0),
        ("negative", -0.5),
        ("an integer", 1),
        ("numeric string", "0.1"),
        ("NaN", math.nan),
        ("infinity", math.inf),
        ("minus infinity", -math.inf),
        ("1e300", 1e300),
        ("1e-300", 1e-300),
        *wrong_types("integer", "string"),
    ]
    if low is not None:
        fixed += [("below the minimum", low - 0.5), ("the minimum", low), ("just above the minimum", low + 1e-9)]
    if high is not None:
        fixed += [("above the maximum", high + 0.5), ("the maximum", high), ("just below the maximum", high - 1e-9)]
    in_range = st.floats(
        -1e6 if low is None else low,
        1e6 if high is None else high,
        allow_nan=False,
        exclude_min=bool(schema.get("exclusiveMinimum")) and low is not None,
        exclude_max=bool(schema.get("exclusiveMaximum")) and high is not None,
    )
    return st.one_of(st.sampled_from(fixed), in_range.map(lambda v: ("in range", v)))


def string_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    if "enum" in schema:
        known = [("a known value", value) for value in schema["enum"]]
        odd: list[Labelled] = [
            ("unknown value", "bogus"),
            ("capitalised value", str(schema["enum"][0]).upper()),
            ("empty string", ""),
        ]
        return st.sampled_from([*known, *odd, *wrong_types("string")])
    fixed = [*TEXTS, *wrong_types("string")]
    limit = schema.get("maxLength")
    if limit is not None:
        fixed += [("the longest", "a" * limit), ("one too long", "a" * (limit + 1))]
    drawn = st.text(max_size=12).map(lambda text: ("drawn text", text))
    return st.one_of(st.sampled_from(fixed), drawn)


def array_values(schema: Schema) -> st.SearchStrategy[Labelled]:
    fixed: list[Labelled] = [
        ("empty list", []),
        ("list of null", [None]),
        ("list of integers", [1]),
        ("list of strings", ["a"]),
        ("list of objects", [{"a": 1}]),
        *wrong_types("array"),
    ]
    limit = schema.get("maxItems")
    if limit is not None and (schema.get("items") or {}).get("type") == "string":
        fixed.append(("one item too many", [f"item{i}" for i in range(limit + 1)]))
    return st.sampled_from(fixed)


def values_for(schema: Schema) -> st.SearchStrategy[Labelled]:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return st.sampled_from(QUANTITIES)
    if kind == "integer":
        return integer_values(schema)
    if kind == "number":
        return number_values(schema)
    if kind == "string":
        return string_values(schema)
    if kind == "boolean":
        return st.sampled_from([("true", True), ("false", False), ("string true", "true"), ("one", 1), ("null", None)])
    if kind == "array":
        return array_values(schema)
    if kind == "object":
        return st.sampled_from([("empty object", {}), *wrong_types("object")])
    return st.sampled_from([("any integer", 1), ("any string", "x"), ("any list", [1]), ("null", None)])


def mutations_at(spot: Spot) -> st.SearchStrategy[Mutation]:
    kind = str(spot.schema.get("type", "any"))
    where = dotted(spot.path)
    changed = values_for(spot.schema).map(lambda lv: Mutation(f"{kind} {where}: {lv[0]}", ((spot.path, lv[1]),)))
    removed = Mutation(
        f"removed {'required ' if spot.required else ''}{where}",
        ((spot.path, REMOVE),),
        "invalid" if spot.required else "unknown",
    )
    options = [changed, st.just(removed)]
    closed = (
        kind == "object"
        and not spot.schema.get("x-kubernetes-preserve-unknown-fields")
        and "additionalProperties" not in spot.schema
    )
    if closed:
        options.append(st.just(Mutation(f"unknown field in {where}", (((*spot.path, "bogusField"), 1),), "invalid")))
    return st.one_of(options)


def schema_mutations(kind: str) -> st.SearchStrategy[Mutation]:
    return st.sampled_from(spots(kind)).flatmap(mutations_at)


@st.composite
def spec_cases(draw: st.DrawFn) -> SpecCase:
    base = draw(st.sampled_from(weighted_bases()))
    pool = st.one_of(st.sampled_from(CATALOGUE[base.kind]), schema_mutations(base.kind))
    mutations = draw(st.lists(pool, min_size=1, max_size=2, unique_by=lambda m: m.label))
    return SpecCase(base, tuple(mutations))


def catalogue_cases() -> list[SpecCase]:
    """Every catalogue entry once, on the first example of its kind, and every base unchanged."""
    job, deployment = base_named("FineTuneJob", "complete"), base_named("ModelDeployment", "modeldeployment.yaml")
    cases = [SpecCase(base, ()) for base in bases()]
    cases += [SpecCase(job, (mutation,)) for mutation in JOB_MUTATIONS]
    cases += [SpecCase(deployment, (mutation,)) for mutation in DEPLOYMENT_MUTATIONS]
    minimal = base_named("FineTuneJob", "minimal")
    cases += [SpecCase(minimal, (mutation,)) for mutation in JOB_MUTATIONS if "name" not in mutation.label]
    return cases


# The two verdicts.


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    detail: str
    crashed: bool = False


@dataclass
class Judged:
    case: SpecCase
    local: Verdict
    server: Verdict
    minimal: SpecCase | None = None

    @property
    def agree(self) -> bool:
        return self.local.accepted == self.server.accepted and not self.local.crashed

    @property
    def direction(self) -> str:
        if self.local.crashed:
            return "kubetune validate crashed"
        if self.local.accepted:
            return "kubetune validate accepts, the API server refuses"
        return "kubetune validate refuses, the API server admits"

    def meets_intent(self) -> bool:
        intent = self.case.intent
        if intent == "unknown":
            return True
        wanted = intent == "valid"
        return self.local.accepted == wanted and self.server.accepted == wanted


def local_verdict(document: Manifest) -> Verdict:
    """What `kubetune validate` says: no problems means accepted."""
    try:
        problems = problems_of(copy.deepcopy(document))
    except Exception as error:  # a crash of the checker is a finding, not a verdict
        return Verdict(False, f"{type(error).__name__}: {error}", crashed=True)
    return Verdict(not problems, "; ".join(str(problem) for problem in problems))


def server_verdict(kube: Kube, namespace: str, document: Manifest) -> Verdict:
    """What admission says: a server-side dry run (nothing is created) with kubectl's strict field validation."""
    path = collection_path(API_VERSION, str(document.get("kind")), namespace)
    try:
        kube.request("POST", path, body=document, query={"dryRun": "All", "fieldValidation": "Strict"})
    except ApiError as error:
        if error.status in (400, 422):
            return Verdict(False, error.message)
        raise
    return Verdict(True, "")


def judge(kube: Kube, namespace: str, case: SpecCase) -> Judged:
    document = case.document
    return Judged(case, local_verdict(document), server_verdict(kube, namespace, document))


def smallest_disagreement(kube: Kube, namespace: str, judged: Judged) -> SpecCase | None:
    """A single mutation of the case that alone shows the same disagreement, if there is one."""
    if len(judged.case.mutations) < 2:
        return judged.case
    for mutation in judged.case.mutations:
        single = judge(kube, namespace, SpecCase(judged.case.base, (mutation,)))
        if not single.agree and single.direction == judged.direction:
            return single.case
    return None


def document_key(document: Manifest) -> str:
    return json.dumps(document, sort_keys=True, allow_nan=True)


@dataclass
class SpecVerdicts:
    judged: list[Judged] = field(default_factory=list)
    generated: int = 0
    duplicates: int = 0
    catalogued: int = 0

    def counts(self) -> dict[str, Any]:
        by_kind = Counter(j.case.kind for j in self.judged)
        intent = [j for j in self.judged if j.case.intent != "unknown"]
        return {
            "tried": len(self.judged),
            "catalogue_cases": self.catalogued,
            "generated_cases": self.generated,
            "generated_duplicates_skipped": self.duplicates,
            "finetunejobs": by_kind["FineTuneJob"],
            "modeldeployments": by_kind["ModelDeployment"],
            "accepted_by_both": sum(j.local.accepted and j.server.accepted for j in self.judged),
            "rejected_by_both": sum(not j.local.accepted and not j.server.accepted for j in self.judged),
            "disagreements": sum(not j.agree for j in self.judged),
            "validate_accepts_server_refuses": sum(j.local.accepted and not j.server.accepted for j in self.judged),
            "validate_refuses_server_admits": sum(
                not j.local.accepted and j.server.accepted and not j.local.crashed for j in self.judged
            ),
            "validate_crashes": sum(j.local.crashed for j in self.judged),
            "intent_checked": len(intent),
            "intent_violations": sum(not j.meets_intent() for j in intent),
        }


@pytest.fixture(scope="module")
def dry_run_namespace(kube: Kube) -> Iterator[str]:
    name = f"properties-dry-run-{uuid.uuid4().hex[:8]}"
    kube.request(
        "POST", "/api/v1/namespaces", body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    yield name
    kube.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture(scope="module")
def spec_verdicts(kube: Kube, dry_run_namespace: str) -> SpecVerdicts:
    """Every catalogue case and SPEC_EXAMPLES generated ones, each judged by both checkers."""
    verdicts, seen = SpecVerdicts(), set()

    def add(case: SpecCase) -> bool:
        key = document_key(case.document)
        if key in seen:
            return False
        seen.add(key)
        verdicts.judged.append(judge(kube, dry_run_namespace, case))
        return True

    for case in catalogue_cases():
        verdicts.catalogued += add(case)

    @settings(SEED_SETTINGS, max_examples=SPEC_EXAMPLES)
    @given(spec_cases())
    def judge_generated(case: SpecCase) -> None:
        if add(case):
            verdicts.generated += 1
        else:
            verdicts.duplicates += 1

    judge_generated()
    for judged in verdicts.judged:
        if not judged.agree:
            judged.minimal = smallest_disagreement(kube, dry_run_namespace, judged)
    return verdicts


def show_verdicts(judged: Judged) -> str:
    local = "accepts" if judged.local.accepted else f"refuses: {judged.local.detail[:300]}"
    server = "admits" if judged.server.accepted else f"refuses: {judged.server.detail[:300]}"
    return f"      kubetune validate {local}\n      API server {server}"


def disagreement_report(disagreements: list[Judged]) -> str:
    """Every disagreement, grouped by direction and by the mutation that shows it alone."""
    groups: dict[tuple[str, str], list[Judged]] = defaultdict(list)
    for judged in disagreements:
        minimal = judged.minimal or judged.case
        groups[(judged.direction, " + ".join(m.label for m in minimal.mutations) or "(unchanged)")].append(judged)
    lines = [f"{len(disagreements)} manifests where kubetune validate and admission disagree:"]
    for (direction, label), members in sorted(groups.items()):
        smallest = min(members, key=lambda j: (len((j.minimal or j.case).mutations), len(j.case.describe())))
        example = (smallest.minimal or smallest.case).describe()
        lines.append(f"\n  {direction} — {label} ({len(members)} times); smallest: {example}")
        lines.append(show_verdicts(smallest))
        lines += [f"    - {member.case.describe()}" for member in members if member is not smallest]
    return "\n".join(lines)


def test_validate_and_admission_give_the_same_verdict(
    spec_verdicts: SpecVerdicts, tmp_path_factory: pytest.TempPathFactory, record_property: RecordProperty
) -> None:
    write_counts(tmp_path_factory.getbasetemp(), "same-verdict", spec_verdicts.counts(), record_property)
    assert spec_verdicts.counts()["tried"] >= SPEC_EXAMPLES // 2
    disagreements = [judged for judged in spec_verdicts.judged if not judged.agree]
    assert not disagreements, disagreement_report(disagreements)


def test_mistakes_are_refused_and_right_changes_admitted_by_both(
    spec_verdicts: SpecVerdicts, tmp_path_factory: pytest.TempPathFactory, record_property: RecordProperty
) -> None:
    checked = [judged for judged in spec_verdicts.judged if judged.case.intent != "unknown"]
    violations = [judged for judged in checked if not judged.meets_intent()]
    counts = {
        "checked": len(checked),
        "meant_invalid": sum(j.case.intent == "invalid" for j in checked),
        "meant_valid": sum(j.case.intent == "valid" for j in checked),
        "violations": len(violations),
    }
    write_counts(tmp_path_factory.getbasetemp(), "intended-verdict", counts, record_property)
    groups: dict[str, list[Judged]] = defaultdict(list)
    for judged in violations:
        deciding = [m.label for m in judged.case.mutations if m.intent == judged.case.intent] or ["(unchanged)"]
        groups[f"meant {judged.case.intent}: " + " + ".join(deciding)].append(judged)
    lines = [f"{len(violations)} manifests did not get their intended verdict:"]
    for label, members in sorted(groups.items()):
        smallest = min(members, key=lambda j: (len(j.case.mutations), len(j.case.describe())))
        lines += [f"\n  {label} ({len(members)} times); e.g. {smallest.case.describe()}", show_verdicts(smallest)]
    assert not violations, "\n".join(lines)


# No wedge: what admission lets in gets a status.


SHORT_KINDS = {"FineTuneJob": "ftj", "ModelDeployment": "mdep"}


def wedge_candidates(verdicts: SpecVerdicts) -> list[SpecCase]:
    """Admitted manifests, the doubtful and wrong-by-intent ones first, one per mutation, then the rest."""
    admitted = [j.case for j in verdicts.judged if j.server.accepted and j.case.mutations]

    def priority(case: SpecCase) -> int:
        catalogued = [m for m in case.mutations if m.catalogued]
        if any(m.intent != "valid" for m in catalogued):
            return 0
        return 1 if catalogued else 2

    chosen: list[SpecCase] = []
    labels: set[str] = set()
    for case in sorted(admitted, key=priority):
        label = " + ".join(m.label for m in case.mutations)
        if label not in labels and len(chosen) < NO_WEDGE_SAMPLE:
            chosen.append(case)
            labels.add(label)
    return chosen


def named_for_creation(case: SpecCase, index: int, taken: set[tuple[str, str]]) -> Manifest | None:
    """The case's manifest with a name of its own (a mutated name is kept); None when that name is taken."""
    document = case.document
    renames = any(path == ("metadata", "name") for m in case.mutations for path, _ in m.edits)
    name = str(document["metadata"]["name"]) if renames else f"{SHORT_KINDS[case.kind]}-{index}"
    if (case.kind, name) in taken:
        return None
    taken.add((case.kind, name))
    return with_edit(document, ("metadata", "name"), name)


def create_the_examples_secrets(kube: Kube, namespace: str) -> None:
    """The Secrets the examples name, so that their reconciles go past the Secret check to the rest of the spec."""
    for name, data in (("training-storage", {"AWS_ACCESS_KEY_ID": "id"}), ("support-tickets-endpoint", {"token": "t"})):
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}}
        kube.create({**secret, "stringData": data})


def settled(body: Manifest | None) -> bool:
    """A status with a condition that has a reason and is computed for the object's generation."""
    if body is None:
        return False
    generation = body["metadata"].get("generation")
    return any(c.get("reason") and c.get("observedGeneration") == generation for c in conditions(body).values())


def test_admitted_manifests_never_wedge_the_operator(
    kube: Kube,
    namespace: str,
    operator: InProcessOperator,
    spec_verdicts: SpecVerdicts,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: RecordProperty,
) -> None:
    created: list[tuple[SpecCase, Manifest]] = []
    refused: list[str] = []
    taken: set[tuple[str, str]] = set()
    create_the_examples_secrets(kube, namespace)
    with CapturedLogs({"kubetune": logging.INFO}) as logs:
        for index, case in enumerate(wedge_candidates(spec_verdicts)):
            document = named_for_creation(case, index, taken)
            if document is None:
                continue
            path = collection_path(API_VERSION, case.kind, namespace)
            try:
                body = kube.request("POST", path, body=document, query={"fieldValidation": "Strict"})
            except ApiError as error:  # admitted in the dry run but not now: also worth knowing
                refused.append(f"{case.describe()}: {error}")
                continue
            created.append((case, body))
        deadline = time.monotonic() + NO_WEDGE_SECONDS
        waiting = list(created)
        while waiting and time.monotonic() < deadline:
            waiting = [(case, body) for case, body in waiting if not settled(current(kube, body))]
            time.sleep(0.5)
    counts: dict[str, Any] = {"created": len(created), "settled": len(created) - len(waiting)}
    counts |= {"wedged": len(waiting), "refused_on_create": len(refused)}
    counts["sample"] = [case.describe()[:200] for case, _ in created]
    write_counts(tmp_path_factory.getbasetemp(), "no-wedge", counts, record_property)
    assert len(created) >= NO_WEDGE_SAMPLE // 2
    problems = [f"{len(waiting)} of {len(created)} admitted objects had no reasoned status after {NO_WEDGE_SECONDS} s:"]
    for case, body in waiting:
        name = body["metadata"]["name"]
        problems.append(f"  - {case.kind} {name!r} ({case.describe()}): status {shown(status_of(kube, body), 300)}")
        mentions = [line.splitlines()[0] for line in logs.lines() if f"{namespace}/{name}" in line][-2:]
        problems += [f"      log: {line[:400]}" for line in mentions]
    unhandled = logs.unhandled(namespace)
    problems.append(f"{len(unhandled)} unhandled exceptions logged:")
    problems += [f"  - {line[:1500]}" for line in unhandled[:5]]
    assert not waiting and not unhandled and not refused, "\n".join(problems + refused)


def current(kube: Kube, body: Manifest) -> Manifest | None:
    meta = body["metadata"]
    return kube.get(API_VERSION, body["kind"], meta["namespace"], meta["name"])


def status_of(kube: Kube, body: Manifest) -> Any:
    return (current(kube, body) or {}).get("status")


# Reports: whatever a run writes, the status keeps updating.


@dataclass(frozen=True)
class Payload:
    """What a run might write under report.json: a kind of junk, which part of it, and the text."""

    kind: str
    detail: str
    text: str

    @property
    def label(self) -> str:
        return f"{self.kind}: {self.detail}"


def report_text(document: Any) -> str:
    return json.dumps(document, allow_nan=True)


def a_report(**fields: Any) -> Manifest:
    report: Manifest = {
        "schemaVersion": 1,
        "stage": "train",
        "step": 3,
        "totalSteps": 100,
        "epoch": 0.1,
        "loss": 1.5,
        "metricsBefore": {"accuracy": 0.4},
        "metricsAfter": {"accuracy": 0.7},
        "variants": {"int8": {"uri": "s3://out/int8", "metrics": {"accuracy": 0.69}, "latencyMsP50": 12.5}},
        "bestHyperparameters": {"learningRate": 0.001},
    }
    for dotted_path, value in fields.items():
        report = with_edit(report, tuple(dotted_path.split("__")), value)
    return report


NUMBER_FIELDS = [
    "loss",
    "epoch",
    "metricsAfter__accuracy",
    "metricsBefore__accuracy",
    "variants__int8__latencyMsP50",
    "variants__int8__metrics__accuracy",
    "bestHyperparameters__learningRate",
]
STRING_FIELDS = [
    "message",
    "error",
    "bestVariant",
    "manifestUri",
    "variants__int8__uri",
    "variants__int8__reason",
    "bestHyperparameters__note",
    "someFutureField",
]
HUGE_SIZES = [5_000, 70_000, 300_000, 900_000]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20))
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
BROKEN_JSON = [
    "",
    "{",
    '{"stage": "train", "step": 5',
    "null",
    "[]",
    '"train"',
    "42",
    "NaN",
    "{'stage': 'train'}",
    '{"stage": "train"}}',
    "\u0000\u0001",
    '{"stage": "train", "step": 5,}',
]


def valid_reports() -> st.SearchStrategy[Payload]:
    reports = st.builds(
        a_report,
        stage=st.sampled_from([stage.value for stage in Stage]),
        step=st.integers(0, 10**6),
        loss=st.floats(-1e6, 1e6, allow_nan=False),
        message=st.text(max_size=200),
    )
    return reports.map(lambda r: Payload("valid report", f"stage {r['stage']}", report_text(r)))


def non_finite_reports() -> st.SearchStrategy[Payload]:
    def build(where: str, value: float) -> Payload:
        return Payload(
            "non-finite number", f"{where.replace('__', '.')} = {value}", report_text(a_report(**{where: value}))
        )

    return st.builds(build, st.sampled_from(NUMBER_FIELDS), st.sampled_from([math.nan, math.inf, -math.inf]))


def huge_reports() -> st.SearchStrategy[Payload]:
    def long_string(where: str, size: int) -> Payload:
        return Payload(
            "huge string",
            f"{where.replace('__', '.')} of {size} characters",
            report_text(a_report(**{where: "x" * size})),
        )

    def many_entries(where: str, count: int) -> Payload:
        entries: dict[str, Any] = {f"k{i:06d}": 0.5 for i in range(count)}
        if where == "variants":
            entries = {f"v{i:05d}": {"uri": f"s3://out/v{i}"} for i in range(count)}
        return Payload("many entries", f"{where} with {count} entries", report_text(a_report(**{where: entries})))

    strings = st.builds(long_string, st.sampled_from(STRING_FIELDS), st.sampled_from(HUGE_SIZES))
    entries = st.builds(
        many_entries,
        st.sampled_from(["metricsAfter", "metricsBefore", "variants", "bestHyperparameters"]),
        st.sampled_from([500, 5_000, 20_000]),
    )
    return st.one_of(strings, entries)


def odd_reports() -> st.SearchStrategy[Payload]:
    def unknown_fields(extra: dict[str, Any]) -> Payload:
        return Payload("unknown fields", ", ".join(sorted(extra))[:80] or "none", report_text({**a_report(), **extra}))

    def wrong_type(where: str, value: Any) -> Payload:
        report = a_report(**{where: value})
        return Payload("wrong type", f"{where.replace('__', '.')} = {shown(value, 40)}", report_text(report))

    def nested(depth: int) -> Payload:
        junk = '{"a":' * depth + "1" + "}" * depth
        text = report_text(a_report(bestHyperparameters={"deep": 0})).replace('{"deep": 0}', junk)
        return Payload("deeply nested", f"bestHyperparameters {depth} levels deep", text)

    unknown = st.dictionaries(st.text(min_size=1, max_size=12), ANY_JSON, min_size=1, max_size=4).map(unknown_fields)
    wrong = st.builds(
        wrong_type,
        st.sampled_from(
            ["stage", "step", "schemaVersion", "metricsAfter", "variants", "bestHyperparameters", "updatedAt"]
        ),
        st.sampled_from(["ten", -1, 2**70, [1, 2], {"x": "y"}, True, None, 1.5, "yesterday"]),
    )
    deep = st.builds(nested, st.sampled_from([10, 60, 150, 600, 5_000]))
    broken = st.sampled_from(BROKEN_JSON).map(lambda text: Payload("invalid JSON", repr(text)[:40], text))
    arbitrary = ANY_JSON.map(lambda value: Payload("arbitrary JSON", shown(value, 40), report_text(value)))
    return st.one_of(unknown, wrong, deep, broken, arbitrary)


def report_payloads() -> st.SearchStrategy[Payload]:
    return st.one_of(valid_reports(), non_finite_reports(), huge_reports(), odd_reports())


FIXED_PAYLOADS = [
    Payload("non-finite number", "loss = NaN", report_text(a_report(loss=math.nan))),
    Payload(
        "non-finite number", "metricsAfter.accuracy = Infinity", report_text(a_report(metricsAfter__accuracy=math.inf))
    ),
    Payload("non-finite number", "epoch = -Infinity", report_text(a_report(epoch=-math.inf))),
    Payload(
        "huge string",
        "bestHyperparameters.note of 300000 characters",
        report_text(a_report(bestHyperparameters__note="x" * 300_000)),
    ),
    Payload("huge string", "message of 900000 characters", report_text(a_report(message="x" * 900_000))),
    Payload(
        "many entries",
        "metricsAfter with 20000 entries",
        report_text(a_report(metricsAfter={f"m{i}": 0.5 for i in range(20_000)})),
    ),
    Payload("invalid JSON", "truncated", '{"stage": "train", "step": 5'),
    Payload("wrong type", "step = 'ten'", report_text(a_report(step="ten"))),
]


def finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(item) for item in value.values())
    if isinstance(value, list):
        return all(finite(item) for item in value)
    return True


def reconciles_done() -> float:
    return sum(
        REGISTRY.get_sample_value("kubetune_reconciles_total", {"kind": "FineTuneJob", "result": result}) or 0.0
        for result in ("ok", "error")
    )


@dataclass
class ReportRun:
    """A FineTuneJob with a running run whose report ConfigMap the test writes, as the runtime would."""

    kube: Kube
    namespace: str
    job: str

    @property
    def run(self) -> str:
        return f"{self.job}-r1"

    def start(self) -> None:
        document = yaml.safe_load((EXAMPLES / "finetunejob-minimal.yaml").read_text())
        document["metadata"] = {"name": self.job, "namespace": self.namespace}
        self.kube.create(document)
        eventually(lambda: self.kube.get("ray.io/v1", "RayJob", self.namespace, self.run), timeout=60, what=self.run)
        set_ray_job_status(self.kube, self.namespace, self.run, **RUNNING, message="started")
        eventually(lambda: self.status().get("phase") == "Running", what=f"{self.job} running")

    def status(self) -> Manifest:
        body = self.kube.get(*JOB, self.namespace, self.job)
        return (body or {}).get("status") or {}

    def last_run(self) -> Manifest:
        runs = self.status().get("runs") or [{}]
        return dict(runs[-1])

    def write(self, text: str) -> None:
        ref = ObjectRef("v1", "ConfigMap", self.namespace, f"{self.run}-report")
        self.kube.patch(ref, {"data": {REPORT_KEY: text}})

    def ray_job_message(self) -> Any:
        return (self.last_run().get("rayJob") or {}).get("message")

    def progress(self) -> Manifest:
        return dict(self.last_run().get("progress") or {})

    def follows(self, probe: Callable[[], bool]) -> bool:
        """Whether `probe` holds within REPORT_WAIT_SECONDS."""
        deadline = time.monotonic() + REPORT_WAIT_SECONDS
        while time.monotonic() < deadline:
            if probe():
                return True
            time.sleep(0.1)
        return False

    def wait_for_a_reconcile_since(self, count: float, timeout: float = 3.0) -> None:
        """Give the operator a pass after a write (reconciles counted in-process); go on after `timeout`."""
        deadline = time.monotonic() + timeout
        while reconciles_done() <= count and time.monotonic() < deadline:
            time.sleep(0.05)


@dataclass
class ReportOutcomes:
    tried: int = 0
    not_written: int = 0
    skipped: int = 0
    failures: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    smallest: dict[str, Payload] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)

    def failed(self, payload: Payload, what: str) -> None:
        self.failures[payload.label].append(what)
        known = self.smallest.get(payload.kind)
        if known is None or len(payload.text) < len(known.text):
            self.smallest[payload.kind] = payload

    def counts(self) -> dict[str, Any]:
        return {
            "tried": self.tried,
            "not_written_too_large": self.not_written,
            "skipped": self.skipped,
            "failed": sum(len(f) for f in self.failures.values()),
            "failed_labels": len(self.failures),
            "by_kind": dict(self.kinds),
        }


def try_payload(run: ReportRun, payload: Payload, number: int, outcomes: ReportOutcomes) -> bool:
    """Write the payload, then check the status follows the RayJob and the next valid report.

    False when something failed (the next payloads then go to a fresh job).
    """
    before = reconciles_done()
    try:
        run.write(payload.text)
    except ApiError as error:
        if error.status in (413, 422):  # larger than a ConfigMap may be: nothing a run could write
            outcomes.not_written += 1
            return True
        raise
    outcomes.tried += 1
    outcomes.kinds[payload.kind] += 1
    run.wait_for_a_reconcile_since(before)
    failures = len(outcomes.failures.get(payload.label, []))
    marker = f"kuberay-{number}"
    set_ray_job_status(run.kube, run.namespace, run.run, **RUNNING, message=marker)
    if not run.follows(lambda: run.ray_job_message() == marker):
        outcomes.failed(
            payload, f"the status stopped following the RayJob while report.json held it: {shown_status(run)}"
        )
    step, message = 100_000 + number, f"probe-{number}"
    run.write(json.dumps(RunReport(stage=Stage.TRAIN, step=step, total_steps=10**6, message=message).to_wire()))
    if not run.follows(lambda: run.progress().get("step") == step and run.progress().get("message") == message):
        outcomes.failed(payload, f"the next valid report did not reach the status: {shown_status(run)}")
    status = run.status()
    if not finite(status):
        outcomes.failed(payload, "the status holds a non-finite number")
    size = len(json.dumps(status))
    if size > STATUS_MAX_BYTES:
        outcomes.failed(payload, f"the status is {size} bytes, over {STATUS_MAX_BYTES}")
    return len(outcomes.failures.get(payload.label, [])) == failures


def shown_status(run: ReportRun) -> str:
    last = run.last_run()
    return shown({"rayJob": last.get("rayJob"), "progress": last.get("progress")}, 300)


def report_failures(outcomes: ReportOutcomes) -> str:
    lines = [f"{sum(len(f) for f in outcomes.failures.values())} failures over {outcomes.tried} report payloads:"]
    for label, whats in sorted(outcomes.failures.items()):
        lines.append(f"  - {label} ({len(whats)} times): {whats[0][:400]}")
    lines.append("smallest failing payload per kind:")
    for kind, payload in sorted(outcomes.smallest.items()):
        lines.append(
            f"  - {kind}: {payload.detail}; report.json = {payload.text[:200]!r} ({len(payload.text)} characters)"
        )
    return "\n".join(lines)


def test_no_report_stops_status_updates(
    kube: Kube,
    namespace: str,
    operator: InProcessOperator,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: RecordProperty,
) -> None:
    outcomes, runs = ReportOutcomes(), [ReportRun(kube, namespace, "reports")]
    runs[-1].start()
    started = time.monotonic()

    def attempt(payload: Payload) -> None:
        stuck_before = len(outcomes.failures.get(payload.label, []))
        if stuck_before or time.monotonic() - started > REPORT_BUDGET_SECONDS:
            outcomes.skipped += 1  # one failure per label is enough; the budget bounds the test
            return
        if len(payload.text.encode()) > CONFIGMAP_PAYLOAD_MAX:
            outcomes.not_written += 1
            return
        if not try_payload(runs[-1], payload, outcomes.tried + outcomes.not_written, outcomes):
            runs.append(ReportRun(kube, namespace, f"reports-{len(runs)}"))  # a fresh job for the next payloads
            runs[-1].start()

    for payload in FIXED_PAYLOADS:
        attempt(payload)

    @settings(SEED_SETTINGS, max_examples=REPORT_EXAMPLES)
    @given(report_payloads())
    def attempt_generated(payload: Payload) -> None:
        attempt(payload)

    attempt_generated()
    write_counts(tmp_path_factory.getbasetemp(), "reports", outcomes.counts(), record_property)
    assert outcomes.tried >= len(FIXED_PAYLOADS)
    assert not outcomes.failures, report_failures(outcomes)
