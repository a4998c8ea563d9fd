"""The CRDs at work in a real API server: examples are admitted, bad manifests are refused naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from kubetune.operator.kube import ApiError, Kube

from ..conftest import DELETE, EXAMPLES, REPO_ROOT, load_example, mutated
from ..controlplane import ControlPlane


def admit(kube: Kube, namespace: str, document: dict[str, Any], *, dry_run: bool = True) -> dict[str, Any]:
    """Create `document` as kubectl does (strict field validation); dry-run unless asked."""
    query = {"fieldValidation": "Strict", **({"dryRun": "All"} if dry_run else {})}
    path = kube.collection_path(document["apiVersion"], document["kind"], namespace)
    return kube.request("POST", path, body=document, query=query)


def refusal(kube: Kube, namespace: str, document: dict[str, Any]) -> str:
    with pytest.raises(ApiError) as caught:
        admit(kube, namespace, document)
    assert caught.value.status in (400, 422), caught.value
    return caught.value.message


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_admitted(kube: Kube, namespace: str, path: Any) -> None:
    for document in yaml.safe_load_all(path.read_text()):
        created = admit(kube, namespace, document, dry_run=False)
        assert created["metadata"]["uid"]
        # Defaults come from the schema, as the models declare them.
        if document["kind"] == "FineTuneJob":
            assert created["spec"]["concurrencyPolicy"] in ("Forbid", "Replace", "Queue")


JOB_CASES: list[tuple[str, Any, str]] = [
    # (dotted path, value, what the server's message must contain: the field)
    ("spec.model", DELETE, "spec.model: Required value"),
    ("spec.data.train", DELETE, "spec.data.train: Required value"),
    ("spec.output", DELETE, "spec.output: Required value"),
    ("spec.model.uri", "ftp://example.com/model", "spec.model.uri"),
    ("spec.model.uri", "s3://", "spec.model.uri"),
    ("spec.data.train", "pvc://Bad_Claim/x", "spec.data.train"),
    ("spec.output.uri", 42, "spec.output.uri"),
    ("spec.model.task", "translation", "spec.model.task: Unsupported value"),
    ("spec.data.format", "xml", "spec.data.format: Unsupported value"),
    ("spec.data.split.testFraction", 1.5, "spec.data.split.testFraction"),
    ("spec.data.maxSamples", 0, "spec.data.maxSamples"),
    ("spec.data.packing", True, "spec.data.packing: Invalid value"),
    ("spec.data.packing", "yes", "spec.data.packing"),
    ("spec.method.type", "adapter", "spec.method.type: Unsupported value"),
    ("spec.method", {"type": "full", "lora": {"rank": 8}}, "spec.method"),
    ("spec.method.lora", {"rank": 0}, "spec.method.lora.rank"),
    ("spec.method", {"type": "qlora"}, "qlora"),
    ("spec.hyperparameters", {"learningRate": -1}, "spec.hyperparameters.learningRate"),
    ("spec.hyperparameters", {"epochs": "three"}, "spec.hyperparameters.epochs"),
    ("spec.hyperparameters", {"batchSize": 0}, "spec.hyperparameters.batchSize"),
    ("spec.hyperparameters", {"optimizer": "lion"}, "spec.hyperparameters.optimizer"),
    ("spec.hyperparameters", {"learningrate": 0.1}, 'unknown field "spec.hyperparameters.learningrate"'),
    ("spec.search", {"space": {}}, "spec.search.space"),
    (
        "spec.search",
        {"space": {"learningRate": {"type": "gaussian", "low": 0.1, "high": 1}}},
        "spec.search.space.learningRate.type: Unsupported value",
    ),
    (
        "spec.search",
        {"maxConcurrentTrials": 0, "space": {"epochs": {"type": "choice", "values": [1]}}},
        "spec.search.maxConcurrentTrials",
    ),
    ("spec.compression.pruning", {"method": "magnitude", "amount": 1.0}, "spec.compression.pruning.amount"),
    ("spec.compression.quantization.method", "int4", "spec.compression.quantization.method"),
    ("spec.compression.maxAccuracyDrop", -0.1, "spec.compression.maxAccuracyDrop"),
    ("spec.resources.workers", 0, "spec.resources.workers"),
    ("spec.resources.gpusPerWorker", -1, "spec.resources.gpusPerWorker"),
    ("spec.resources.cpuPerWorker", "two", "spec.resources.cpuPerWorker"),
    ("spec.resources.tolerations", [{"operator": "Maybe"}], "spec.resources.tolerations[0].operator"),
    ("spec.resources.nodeSelector", {"node-pool": "gpu pool"}, "spec.resources.nodeSelector.node-pool"),
    ("spec.resources.head.affinity", {"podAntiAffinity": {"x": 1}}, 'unknown field "spec.resources.head.affinity'),
    (
        "spec.resources.affinity",
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "node-pool", "operator": "In"}]}]
                }
            }
        },
        "values must be non-empty with In and NotIn",
    ),
    (
        "spec.resources.affinity",
        {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{"labelSelector": {}}]}},
        "spec.resources.affinity.podAffinity.requiredDuringSchedulingIgnoredDuringExecution[0].topologyKey",
    ),
    ("spec.resources.priorityClassName", "High_Priority", "spec.resources.priorityClassName"),
    ("spec.storage.credentialsSecret", {"name": "Not A Name"}, "spec.storage.credentialsSecret.name"),
    ("spec.queueName", "Queue!", "spec.queueName"),
    ("spec.backoffLimit", -1, "spec.backoffLimit"),
    ("spec.schedule", "every day", "spec.schedule"),
    ("spec.schedule", "0 0 31 2 *", 'spec.schedule: Invalid value: "object": schedule never fires'),
    ("spec.schedule", "30 4 31 4,11 ?", "schedule never fires"),
    ("spec.resources.cpuPerWorker", "-2", "spec.resources.cpuPerWorker"),
    ("spec.resources.cpuPerWorker", "0", "spec.resources.cpuPerWorker"),
    ("spec.resources.memoryPerWorker", 0, "must be a positive resource quantity"),
    ("spec.resources.head.cpu", -2, "must be a positive resource quantity"),
    ("spec.model", {"uri": "hf://org/m", "trustRemoteCode": True, "revision": "main"}, "spec.model.revision"),
    ("spec.concurrencyPolicy", "Allow", "spec.concurrencyPolicy: Unsupported value"),
    ("spec.historyLimit", 0, "spec.historyLimit"),
    ("spec.unknownField", 1, 'unknown field "spec.unknownField"'),
    ("spec.hyperparameters", {"gradientCheckpointing": "Auto"}, "spec.hyperparameters.gradientCheckpointing"),
    ("spec.hyperparameters", {"gradientCheckpointing": "yes"}, "spec.hyperparameters.gradientCheckpointing"),
    ("spec.hyperparameters", {"gradientCheckpointing": 7}, "spec.hyperparameters.gradientCheckpointing"),
    ("spec.hyperparameters", {"batchSize": "Auto"}, "spec.hyperparameters.batchSize"),
    ("spec.hyperparameters", {"batchSize": 0}, "spec.hyperparameters.batchSize"),
    ("spec.hyperparameters", {"maxSequenceLength": "longest"}, "spec.hyperparameters.maxSequenceLength"),
    ("spec.hyperparameters", {"maxSequenceLength": 4}, "spec.hyperparameters.maxSequenceLength"),
    ("spec.hyperparameters", {"precision": "Auto"}, "spec.hyperparameters.precision: Unsupported value"),
    (
        "spec.hyperparameters",
        {"batchSize": 8, "effectiveBatchSize": 16},
        "spec.hyperparameters.effectiveBatchSize: Invalid value",
    ),
    ("spec.hyperparameters", {"effectiveBatchSize": 16}, "effectiveBatchSize applies to batchSize auto only"),
    (
        "spec.hyperparameters",
        {"sequenceLengthQuantile": 0.9},
        "spec.hyperparameters.sequenceLengthQuantile: Invalid value",
    ),
    (
        "spec.hyperparameters",
        {"maxSequenceLength": "auto", "sequenceLengthQuantile": 0},
        "spec.hyperparameters.sequenceLengthQuantile",
    ),
]

DEPLOYMENT_CASES: list[tuple[str, Any, str]] = [
    ("spec.model", {}, "spec.model"),
    ("spec.model", {"uri": "s3://models/a", "fromFineTuneJob": {"name": "x"}}, "spec.model"),
    ("spec.model.fromFineTuneJob.name", DELETE, "spec.model.fromFineTuneJob.name: Required value"),
    ("spec.model.fromFineTuneJob.variant", "fp8", "spec.model.fromFineTuneJob.variant"),
    ("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}, "spec.autoscaling"),
    ("spec.autoscaling.targetOngoingRequests", 0, "spec.autoscaling.targetOngoingRequests"),
    ("spec.resources.gpus", -2, "spec.resources.gpus"),
    ("spec.resources.memory", "0Gi", "spec.resources.memory"),
    ("spec.resources.cpu", -1, "must be a positive resource quantity"),
    ("spec.batching.maxBatchSize", 0, "spec.batching.maxBatchSize"),
    ("spec.auth.tokenSecret", DELETE, "spec.auth.tokenSecret: Required value"),
    ("spec.replicas", 3, 'unknown field "spec.replicas"'),
]


def _ids(cases: list[tuple[str, Any, str]]) -> list[str]:
    return [f"{path}={'<deleted>' if value is DELETE else json.dumps(value)}"[:70] for path, value, _ in cases]


@pytest.mark.parametrize(("path", "value", "expected"), JOB_CASES, ids=_ids(JOB_CASES))
def test_bad_finetunejob_is_refused_naming_the_field(
    kube: Kube, namespace: str, path: str, value: Any, expected: str
) -> None:
    message = refusal(kube, namespace, mutated(load_example("finetunejob-minimal.yaml"), path, value))
    assert expected in message, message


@pytest.mark.parametrize(("path", "value", "expected"), DEPLOYMENT_CASES, ids=_ids(DEPLOYMENT_CASES))
def test_bad_modeldeployment_is_refused_naming_the_field(
    kube: Kube, namespace: str, path: str, value: Any, expected: str
) -> None:
    message = refusal(kube, namespace, mutated(load_example("modeldeployment.yaml"), path, value))
    assert expected in message, message


# Names KubeRay would refuse for the RayJobs and RayServices named after them, and a local output.
CLUSTER_CASES: list[tuple[str, str, Any, str]] = [
    ("finetunejob-minimal.yaml", "metadata.name", "t" * 64, "metadata.name: Too long"),
    ("finetunejob-minimal.yaml", "metadata.name", "support.tickets", "metadata.name: Invalid value"),
    ("finetunejob-minimal.yaml", "metadata.name", "7-tickets", "metadata.name: Invalid value"),
    ("modeldeployment.yaml", "metadata.name", "support.tickets", "metadata.name: Invalid value"),
    ("finetunejob-minimal.yaml", "spec.output.uri", "kubetune-output/run", "spec.output.uri"),
    ("finetunejob-minimal.yaml", "spec.output.uri", "file:///data/out", "must be s3:// or pvc://"),
    ("finetunejob-minimal.yaml", "spec.resources.rayVersion", "2.61.0", "spec.resources.rayVersion"),
]


@pytest.mark.parametrize(
    ("example", "path", "value", "expected"), CLUSTER_CASES, ids=[f"{c[1]}={c[2]}"[:60] for c in CLUSTER_CASES]
)
def test_what_a_cluster_cannot_run_is_refused_naming_the_field(
    kube: Kube, namespace: str, example: str, path: str, value: Any, expected: str
) -> None:
    message = refusal(kube, namespace, mutated(load_example(example), path, value))
    assert expected in message, message


AUTO_VALUES = {
    "batchSize": "auto",
    "effectiveBatchSize": 64,
    "maxSequenceLength": "auto",
    "sequenceLengthQuantile": 0.99,
    "precision": "auto",
    "gradientCheckpointing": "auto",
}


def test_auto_values_are_admitted_and_kept_as_written(kube: Kube, namespace: str) -> None:
    document = mutated(load_example("finetunejob-minimal.yaml"), "spec.hyperparameters", AUTO_VALUES)
    created = admit(kube, namespace, document)
    assert {key: created["spec"]["hyperparameters"][key] for key in AUTO_VALUES} == AUTO_VALUES
    fixed = {"batchSize": 8, "maxSequenceLength": 64, "precision": "bf16", "gradientCheckpointing": True}
    document = mutated(load_example("finetunejob-minimal.yaml"), "spec.hyperparameters", fixed)
    created = admit(kube, namespace, mutated(document, "spec.resources.gpusPerWorker", 1))
    assert {key: created["spec"]["hyperparameters"][key] for key in fixed} == fixed
    document = mutated(load_example("finetunejob-minimal.yaml"), "spec.hyperparameters", {})
    defaults = admit(kube, namespace, document)["spec"]["hyperparameters"]
    assert (defaults["batchSize"], defaults["gradientCheckpointing"], defaults["precision"]) == (16, False, "fp32")


@pytest.mark.parametrize("key", ["batchSize", "maxSequenceLength", "precision"])
def test_a_search_of_an_auto_value_is_refused(kube: Kube, namespace: str, key: str) -> None:
    parameter = {"type": "choice", "options": ["fp32", "bf16"]} if key == "precision" else {
        "type": "choice", "values": [16, 32]}  # fmt: skip
    document = mutated(load_example("finetunejob-minimal.yaml"), "spec.hyperparameters", {key: "auto"})
    message = refusal(kube, namespace, mutated(document, "spec.search", {"space": {key: parameter}}))
    assert f"hyperparameters.{key} is auto" in message and "spec.search.space" in message, message
    options = {"type": "choice", "options": ["auto", "bf16"]}
    message = refusal(kube, namespace, mutated(document, "spec.search", {"space": {"precision": options}}))
    assert "precision" in message, message


def test_packing_is_admitted_for_a_causal_lm(kube: Kube, namespace: str) -> None:
    document = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.data.packing", True)
    document = mutated(document, "spec.output.uri", "pvc://runs/causal-lm")
    assert admit(kube, namespace, document)["spec"]["data"]["packing"] is True
    message = refusal(kube, namespace, mutated(document, "spec.model.task", "text-classification"))
    assert "spec.data.packing" in message and "needs model.task causal-lm" in message, message


def test_preference_objectives_are_admitted_for_a_causal_lm(kube: Kube, namespace: str) -> None:
    document = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.output.uri", "pvc://runs/causal-lm")
    document = mutated(document, "spec.method.objective", "dpo")
    document = mutated(document, "spec.method.preference", {"beta": 0.2, "lossType": "ipo"})
    admitted = admit(kube, namespace, mutated(document, "spec.promotion", {"metric": "preferenceAccuracy"}))
    assert admitted["spec"]["method"]["preference"] == {"beta": 0.2, "lossType": "ipo"}
    message = refusal(kube, namespace, mutated(document, "spec.model.task", "text-classification"))
    assert "spec.method.objective" in message and "needs model.task causal-lm" in message, message
    message = refusal(kube, namespace, mutated(document, "spec.method.objective", "kto"))
    assert "spec.method.preference.lossType" in message, message
    message = refusal(kube, namespace, mutated(document, "spec.data.packing", True))
    assert "spec.data.packing" in message and "needs method.objective sft" in message, message


def test_benchmark_tasks_are_admitted_for_a_causal_lm(kube: Kube, namespace: str) -> None:
    document = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.output.uri", "pvc://runs/causal-lm")
    lm_eval = {"tasks": ["arc_easy", "topics"], "taskFolder": "pvc://tasks/lm", "maxDrop": 0.02}
    document = mutated(document, "spec.evaluation", {"lmEval": lm_eval})
    assert admit(kube, namespace, document)["spec"]["evaluation"]["lmEval"]["tasks"] == ["arc_easy", "topics"]
    message = refusal(kube, namespace, mutated(document, "spec.model.task", "text-classification"))
    assert "spec.evaluation.lmEval" in message and "needs model.task causal-lm" in message, message
    message = refusal(kube, namespace, mutated(document, "spec.evaluation.lmEval.tasks", ["no spaces"]))
    assert "spec.evaluation.lmEval.tasks[0]" in message, message


def test_corpus_is_large_enough() -> None:
    assert len(JOB_CASES) + len(DEPLOYMENT_CASES) >= 25


def test_cel_rule_messages_reach_the_user(kube: Kube, namespace: str) -> None:
    document = mutated(load_example("modeldeployment.yaml"), "spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2})
    assert "minReplicas must not exceed maxReplicas" in refusal(kube, namespace, document)


def test_kubectl_refuses_an_unknown_field(control_plane: ControlPlane, namespace: str) -> None:
    document = mutated(load_example("finetunejob-minimal.yaml"), "spec.resources.gpus", 1)
    with pytest.raises(Exception, match=r'unknown field "spec\.resources\.gpus"'):
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(document))


def test_kubectl_explain_shows_the_descriptions(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("explain", "finetunejob.spec.search").stdout
    assert "FIELDS:" in out and "algorithm" in out and "maxConcurrentTrials" in out
    assert "DESCRIPTION:" in out
    nested = control_plane.kubectl("explain", "ftj.spec.resources.gpusPerWorker").stdout
    assert "GPUs" in nested


def test_kubectl_get_shows_the_printer_columns(control_plane: ControlPlane, kube: Kube, namespace: str) -> None:
    admit(kube, namespace, load_example("finetunejob-minimal.yaml"), dry_run=False)
    admit(kube, namespace, load_example("modeldeployment.yaml"), dry_run=False)
    jobs = control_plane.kubectl("get", "ftj", "-n", namespace).stdout.splitlines()
    assert jobs[0].split()[:2] == ["NAME", "PHASE"] and "MODEL" in jobs[0] and "AGE" in jobs[0]
    assert jobs[1].split()[0] == "support-tickets"
    deployments = control_plane.kubectl("get", "kubetune", "-n", namespace).stdout
    assert "modeldeployment.kubetune.io/support-tickets" in deployments
    assert "finetunejob.kubetune.io/support-tickets" in deployments


def test_the_chart_lints_and_ships_the_generated_crds(control_plane: ControlPlane) -> None:
    chart = str(REPO_ROOT / "charts" / "kubetune")
    assert "0 chart(s) failed" in control_plane.helm("lint", chart).stdout
    shipped = list(yaml.safe_load_all(control_plane.helm("show", "crds", chart).stdout))
    generated = [yaml.safe_load(path.read_text()) for path in sorted((REPO_ROOT / "crds").glob("*.yaml"))]
    # Ours only (the replicas elect their leader on a built-in Lease).
    assert sorted(shipped, key=lambda crd: crd["metadata"]["name"]) == generated
