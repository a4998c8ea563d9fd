"""What the operator's settings let a spec ask for: tolerations, node labels and remote code."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.finetunejob import FineTuneJob
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import ModelDeployment
from kubetune.operator.policy import finetunejob_violations, modeldeployment_violations
from kubetune.operator.settings import Settings

from ..conftest import mutated

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONTROL_PLANE = {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
EVERY_TAINT = {"operator": "Exists"}
GPU = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
DEDICATED_ANY_EFFECT = {"key": "dedicated", "operator": "Equal", "value": "ml"}


def node_affinity(*requirements: dict[str, Any]) -> dict[str, Any]:
    terms = [{"matchExpressions": list(requirements)}]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}}}


def job_violations(document: dict[str, Any], settings: Settings, *edits: tuple[str, Any]) -> list[str]:
    for path, value in edits:
        document = mutated(document, path, value)
    job = parse(document)
    assert isinstance(job, FineTuneJob)
    return [str(found) for found in finetunejob_violations(job.spec, settings)]


# (settings, edits of the minimal FineTuneJob, the violations: field and the start of the message)
CASES: list[tuple[Settings, list[tuple[str, Any]], list[str]]] = [
    # Tolerations: none unless listed; "*" for any.
    (Settings(), [], []),
    (Settings(), [("spec.resources.tolerations", [CONTROL_PLANE])], ["spec.resources.tolerations[0]: tolerating"]),
    (Settings(), [("spec.resources.head.tolerations", [DEDICATED])], ["spec.resources.head.tolerations[0]:"]),
    (Settings(), [("spec.resources.tolerations", [GPU])], []),  # the one kubetune gives GPU pods itself
    (Settings(allowed_tolerations="dedicated"), [("spec.resources.tolerations", [DEDICATED, CONTROL_PLANE])],
     ["spec.resources.tolerations[1]: tolerating node-role.kubernetes.io/control-plane:NoSchedule"]),
    (Settings(allowed_tolerations="dedicated:NoSchedule"), [("spec.resources.tolerations", [DEDICATED])], []),
    (Settings(allowed_tolerations="dedicated:NoExecute"), [("spec.resources.tolerations", [DEDICATED])],
     ["spec.resources.tolerations[0]:"]),
    (Settings(allowed_tolerations="dedicated:NoSchedule"), [("spec.resources.tolerations", [DEDICATED_ANY_EFFECT])],
     ["spec.resources.tolerations[0]: tolerating dedicated (every effect)"]),
    (Settings(allowed_tolerations="spot.example.com/*"),
     [("spec.resources.tolerations", [{"key": "spot.example.com/pool", "operator": "Exists"}])], []),
    (Settings(allowed_tolerations="*-never-matches, d*"), [("spec.resources.tolerations", [EVERY_TAINT])],
     ["spec.resources.tolerations[0]: tolerating every taint"]),
    (Settings(allowed_tolerations="*"), [("spec.resources.tolerations", [EVERY_TAINT, CONTROL_PLANE])], []),
    # Node labels: any unless listed; keys, or key=value, as glob patterns.
    (Settings(), [("spec.resources.nodeSelector", {"kubernetes.io/hostname": "cp-1"})], []),
    (Settings(allowed_node_selectors="node-pool"), [("spec.resources.nodeSelector", {"node-pool": "gpu"})], []),
    (Settings(allowed_node_selectors="node-pool=gpu-*"),
     [("spec.resources.head.nodeSelector", {"node-pool": "cpu"})],
     ["spec.resources.head.nodeSelector: node-pool=cpu is not allowed here (allowed: node-pool=gpu-*)"]),
    (Settings(allowed_node_selectors="node-pool"),
     [("spec.resources.nodeSelector", {"kubernetes.io/hostname": "cp-1"})],
     ["spec.resources.nodeSelector: kubernetes.io/hostname=cp-1"]),
    (Settings(allowed_node_selectors="node-pool=gpu,zone"),
     [("spec.resources.affinity", node_affinity({"key": "node-pool", "operator": "In", "values": ["gpu", "cp"]}))],
     ["spec.resources.affinity.nodeAffinity: node affinity on node-pool=cp is not allowed"]),
    (Settings(allowed_node_selectors="node-pool=gpu,zone"),
     [("spec.resources.affinity", node_affinity({"key": "node-pool", "operator": "NotIn", "values": ["cpu"]}))],
     ["spec.resources.affinity.nodeAffinity: node affinity on node-pool is not allowed"]),
    (Settings(allowed_node_selectors="node-pool=gpu,zone"),
     [("spec.resources.affinity", node_affinity({"key": "zone", "operator": "Exists"}))], []),
    # Remote code: refused unless the model is listed, whatever its scheme.
    (Settings(), [("spec.model", {"uri": "pvc://models/base", "trustRemoteCode": True})],
     ["spec.model.trustRemoteCode: the code of 'pvc://models/base' may not run here (no model's code may run here)"]),
    (Settings(), [("spec.model", {"uri": "hf://org/m", "trustRemoteCode": True, "revision": COMMIT})],
     ["spec.model.trustRemoteCode:"]),
    (Settings(allowed_remote_code_models="hf://my-org/*"),
     [("spec.model", {"uri": "hf://my-org/m", "trustRemoteCode": True, "revision": COMMIT})], []),
    (Settings(allowed_remote_code_models="hf://my-org/*"),
     [("spec.model", {"uri": "s3://models/m", "trustRemoteCode": True})],
     ["spec.model.trustRemoteCode: the code of 's3://models/m' may not run here (allowed models: hf://my-org/*)"]),
    (Settings(allowed_remote_code_models="s3://models/vetted/*"),
     [("spec.model", {"uri": "s3://models/vetted/m", "trustRemoteCode": True})], []),
    (Settings(allowed_remote_code_models="*"),
     [("spec.model", {"uri": "pvc://models/m", "trustRemoteCode": True})], []),
    (Settings(), [("spec.model", {"uri": "pvc://models/m", "trustRemoteCode": False})], []),
]  # fmt: skip


@pytest.mark.parametrize(("settings", "edits", "expected"), CASES)
def test_what_the_settings_allow_a_finetunejob(
    minimal_job: dict[str, Any], settings: Settings, edits: list[tuple[str, Any]], expected: list[str]
) -> None:
    found = job_violations(minimal_job, settings, *edits)
    assert len(found) == len(expected), found
    for violation, start in zip(found, expected, strict=True):
        assert violation.startswith(start), violation


def test_a_deployment_is_held_to_the_same_placement_rules(deployment: dict[str, Any]) -> None:
    document = mutated(deployment, "spec.resources.tolerations", [CONTROL_PLANE])
    document = mutated(document, "spec.resources.head", {"nodeSelector": {"kubernetes.io/hostname": "cp-1"}})
    served = parse(document)
    assert isinstance(served, ModelDeployment)
    settings = Settings(allowed_node_selectors="node-pool")
    assert [found.path for found in modeldeployment_violations(served.spec, settings)] == [
        "spec.resources.tolerations[0]",
        "spec.resources.head.nodeSelector",
    ]
    assert modeldeployment_violations(served.spec, Settings(allowed_tolerations="*")) == []


def test_the_policy_settings_come_from_the_environment() -> None:
    settings = Settings.from_environment(
        {
            "KUBETUNE_ALLOWED_TOLERATIONS": "dedicated:NoSchedule, spot.example.com/*",
            "KUBETUNE_ALLOWED_NODE_SELECTORS": "node-pool",
            "KUBETUNE_ALLOWED_REMOTE_CODE_MODELS": "hf://my-org/*",
        }
    )
    assert settings.allowed_toleration_patterns == ("dedicated:NoSchedule", "spot.example.com/*")
    assert settings.allowed_node_selector_patterns == ("node-pool",)
    assert settings.allowed_remote_code_model_patterns == ("hf://my-org/*",)
    defaults = Settings.from_environment({})
    assert defaults.allowed_toleration_patterns == defaults.allowed_remote_code_model_patterns == ()
