"""Generate CustomResourceDefinitions from the API models (as controller-gen does from Go types).

`python -m kubetune.operator.crdgen DIR [DIR ...]` writes one YAML file per kind into
each directory. The output is structural: no `$ref`, no `title`, optional fields
are simply not required, every object has a `type`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .api import finetunejob, modeldeployment
from .api.common import CATEGORY, GROUP, OBJECT_NAME_MAX_LENGTH, OBJECT_NAME_PATTERN, VERSION

_SCALARS = (str, int, float, bool)
HEADER = "---\n# Generated from kubetune's API models by `kubetune crds`. Do not edit.\n"


@dataclass(frozen=True)
class KindInfo:
    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    model: type[BaseModel]
    printer_columns: tuple[dict[str, Any], ...]

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{GROUP}"

    @property
    def file_name(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


def _column(name: str, path: str, description: str, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path, "description": description}
    if priority:
        column["priority"] = priority
    return column


_AGE = _column("Age", ".metadata.creationTimestamp", "Time since creation.", "date")

KINDS: tuple[KindInfo, ...] = (
    KindInfo(
        kind=finetunejob.KIND,
        plural=finetunejob.PLURAL,
        singular=finetunejob.SINGULAR,
        short_names=finetunejob.SHORT_NAMES,
        model=finetunejob.FineTuneJob,
        printer_columns=(
            _column("Phase", ".status.phase", "Phase of the current or latest run."),
            _column("Model", ".spec.model.uri", "Base model."),
            _column("Method", ".spec.method.type", "Fine-tuning method."),
            _column("Best", ".status.bestMetric", "Gate metric of the promoted run."),
            _column("Run", ".status.currentRun", "Active run number.", "integer", priority=1),
            _AGE,
        ),
    ),
    KindInfo(
        kind=modeldeployment.KIND,
        plural=modeldeployment.PLURAL,
        singular=modeldeployment.SINGULAR,
        short_names=modeldeployment.SHORT_NAMES,
        model=modeldeployment.ModelDeployment,
        printer_columns=(
            _column("Ready", '.status.conditions[?(@.type=="Ready")].status', "Whether the endpoint serves."),
            _column(
                "Serving Pods",
                ".status.servingPods",
                "Ray pods whose Serve proxy takes the endpoint's traffic, the head's included (not model replicas).",
                "integer",
            ),
            _column("Run", ".status.serving.run", "The FineTuneJob run being served.", "integer"),
            _column("Endpoint", ".status.endpoint", "In-cluster URL."),
            _column("Phase", ".status.phase", "Pending, Deploying, Ready, Degraded, Failed or Invalid.", priority=1),
            _column("Model", ".status.serving.uri", "Artifact being served.", priority=1),
            _AGE,
        ),
    ),
)


class _Converter:
    """Turns a pydantic JSON schema into a Kubernetes structural schema."""

    def __init__(self, definitions: dict[str, Any]) -> None:
        self.definitions = definitions

    def convert(self, node: dict[str, Any]) -> dict[str, Any]:
        node = dict(node)
        if "$ref" in node:
            target = self.definitions[node.pop("$ref").split("/")[-1]]
            merged = {**target, **{k: v for k, v in node.items() if k != "title"}}
            return self.convert(merged)
        if "anyOf" in node:
            options = [o for o in node["anyOf"] if o != {"type": "null"}]
            if len(options) < len(node["anyOf"]):  # Optional[X]: absent rather than null
                node.pop("anyOf")
                if node.get("default", ...) is None:
                    node.pop("default")
                if len(options) == 1:
                    return self.convert({**options[0], **node})
                node["anyOf"] = options
        return self._convert_keywords(node)

    def _convert_keywords(self, node: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in node.items():
            if key == "title":
                continue
            if key == "properties":
                result[key] = {name: self.convert(child) for name, child in value.items()}
            elif key == "items":
                result[key] = self.convert(value)
            elif key == "additionalProperties":
                if value is True:
                    result["x-kubernetes-preserve-unknown-fields"] = True
                elif isinstance(value, dict):
                    result[key] = self.convert(value)
            elif key == "anyOf":
                result[key] = [self.convert(option) for option in value]
            elif key in ("exclusiveMinimum", "exclusiveMaximum"):
                result["minimum" if key == "exclusiveMinimum" else "maximum"] = value
                result[key] = True
            elif key == "const":
                result["enum"] = [value]
            elif key == "default":
                if isinstance(value, _SCALARS):
                    result[key] = value
            else:
                result[key] = value
        if not result.keys() - {"description", "default"}:  # `Any`: keep whatever is given
            result["x-kubernetes-preserve-unknown-fields"] = True
        if "properties" in result:
            result.setdefault("type", "object")
        return _ordered(result)


_KEY_ORDER = ("description", "type", "format", "enum", "default")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = {k: node[k] for k in _KEY_ORDER if k in node}
    rest = {k: node[k] for k in sorted(node) if k not in first}
    return {**first, **rest}


def structural_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's CRD schema (openAPIV3Schema)."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    converter = _Converter(schema.pop("$defs", {}))
    result = converter.convert(schema)
    # The one part of metadata a CRD may restrict: names that KubeRay and label values accept.
    result["properties"]["metadata"] = {
        "type": "object",
        "properties": {
            "name": {
                "description": "Name of the object: a DNS-1035 label of at most 63 characters (KubeRay names "
                "its RayJobs and RayServices after it).",
                "type": "string",
                "maxLength": OBJECT_NAME_MAX_LENGTH,
                "pattern": OBJECT_NAME_PATTERN,
            }
        },
    }
    for field in ("apiVersion", "kind"):
        result["properties"][field].pop("default", None)
    result["required"] = ["spec"]
    return result


def crd_for(info: KindInfo) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": info.crd_name},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": list(info.printer_columns),
                    "schema": {"openAPIV3Schema": structural_schema(info.model)},
                }
            ],
        },
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values out in full: no YAML anchors and aliases in a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: dict[str, Any]) -> str:
    body = yaml.dump(
        crd, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=False
    )
    return HEADER + body


def rendered() -> dict[str, str]:
    """File name → YAML text for every kind."""
    return {info.file_name: render(crd_for(info)) for info in KINDS}


def write(directories: list[Path]) -> list[Path]:
    written = []
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in rendered().items():
            path = directory / name
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m kubetune.operator.crdgen DIR [DIR ...]", file=sys.stderr)
        return 2
    for path in write([Path(a) for a in args]):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
