"""ModelDeployment validation: the example parses, each bad spec names its field."""

from __future__ import annotations

from typing import Any

import pytest
from kubetune.operator.api.manifests import parse
from kubetune.operator.api.modeldeployment import ModelDeployment
from kubetune.runtime.contract import Variant
from kubetune.runtime.contract.errors import SpecError

from ..conftest import DELETE, mutated


def test_example_parses(deployment: dict[str, Any]) -> None:
    manifest = parse(deployment)
    assert isinstance(manifest, ModelDeployment)
    reference = manifest.spec.model.from_fine_tune_job
    assert reference is not None and reference.variant == Variant.BEST
    assert manifest.spec.autoscaling.max_replicas == 8
    assert manifest.spec.auth is not None and manifest.spec.auth.token_secret.key == "token"


def test_pinned_uri(deployment: dict[str, Any]) -> None:
    document = mutated(deployment, "spec.model", {"uri": "s3://models/support/int8"})
    manifest = parse(document)
    assert manifest.spec.model.uri == "s3://models/support/int8"


BAD: list[tuple[str, Any, str]] = [
    ("spec.model", {}, "exactly one of uri and fromFineTuneJob"),
    ("spec.model", {"uri": "s3://models/a", "fromFineTuneJob": {"name": "x"}}, "exactly one"),
    ("spec.model.fromFineTuneJob.name", DELETE, "spec.model.fromFineTuneJob.name"),
    ("spec.model.fromFineTuneJob.run", 0, "spec.model.fromFineTuneJob.run"),
    ("spec.model.fromFineTuneJob.variant", "fp8", "spec.model.fromFineTuneJob.variant"),
    ("spec.autoscaling", {"minReplicas": 5, "maxReplicas": 2}, "minReplicas (5) must not exceed maxReplicas (2)"),
    ("spec.autoscaling.targetOngoingRequests", 0, "spec.autoscaling.targetOngoingRequests"),
    ("spec.autoscaling.minReplicas", -1, "spec.autoscaling.minReplicas"),
    ("spec.resources.gpus", -2, "spec.resources.gpus"),
    ("spec.resources.gpuType", "H100", "gpuType needs gpus"),
    ("spec.resources.memory", "lots", "spec.resources.memory"),
    ("spec.batching.maxBatchSize", 0, "spec.batching.maxBatchSize"),
    ("spec.auth.tokenSecret", DELETE, "spec.auth.tokenSecret"),
    ("spec.auth.tokenSecret.key", "a key", "spec.auth.tokenSecret.key"),
    ("spec.replicas", 3, "spec.replicas"),
]


@pytest.mark.parametrize(("path", "value", "expected"), BAD, ids=[f"{p}={v!r}"[:80] for p, v, _ in BAD])
def test_bad_spec_names_the_field(deployment: dict[str, Any], path: str, value: Any, expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse(mutated(deployment, path, value))
    assert any(expected in problem for problem in caught.value.problems), caught.value.problems
