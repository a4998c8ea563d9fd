"""`kubetune validate` reports field errors and cross-field rules together, in one pass."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.cli.main import main
from kubetune.cli.validate import problems_of, rule_failures, schema_for, with_defaults
from kubetune.operator.api.manifests import parse
from kubetune.runtime.contract.errors import SpecError

from ..conftest import EXAMPLES, load_example, mutated
from ..thread_output import output_of_this_thread

MANY_MISTAKES = Path(__file__).parent / "manifests" / "many-mistakes.yaml"

# Every problem of the fixture: field errors, pydantic cross-field checks and CEL rules.
EXPECTED_JOB = [
    "spec.data.split: validationFraction + testFraction must be below 1 (got 0.6 + 0.5)",
    "spec.hyperparameters.epochs: Input should be greater than or equal to 1",
    "spec.hyperparameters.learningrate: unknown field",
    "spec.hyperparameters.optimizer: Input should be 'adamw', 'adam' or 'sgd'",
    "spec.hyperparameters.precision: precision fp16 needs GPUs: set resources.gpusPerWorker",
    "spec.hyperparameters.warmupSteps: set warmupSteps or warmupRatio, not both",
    "spec.method.lora: lora is set but type is 'full'; use lora, dora or qlora",
    "spec.search.metric: search.metric does not apply to model.task",
    "spec.search.space.learningRate.low: loguniform needs low > 0 (got 0.0)",
]
EXPECTED_DEPLOYMENT = [
    "spec.autoscaling.minReplicas: minReplicas must not exceed maxReplicas",
    "spec.autoscaling.targetOngoingRequests: Input should be greater than 0",
    "spec.model: set exactly one of uri and fromFineTuneJob",
]


def _run(*paths: Path) -> tuple[int, str, str]:
    """`kubetune validate`'s exit code and its whole output (only its own: not other threads')."""
    with output_of_this_thread() as output:
        code = main(["validate", *map(str, paths)])
    return code, output.out, output.err


def _write(tmp_path: Path, *documents: dict[str, Any]) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return path


def _problem_lines(err: str) -> list[str]:
    return [line.strip() for line in err.splitlines() if line.startswith("    ")]


def test_with_the_operators_settings_what_they_refuse_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    control_plane = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
    job = load_example("finetunejob-minimal.yaml")
    job = mutated(job, "spec.model", {"uri": "pvc://models/m", "trustRemoteCode": True})
    job = mutated(job, "spec.resources.tolerations", [control_plane])
    job = mutated(job, "spec.resources.head", {"nodeSelector": {"kubernetes.io/hostname": "cp-1"}})
    path = _write(tmp_path, job)
    monkeypatch.setenv("KUBETUNE_ALLOWED_NODE_SELECTORS", "node-pool")
    assert _run(path)[0] == 0  # the cluster's settings are not known: the manifest is valid
    with output_of_this_thread() as output:
        assert main(["validate", "--operator-settings", str(path)]) == 1
    assert _problem_lines(output.err) == [
        "spec.model.trustRemoteCode: the code of 'pvc://models/m' may not run here (no model's code may run here)",
        "spec.resources.head.nodeSelector: kubernetes.io/hostname=cp-1 is not allowed here (allowed: node-pool)",
        "spec.resources.tolerations[0]: tolerating node-role.kubernetes.io/control-plane (every effect) is not "
        "allowed here (this operator allows no tolerations)",
    ]
    monkeypatch.setenv("KUBETUNE_ALLOWED_TOLERATIONS", "*")
    monkeypatch.setenv("KUBETUNE_ALLOWED_NODE_SELECTORS", "*")
    monkeypatch.setenv("KUBETUNE_ALLOWED_REMOTE_CODE_MODELS", "pvc://models/*")
    with output_of_this_thread():
        assert main(["validate", "--operator-settings", str(path)]) == 0


def test_every_mistake_is_reported_in_one_pass() -> None:
    code, out, err = _run(MANY_MISTAKES)
    assert code == 1
    assert out == ""
    assert f"✗ {MANY_MISTAKES}#1" in err
    assert f"✗ {MANY_MISTAKES}#2" in err
    lines = _problem_lines(err)
    for expected in EXPECTED_JOB + EXPECTED_DEPLOYMENT:
        assert any(line.startswith(expected) for line in lines), expected
    assert len(lines) == len(EXPECTED_JOB) + len(EXPECTED_DEPLOYMENT)  # each once, mirrors merged
    job, deployment = lines[: len(EXPECTED_JOB)], lines[len(EXPECTED_JOB) :]
    assert [line.startswith(e) for line, e in zip(job, EXPECTED_JOB, strict=True)] == [True] * len(job)
    assert deployment == EXPECTED_DEPLOYMENT  # sorted by path


def test_the_console_script_reports_them_too() -> None:
    import subprocess
    import sys

    kubetune = Path(sys.executable).parent / "kubetune"
    result = subprocess.run([str(kubetune), "validate", str(MANY_MISTAKES)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "spec.search.space.learningRate.low: loguniform needs low > 0" in result.stderr


@pytest.mark.parametrize("name", ["finetunejob-complete.yaml", "modeldeployment.yaml", "finetunejob-minimal.yaml"])
def test_valid_examples_still_pass(name: str) -> None:
    code, out, err = _run(EXAMPLES / name)
    assert code == 0, err
    assert out.startswith(f"✓ {EXAMPLES / name}: ")
    assert rule_failures(load_example(name)) == []


def test_packing_passes_both_checkers_on_a_causal_lm() -> None:
    job = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.data.packing", True)
    job = mutated(job, "spec.output.uri", "pvc://runs/causal-lm")  # as on a cluster
    assert parse(job).spec.data.packing  # type: ignore[union-attr]
    assert rule_failures(job) == []


def test_preference_objectives_pass_both_checkers_on_a_causal_lm() -> None:
    job = mutated(load_example("causal-lm/finetunejob.yaml"), "spec.output.uri", "pvc://runs/causal-lm")
    for objective, options in (
        ("dpo", {"beta": 0.2, "lossType": "hinge"}),
        ("orpo", {"beta": 0.2}),
        ("simpo", {"beta": 2.0, "simpoGamma": 0.8}),
        ("kto", {"desirableWeight": 1.0, "undesirableWeight": 1.5}),
    ):
        preference = mutated(mutated(job, "spec.method.objective", objective), "spec.method.preference", options)
        preference = mutated(preference, "spec.promotion", {"metric": "preferenceAccuracy"})
        assert parse(preference).spec.method.objective == objective  # type: ignore[union-attr]
        assert rule_failures(preference) == []


def test_what_other_threads_print_meanwhile_is_not_the_clis() -> None:
    """A library's thread (Ray's driver prints its workers' logs from one) writing during a run stays out."""

    def print_a_worker_log() -> None:
        print("(PlacementGroupCleaner pid=1) Failed to query Ray Train Controller actor state.", file=sys.stderr)
        print("(PlacementGroupCleaner pid=1) a worker's print")

    with output_of_this_thread() as output:
        stray = threading.Thread(target=print_a_worker_log)
        stray.start()
        stray.join()
        code = main(["validate", str(EXAMPLES / "finetunejob-minimal.yaml")])
    assert code == 0
    assert output.err == ""
    assert output.out.startswith(f"✓ {EXAMPLES / 'finetunejob-minimal.yaml'}: "), output.out
    assert "pid=1" not in output.out


def test_remote_code_at_a_full_commit_passes_the_rules() -> None:
    job = mutated(load_example("finetunejob-minimal.yaml"), "spec.model.trustRemoteCode", True)
    pinned = mutated(job, "spec.model.revision", "0123456789abcdef0123456789abcdef01234567")
    assert rule_failures(pinned) == []
    assert rule_failures(mutated(job, "spec.model.uri", "pvc://models/x")) == []  # only hf:// has revisions


def test_header_problems_come_with_the_spec_problems() -> None:
    document = mutated(load_example("finetunejob-minimal.yaml"), "metadata.name", "Not_A_Name")
    document = mutated(document, "spec.hyperparameters", {"epochs": 0})
    assert [str(p) for p in problems_of(document)] == [
        "metadata.name: 'Not_A_Name' is not a DNS-1035 label (lowercase letters, digits and '-', starting with a "
        "letter, no dots), which KubeRay requires of the objects named after it",
        "spec.hyperparameters.epochs: Input should be greater than or equal to 1",
    ]
    assert [str(p) for p in problems_of({"kind": "Pod"})] == [
        "apiVersion: expected kubetune.io/v1alpha1, got None",
        "kind: expected one of FineTuneJob, ModelDeployment, got 'Pod'",
        "metadata.name: expected a name, got None",
    ]


def test_rules_see_the_schema_defaults(tmp_path: Path) -> None:
    job = mutated(load_example("finetunejob-minimal.yaml"), "spec.data.split", {"validationFraction": 0.95})
    defaulted = with_defaults(job, schema_for("FineTuneJob"))
    assert defaulted["spec"]["data"]["split"] == {"validationFraction": 0.95, "testFraction": 0.1, "seed": 42}
    assert defaulted["spec"]["model"]["task"] == "text-classification"
    assert [(f.path, f.message) for f in rule_failures(job)] == [
        ("spec.data.split", "validationFraction + testFraction must be below 1")
    ]
    deployment = mutated(load_example("modeldeployment.yaml"), "spec.autoscaling", {"minReplicas": 6})
    assert [f.path for f in rule_failures(deployment)] == ["spec.autoscaling.minReplicas"]
    code, _, err = _run(_write(tmp_path, job, deployment))
    assert code == 1
    assert _problem_lines(err) == [
        "spec.data.split: validationFraction + testFraction must be below 1 (got 0.95 + 0.1)",
        "spec.autoscaling.minReplicas: minReplicas (6) must not exceed maxReplicas (4)",
    ]


def test_unknown_fields_and_nulls_are_pruned_before_the_rules_run() -> None:
    job = load_example("finetunejob-minimal.yaml")
    job = mutated(job, "spec.method", {"type": "full", "lora": None, "lorra": {"rank": 4}})
    assert [str(p) for p in problems_of(job)] == ["spec.method.lorra: unknown field"]


@pytest.mark.parametrize(
    ("path", "value", "field_error"),
    [
        ("spec.data.split", {"validationFraction": "lots", "testFraction": 0.5}, "spec.data.split.validationFraction"),
        ("spec.hyperparameters", {"warmupSteps": 10, "warmupRatio": "high"}, "spec.hyperparameters.warmupRatio"),
        (
            "spec.search",
            {"space": {"learningRate": {"type": "loguniform", "low": "zero", "high": 0.1}}},
            "spec.search.space.learningRate.low",
        ),
        ("spec.search", {"algorithm": "grid", "space": "all of them"}, "spec.search.space"),
        ("spec.resources", {"gpusPerWorker": "one", "gpuType": "NVIDIA-H100"}, "spec.resources.gpusPerWorker"),
    ],
)
def test_a_wrong_type_read_by_a_rule_gives_the_field_error(
    tmp_path: Path, path: str, value: Any, field_error: str
) -> None:
    job = mutated(load_example("finetunejob-minimal.yaml"), path, value)
    code, _, err = _run(_write(tmp_path, job))
    assert code == 1
    lines = _problem_lines(err)
    assert len(lines) == 1, lines  # the field error, and no rule failure on the unusable value
    assert lines[0].startswith(f"{field_error}: Input should be"), lines
    assert all(line.startswith(("✗", "    ")) for line in err.splitlines()), err  # nothing else on stderr


# Each pydantic cross-field check (a model validator's ValueError) and the CEL rule that mirrors it.
JOB = "finetunejob-minimal.yaml"
LM_JOB = "causal-lm/finetunejob.yaml"
GPUS = ("spec.resources", {"gpusPerWorker": 1})
CROSS_FIELD_CASES = [
    (JOB, [("spec.method", {"type": "full", "lora": {"rank": 4}})], "lora is set", "spec.method.lora"),
    (JOB, [("spec.method", {"type": "lora", "freeze": {}})], "freeze is set", "spec.method.freeze"),
    (JOB, [("spec.method", {"type": "lora", "qlora": {}})], "qlora is set", "spec.method.qlora"),
    (
        JOB,
        [("spec.search", {"space": {"learningRate": {"type": "loguniform", "low": 0, "high": 0.1}}})],
        "loguniform needs low > 0",
        "spec.search.space.learningRate.low",
    ),
    (
        JOB,
        [("spec.search", {"space": {"lora.rank": {"type": "uniform", "low": 16, "high": 8}}})],
        "low (16.0) must be below high (8.0)",
        "spec.search.space.lora.rank.low",
    ),
    (
        JOB,
        [("spec.search", {"algorithm": "grid", "space": {"epochs": {"type": "randint", "low": 1, "high": 4}}})],
        "algorithm grid needs grid or choice",
        "spec.search.space",
    ),
    (
        JOB,
        [("spec.search", {"algorithm": "tpe", "space": {"epochs": {"type": "grid", "values": [1, 2]}}})],
        "algorithm tpe cannot take grid parameters",
        "spec.search.space",
    ),
    (
        JOB,
        [("spec.search", {"asha": {}, "space": {"epochs": {"type": "choice", "values": [1, 2]}}})],
        "asha is set but scheduler is not asha",
        "spec.search.asha",
    ),
    (
        JOB,
        [("spec.search", {"metric": "perplexity", "space": {"epochs": {"type": "choice", "values": [1, 2]}}})],
        "search.metric perplexity does not apply",
        "spec.search.metric",
    ),
    (JOB, [("spec.data.format", "imagefolder")], "data.format imagefolder needs", "spec.data.format"),
    (JOB, [("spec.method.objective", "dpo")], "needs model.task causal-lm", "spec.method.objective"),
    (
        JOB,
        [("spec.evaluation", {"lmEval": {"tasks": ["arc_easy"]}})],
        "evaluation.lmEval scores language models",
        "spec.evaluation.lmEval",
    ),
    (
        LM_JOB,
        [("spec.method.objective", "orpo"), ("spec.method.preference", {"lossType": "ipo"})],
        "lossType is only valid with objective dpo",
        "spec.method.preference.lossType",
    ),
    (
        LM_JOB,
        [("spec.method.objective", "dpo"), ("spec.method.preference", {"simpoGamma": 1.0})],
        "simpoGamma is only valid with objective simpo",
        "spec.method.preference.simpoGamma",
    ),
    (
        LM_JOB,
        [("spec.method.objective", "dpo"), ("spec.method.preference", {"undesirableWeight": 2})],
        "only valid with objective kto",
        "spec.method.preference",
    ),
    (
        LM_JOB,
        [("spec.method.preference", {"beta": 0.5})],
        "preference options need a preference objective",
        "spec.method.preference",
    ),
    (
        LM_JOB,
        [("spec.method.objective", "kto"), ("spec.data.packing", True)],
        "needs method.objective sft",
        "spec.data.packing",
    ),
    (
        LM_JOB,
        [("spec.promotion", {"metric": "rewardMargin"})],
        "promotion.metric rewardMargin does not apply",
        "spec.promotion.metric",
    ),
    (JOB, [("spec.data.packing", True)], "data.packing packs causal-LM examples", "spec.data.packing"),
    (JOB, [("spec.data.hub", {"revision": "v1"})], "hub applies to data on the Hugging Face Hub", "spec.data.hub"),
    (
        JOB,
        [("spec.data.train", "hf://datasets/acme/topics"), ("spec.data.hub", {"testSplit": "test"})],
        "hub.testSplit names a split of an hf://datasets/ repository",
        "spec.data.hub.testSplit",
    ),
    (
        JOB,
        [("spec.data.train", "hf://datasets/acme/topics"), ("spec.data.hub", {"validationSplit": "train[90%:]"})],
        "hub.validationSplit names a split",
        "spec.data.hub.validationSplit",
    ),
    (
        JOB,
        [
            ("spec.data.train", "s3://acme-data/topics.jsonl"),
            ("spec.data.test", "hf://datasets/acme/topics"),
            ("spec.data.hub", {"trainSplit": "train"}),
        ],
        "hub.trainSplit names a split",
        "spec.data.hub.trainSplit",
    ),
    (JOB, [("spec.model.trustRemoteCode", True)], "needs model.revision to be a full", "spec.model.revision"),
    (
        JOB,
        [("spec.model.trustRemoteCode", True), ("spec.model.revision", "main")],
        "needs model.revision to be a full",
        "spec.model.revision",
    ),
    (JOB, [("spec.hyperparameters", {"precision": "fp16"})], "fp16 needs GPUs", "spec.hyperparameters.precision"),
    (JOB, [("spec.method", {"type": "qlora"})], "qlora needs GPUs", "spec.method.type"),
    (JOB, [("spec.resources", {"gpuType": "NVIDIA-H100"})], "gpuType needs", "spec.resources.gpuType"),
    (
        JOB,
        [("spec.method", {"type": "qlora"}), ("spec.resources", {"gpusPerWorker": 1, "sharding": "fsdp"})],
        "fsdp does not work with method.type qlora",
        "spec.resources.sharding",
    ),
    (JOB, [("spec.promotion", {"metric": "perplexity"})], "promotion.metric perplexity", "spec.promotion.metric"),
    (
        JOB,
        [("spec.hyperparameters", {"warmupSteps": 10, "warmupRatio": 0.1})],
        "set warmupSteps or warmupRatio, not both",
        "spec.hyperparameters.warmupSteps",
    ),
    (
        JOB,
        [("spec.data.split", {"validationFraction": 0.6, "testFraction": 0.5})],
        "must be below 1",
        "spec.data.split",
    ),
    (
        "modeldeployment.yaml",
        [("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2})],
        "must not exceed maxReplicas",
        "spec.autoscaling.minReplicas",
    ),
    (
        "modeldeployment.yaml",
        [("spec.model.uri", "s3://bucket/model")],
        "set exactly one of uri and fromFineTuneJob",
        "spec.model",
    ),
    ("modeldeployment.yaml", [("spec.model", {})], "set exactly one of uri and fromFineTuneJob", "spec.model"),
    (
        "modeldeployment.yaml",
        [("spec.resources", {"gpuType": "NVIDIA-L4"})],
        "gpuType needs gpus > 0",
        "spec.resources.gpuType",
    ),
    (
        "modeldeployment.yaml",
        [("spec.resources", {"cpu": "1500m", "cpuLimit": "1"})],
        "cpuLimit must be at least cpu",
        "spec.resources.cpuLimit",
    ),
    (
        "modeldeployment.yaml",
        [("spec.resources", {"head": {"cpu": 2, "cpuLimit": "1900m"}})],
        "cpuLimit must be at least cpu",
        "spec.resources.head.cpuLimit",
    ),
    (
        "modeldeployment.yaml",
        [("spec.resources", {"autoscaler": {"cpu": "500m", "cpuLimit": "0.4"}})],
        "cpuLimit must be at least cpu",
        "spec.resources.autoscaler.cpuLimit",
    ),
    (
        JOB,
        [
            (
                "spec.resources.affinity",
                {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In"}]}]
                        }
                    }
                },
            )
        ],
        "values must be non-empty with In and NotIn",
        "spec.resources.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].values",
    ),
    (
        JOB,
        [
            (
                "spec.resources.head.affinity",
                {
                    "nodeAffinity": {
                        "preferredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "weight": 1,
                                "preference": {
                                    "matchExpressions": [{"key": "gpus", "operator": "Gt", "values": ["a"]}]
                                },
                            }
                        ]
                    }
                },
            )
        ],
        "values must be a single integer with Gt and Lt",
        "spec.resources.head.affinity.nodeAffinity.preferredDuringSchedulingIgnoredDuringExecution[0]"
        ".preference.matchExpressions[0].values",
    ),
    (
        "modeldeployment.yaml",
        [
            (
                "spec.resources.affinity",
                {
                    "podAntiAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": [
                            {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {
                                    "matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]
                                },
                            }
                        ]
                    }
                },
            )
        ],
        "values must be empty with Exists and DoesNotExist",
        "spec.resources.affinity.podAntiAffinity.requiredDuringSchedulingIgnoredDuringExecution[0]"
        ".labelSelector.matchExpressions[0].values",
    ),
    (
        JOB,
        [("spec.resources", {"cpuPerWorker": "2", "cpuLimitPerWorker": "1999m"})],
        "cpuLimitPerWorker must be at least cpuPerWorker",
        "spec.resources.cpuLimitPerWorker",
    ),
]


@pytest.mark.parametrize(
    ("example", "changes", "message", "rule_path"), CROSS_FIELD_CASES, ids=[case[3] for case in CROSS_FIELD_CASES]
)
def test_pydantic_and_cel_agree(example: str, changes: list[tuple[str, Any]], message: str, rule_path: str) -> None:
    document = load_example(example)
    for path, value in changes:
        document = mutated(document, path, value)
    with pytest.raises(SpecError) as rejected:
        parse(document)
    assert any(message in problem for problem in rejected.value.problems), rejected.value.problems
    assert rule_path in [failure.path for failure in rule_failures(document)]
    if GPUS[0] not in [path for path, _ in changes] and "GPUs" in message:
        assert rule_failures(mutated(document, *GPUS)) == []  # with GPUs the rule holds again


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("support.tickets", "is not a DNS-1035 label"),
        ("7-tickets", "is not a DNS-1035 label"),
        ("t" * 64, "is longer than 63 characters"),
    ],
)
def test_names_kuberay_would_refuse_are_named(name: str, expected: str) -> None:
    for example in ("finetunejob-minimal.yaml", "modeldeployment.yaml"):
        problems = [str(p) for p in problems_of(mutated(load_example(example), "metadata.name", name))]
        assert len(problems) == 1 and problems[0].startswith("metadata.name: ") and expected in problems[0]
