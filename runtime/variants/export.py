"""Export the fine-tuned model as Hugging Face folders and write the kubetune.json manifest.

Variants: `full` is the fine-tuned model as trained (for adapter methods: the peft
adapter, loaded on top of the base model); `merged` is an adapter run with the adapter
merged into the base weights, a plain transformers model. Every folder carries the
tokenizer, so it loads on its own.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from kubetune.runtime.contract import MethodType, RunIdentity, RunSpec
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.contract.manifest import (
    MANIFEST_FILE,
    ArtifactManifest,
    BaseModelLineage,
    Lineage,
    ManifestMetrics,
    ManifestVariant,
    variant_path,
)
from kubetune.runtime.contract.method import ADAPTER_METHODS
from kubetune.runtime.contract.report import BaselineReport, VariantReport
from kubetune.runtime.io.storage import output_path
from torch import nn

TRACKED_LIBRARIES = ("kubetune", "torch", "transformers", "peft", "ray", "tokenizers", "safetensors")


# Weight files copied next to a variant's weights so it loads on its own.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "generation_config.json",
)


def copy_processor_files(source: Path, target: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file() and not (target / name).exists():
            shutil.copy2(source / name, target / name)


class VariantFormat:
    HF = "hf"  # transformers: AutoModelFor<Task>.from_pretrained(folder)
    TORCHAO = "hf-torchao"  # the same, with a torchao quantization_config in config.json
    PEFT_ADAPTER = "peft-adapter"  # peft: PeftModel.from_pretrained(base, folder), or transformers with peft


def spec_digest(spec: RunSpec) -> str:
    """sha256 of the canonical (sorted keys, compact) camelCase JSON of the spec."""
    canonical = json.dumps(spec.to_wire(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


@dataclass
class ExportedVariant:
    """A variant folder and what was measured of it."""

    name: str
    folder: Path
    format: str
    metrics: dict[str, float] = field(default_factory=dict)
    size_bytes: int | None = None
    latency_ms_p50: float | None = None
    accepted: bool = True
    reason: str | None = None

    def describe(self, root: Path) -> ManifestVariant:
        """The manifest's entry: where the folder is, its format, and what the run reports of it."""
        return ManifestVariant(
            path=self.folder.relative_to(root).as_posix(),
            format=self.format,
            size_bytes=self.size_bytes,
            latency_ms_p50=self.latency_ms_p50,
            metrics=self.metrics,
            accepted=self.accepted,
            reason=self.reason,
        )

    def report(self, uri: str) -> VariantReport:
        return VariantReport(
            uri=uri,
            size_bytes=self.size_bytes,
            latency_ms_p50=self.latency_ms_p50,
            metrics=self.metrics,
            accepted=self.accepted,
            reason=self.reason,
        )


def _save(model: Any, processor: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def variant_folder(root: Path, name: str, output_uri: str) -> Path:
    """The folder of variant `name` under the output `root`; refused if a symlink there leads out of it."""
    return output_path(root, variant_path(name), output_uri)


def merged_copy(model: nn.Module) -> nn.Module:
    """The adapter model with its adapters folded into the base weights (a plain transformers model)."""
    import copy

    merged: nn.Module = copy.deepcopy(model).merge_and_unload()  # type: ignore[operator]
    return merged


def export_variants(
    model: nn.Module, tokenizer: Any, spec: RunSpec, root: Path, merged: nn.Module | None = None
) -> list[ExportedVariant]:
    """Write every variant of the fine-tuned `model` under `root/variants/<name>`."""
    is_adapter = spec.method.type in ADAPTER_METHODS
    full_format = VariantFormat.PEFT_ADAPTER if is_adapter else VariantFormat.HF
    full = ExportedVariant("full", variant_folder(root, "full", spec.output.uri), full_format)
    _save(model, tokenizer, full.folder)
    variants = [full]
    if merged is not None:
        variant = ExportedVariant("merged", variant_folder(root, "merged", spec.output.uri), VariantFormat.HF)
        _save(merged, tokenizer, variant.folder)
        variants.append(variant)
    return variants


def wants_merged(spec: RunSpec) -> bool:
    """Adapter runs export a merged variant unless lora.merge is false; qlora's 4-bit base cannot merge."""
    return spec.method.type in {MethodType.LORA, MethodType.DORA} and spec.method.lora_options.merge


@dataclass(frozen=True)
class ManifestInputs:
    spec: RunSpec
    identity: RunIdentity
    data_sources: dict[str, str]
    labels: list[str]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    validation: dict[str, float]
    training: dict[str, Any]
    output_uri: str
    best_variant: str
    search: dict[str, Any] | None = None
    # The spec with the best trial's values applied; the spec itself when there was no search.
    effective: RunSpec | None = None
    baseline: BaselineReport | None = None
    decisions: list[Decision] = field(default_factory=list)


def write_manifest(root: Path, inputs: ManifestInputs, variants: list[ExportedVariant]) -> Path:
    """kubetune.json: lineage (base model, data, spec digest, hyperparameters, libraries) and every metric."""
    spec = inputs.spec
    effective = inputs.effective or spec
    manifest = ArtifactManifest(
        created_at=datetime.now(UTC),
        run=inputs.identity,
        lineage=Lineage(
            base_model=BaseModelLineage(uri=spec.model.uri, revision=spec.model.revision),
            data=inputs.data_sources,
            spec_digest=spec_digest(spec),
            spec=spec.to_wire(),
            libraries=library_versions(),
        ),
        task=spec.model.task,
        labels=inputs.labels,
        method=effective.method.to_wire(),
        hyperparameters=effective.hyperparameters.to_wire(),
        search=inputs.search,
        training=inputs.training,
        metrics=ManifestMetrics(
            before=inputs.metrics_before,
            after=inputs.metrics_after,
            validation=inputs.validation,
            baseline=inputs.baseline.metrics if inputs.baseline else {},
        ),
        baseline=inputs.baseline,
        decisions=inputs.decisions,
        output=inputs.output_uri,
        variants={variant.name: variant.describe(root) for variant in variants},
        best_variant=inputs.best_variant,
    )
    output_path(root, MANIFEST_FILE, inputs.output_uri)  # refuses a kubetune.json that links out of `root`
    return manifest.save(root)
