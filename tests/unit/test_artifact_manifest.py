"""kubetune.json as a typed round trip: what export writes, serving and `kubetune serve` read, old manifests too."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from kubetune.runtime.contract import RunIdentity, Task, Variant
from kubetune.runtime.contract.manifest import (
    MANIFEST_FILE,
    MANIFEST_VERSION,
    ArtifactManifest,
    Lineage,
    ManifestMetrics,
    ManifestVariant,
)
from kubetune.runtime.io.errors import ModelError
from kubetune.runtime.serving.loading import detect_task, served_folder

DIGEST = "a" * 64

# A manifest exactly as the runtime wrote it before the format was typed (manifestVersion 1): the spec's
# digest under lineage.specHash, explicit nulls, and NaN where a metric was not a finite number.
VERSION_1 = """{
  "manifestVersion": 1,
  "createdAt": "2026-11-30T10:00:00+00:00",
  "run": {"jobName": "support-tickets", "namespace": "ml", "runNumber": 3},
  "lineage": {
    "baseModel": {"uri": "hf://prajjwal1/bert-tiny", "revision": null},
    "data": {"train": "s3://b/train.jsonl", "validation": "split", "test": "split"},
    "specHash": "<digest>",
    "spec": {"model": {"uri": "hf://prajjwal1/bert-tiny"}},
    "libraries": {"python": "3.11.9", "torch": "2.9.0"}
  },
  "task": "text-classification",
  "labels": ["billing", "bug"],
  "method": {"type": "lora"},
  "hyperparameters": {"epochs": 2},
  "search": null,
  "training": {"steps": 40, "workers": 2},
  "metrics": {"before": {"accuracy": 0.5}, "after": {"accuracy": 0.87}, "validation": {"loss": NaN}},
  "output": "s3://b/runs/3",
  "variants": {
    "full": {"path": "variants/full", "format": "peft-adapter", "sizeBytes": 100, "latencyMsP50": 2.5,
             "metrics": {"accuracy": 0.87}, "accepted": true, "reason": null},
    "int8": {"path": "variants/int8", "format": "hf-torchao", "sizeBytes": 25, "latencyMsP50": 1.5,
             "metrics": {"accuracy": 0.86}, "accepted": true, "reason": null}
  },
  "bestVariant": "int8"
}
""".replace("<digest>", DIGEST)


def written(tmp_path: Path, text: str) -> Path:
    (tmp_path / MANIFEST_FILE).write_text(text, encoding="utf-8")
    return tmp_path


def test_a_manifest_round_trips_through_its_file(tmp_path: Path) -> None:
    manifest = ArtifactManifest(
        run=RunIdentity(job_name="j", run_number=1),
        lineage=Lineage(spec_digest=DIGEST, data={"train": "s3://b/t.jsonl"}),
        task=Task.CAUSAL_LM,
        labels=[],
        metrics=ManifestMetrics(before={"perplexity": 9.0}, after={"perplexity": 4.0}),
        variants={"full": ManifestVariant(path="variants/full", format="hf", size_bytes=10, latency_ms_p50=1.0)},
        best_variant="full",
    )
    path = manifest.save(tmp_path)
    assert path == tmp_path / MANIFEST_FILE
    document = json.loads(path.read_text())
    assert document["manifestVersion"] == MANIFEST_VERSION and document["lineage"]["specDigest"] == DIGEST
    assert document["bestVariant"] == "full" and document["variants"]["full"]["sizeBytes"] == 10
    assert ArtifactManifest.load(tmp_path) == manifest


def test_a_folder_without_a_manifest_has_none(tmp_path: Path) -> None:
    assert ArtifactManifest.load(tmp_path) is None


def test_a_version_1_manifest_loads_with_its_digest_under_the_new_name(tmp_path: Path) -> None:
    manifest = ArtifactManifest.load(written(tmp_path, VERSION_1))
    assert manifest is not None
    assert (manifest.manifest_version, manifest.lineage.spec_digest, manifest.task) == (
        1, DIGEST, Task.TEXT_CLASSIFICATION,
    )  # fmt: skip
    assert manifest.metrics.validation == {"loss": None}  # NaN reads as "not a finite number"
    assert manifest.folder_of("int8") == PurePosixPath("variants/int8")
    assert manifest.best_variant == "int8" and manifest.run.job_name == "support-tickets"


@pytest.mark.parametrize(
    ("variant", "folder"), [(Variant.BEST, "variants/int8"), (Variant.FULL, "variants/full")]
)  # fmt: skip
def test_serving_finds_the_variant_of_a_version_1_manifest(tmp_path: Path, variant: Variant, folder: str) -> None:
    root = written(tmp_path, VERSION_1)
    found, manifest = served_folder(root, variant)
    assert found == root / folder
    assert manifest is not None and detect_task(found, manifest) == Task.TEXT_CLASSIFICATION


def test_serving_names_the_variants_a_run_has_when_asked_for_another(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no variant 'pruned' \(it has full, int8\)"):
        served_folder(written(tmp_path, VERSION_1), Variant.PRUNED)


def test_a_variant_without_a_path_lies_in_the_variants_folder(tmp_path: Path) -> None:
    document: dict[str, Any] = json.loads(VERSION_1.replace("NaN", "null"))
    del document["variants"]["full"]["path"]
    found, _ = served_folder(written(tmp_path, json.dumps(document)), Variant.FULL)
    assert found == tmp_path / "variants" / "full"


def test_a_manifest_from_a_newer_runtime_is_read_for_what_this_one_knows(tmp_path: Path) -> None:
    document: dict[str, Any] = json.loads(VERSION_1.replace("NaN", "null"))
    document["manifestVersion"] = 9
    document["variants"]["int8"]["bitsPerWeight"] = 8
    document["signature"] = {"by": "someone"}
    manifest = ArtifactManifest.load(written(tmp_path, json.dumps(document)))
    assert manifest is not None and manifest.manifest_version == 9 and manifest.variants["int8"].size_bytes == 25


def test_a_plain_model_folder_is_served_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    found, manifest = served_folder(tmp_path, Variant.BEST)
    assert (found, manifest) == (tmp_path, None)
    assert detect_task(found, manifest) == Task.CAUSAL_LM
