"""Generated CRDs: structural, described, complete, and identical to what is committed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubetune.operator import crdgen

from ..conftest import REPO_ROOT

CRD_DIRECTORIES = [REPO_ROOT / "crds", REPO_ROOT / "charts" / "kubetune" / "crds"]
FORBIDDEN_KEYS = {"$ref", "$defs", "title", "allOf", "oneOf", "not", "const", "nullable"}


def schemas() -> Iterator[tuple[str, dict[str, Any]]]:
    for info in crdgen.KINDS:
        yield info.kind, crdgen.crd_for(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize(("kind", "schema"), list(schemas()))
def test_schema_is_structural(kind: str, schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        assert not FORBIDDEN_KEYS & node.keys(), f"{kind}{path} has {FORBIDDEN_KEYS & node.keys()}"
        free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
        assert "type" in node or free, f"{kind}{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{kind}{path}: anyOf is only for int-or-string"
        if node.get("type") == "object" and "properties" in node:
            assert "additionalProperties" not in node, f"{kind}{path}: properties and additionalProperties"
        if "default" in node:
            assert isinstance(node["default"], str | int | float | bool), f"{kind}{path}: non-scalar default"


@pytest.mark.parametrize(("kind", "schema"), list(schemas()))
def test_every_field_is_described(kind: str, schema: dict[str, Any]) -> None:
    # Named fields and object-typed items need a description; scalar items/values inherit their field's.
    undescribed = [
        path
        for path, node in walk(schema)
        if path
        and path != ".metadata"
        and not node.get("description")
        and (not path.endswith(("[]", "{}")) or "properties" in node)
    ]
    assert undescribed == [], f"{kind}: fields without description: {undescribed}"


def test_required_and_defaults_follow_the_models() -> None:
    schema = dict(schemas())["FineTuneJob"]
    spec = schema["properties"]["spec"]
    assert set(spec["required"]) == {"model", "data", "output"}
    hyper = spec["properties"]["hyperparameters"]["properties"]
    assert hyper["epochs"]["default"] == 3
    assert hyper["optimizer"]["enum"] == ["adamw", "adam", "sgd"]
    assert hyper["learningRate"]["exclusiveMinimum"] is True
    assert "required" not in spec["properties"]["hyperparameters"]
    cpu = spec["properties"]["resources"]["properties"]["cpuPerWorker"]
    assert cpu["x-kubernetes-int-or-string"] is True and cpu["anyOf"] == [{"type": "integer"}, {"type": "string"}]


def rules(schema: dict[str, Any]) -> dict[str, str]:
    return {rule["rule"]: path for path, node in walk(schema) for rule in node.get("x-kubernetes-validations", [])}


def test_cross_field_rules_are_enforced_at_admission() -> None:
    deployment_rules = rules(dict(schemas())["ModelDeployment"])
    assert deployment_rules["self.minReplicas <= self.maxReplicas"] == ".spec.autoscaling"
    assert deployment_rules["has(self.uri) != has(self.fromFineTuneJob)"] == ".spec.model"
    job_rules = rules(dict(schemas())["FineTuneJob"])
    assert any("qlora" in rule and path == ".spec" for rule, path in job_rules.items())
    assert any("'lora.rank'" in rule for rule in job_rules)


def test_crd_metadata() -> None:
    for info in crdgen.KINDS:
        crd = crdgen.crd_for(info)
        spec = crd["spec"]
        assert crd["metadata"]["name"] == f"{info.plural}.kubetune.io"
        assert spec["scope"] == "Namespaced" and spec["group"] == "kubetune.io"
        assert spec["names"]["categories"] == ["kubetune"]
        version = spec["versions"][0]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        columns = {c["name"] for c in version["additionalPrinterColumns"]}
        assert {"Phase", "Model", "Age"} <= columns
    names = {info.kind: info.short_names for info in crdgen.KINDS}
    assert names == {"FineTuneJob": ("ftj",), "ModelDeployment": ("mdep",)}
    ftj_columns = {
        c["name"]: c["jsonPath"]
        for c in crdgen.crd_for(crdgen.KINDS[0])["spec"]["versions"][0]["additionalPrinterColumns"]
    }
    assert ftj_columns["Best"] == ".status.bestMetric"


@pytest.mark.parametrize("directory", CRD_DIRECTORIES, ids=lambda d: str(d.relative_to(REPO_ROOT)))
def test_committed_crds_match_the_models(directory: Path) -> None:
    expected = crdgen.rendered()
    present = {path.name: path.read_text() for path in directory.glob("*.yaml")}
    stale = sorted(name for name in expected if present.get(name) != expected[name])
    extra = sorted(set(present) - set(expected))
    hint = "regenerate with: kubetune crds crds charts/kubetune/crds"
    assert not stale, f"out of date in {directory.name}: {stale}; {hint}"
    assert not extra, f"not generated, remove: {extra}"


def test_rendered_yaml_round_trips() -> None:
    for info in crdgen.KINDS:
        assert yaml.safe_load(crdgen.render(crdgen.crd_for(info))) == crdgen.crd_for(info)


def test_writer_creates_files(tmp_path: Path) -> None:
    written = crdgen.write([tmp_path / "out"])
    assert sorted(p.name for p in written) == sorted(crdgen.rendered())
    assert crdgen.main([]) == 2
