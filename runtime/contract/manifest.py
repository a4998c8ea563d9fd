"""kubetune.json: what a run wrote to its output folder, and how to read it back.

The export stage writes one `ArtifactManifest` next to the variant folders; serving
(`ModelDeployment`s and `kubetune serve`) reads it to find the variant to load and its
task. Readers ignore fields they do not know, so an older reader takes a newer manifest,
and older manifests still load: version 1 named the spec's digest `lineage.specHash`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import AliasChoices, Field, field_serializer

from .common import FiniteOrNull, JsonObject, Message, Metrics, WireModel
from .decisions import Decision
from .model import Task
from .report import BaselineReport
from .runconfig import RunIdentity

MANIFEST_FILE = "kubetune.json"
# The folder under a run's output that holds one folder per variant.
VARIANTS_FOLDER = "variants"
# 1: the first typed format, read by key (lineage.specHash); 2: lineage.specDigest.
MANIFEST_VERSION = 2


def variant_path(name: str) -> str:
    """Where variant `name` is written, relative to the run's output folder."""
    return f"{VARIANTS_FOLDER}/{name}"


class BaseModelLineage(WireModel):
    """The model the run started from."""

    uri: str = Field(description="The base model's URI (hf://, s3://, pvc://).")
    revision: str | None = Field(default=None, description="The Hub revision, when one was pinned.")


class Lineage(WireModel):
    """Where the fine-tuned model came from."""

    base_model: BaseModelLineage | None = Field(default=None, description="The model the run started from.")
    data: dict[str, str] = Field(default_factory=dict, description="Each data split and where it was read from.")
    spec_digest: str | None = Field(
        default=None,
        # Manifests of version 1 call it specHash.
        validation_alias=AliasChoices("specDigest", "spec_digest", "specHash"),
        description="sha256 (64 hex digits) of the run's canonical RunSpec JSON.",
    )
    spec: JsonObject | None = Field(default=None, description="The RunSpec the run was given.")
    libraries: dict[str, str] = Field(default_factory=dict, description="Versions of Python and the ML libraries.")


class ManifestVariant(WireModel):
    """One exported variant: its folder, its format and what was measured of it."""

    path: str | None = Field(default=None, description="The variant's folder, relative to the run's output.")
    format: str | None = Field(default=None, description="How to load it: hf, hf-torchao or peft-adapter.")
    size_bytes: int | None = Field(default=None, ge=0, description="Size of the weights on disk.")
    latency_ms_p50: FiniteOrNull = Field(default=None, ge=0, description="CPU latency, median over a fixed batch.")
    metrics: Metrics = Field(default_factory=dict, description="Test metrics of this variant.")
    accepted: bool = Field(default=True, description="Within compression.maxAccuracyDrop of the fine-tuned model.")
    reason: Message | None = Field(default=None, description="Why the variant was rejected, when it was.")


class ManifestMetrics(WireModel):
    """Test metrics before and after fine-tuning and of the classical baseline, and the last validation metrics."""

    before: Metrics = Field(default_factory=dict, description="The base model's test metrics.")
    after: Metrics = Field(default_factory=dict, description="The fine-tuned model's test metrics.")
    validation: Metrics = Field(default_factory=dict, description="The last validation metrics of training.")
    baseline: Metrics = Field(
        default_factory=dict, description="The classical baseline's test metrics (see `baseline`); empty without one."
    )


class ArtifactManifest(WireModel):
    """kubetune.json: the run, its lineage, its metrics, and every variant it exported."""

    manifest_version: int = Field(default=MANIFEST_VERSION, ge=1, description="Version of this format.")
    created_at: datetime | None = Field(default=None, description="When the manifest was written.")
    run: RunIdentity = Field(default_factory=RunIdentity, description="Which job and run wrote it.")
    lineage: Lineage = Field(default_factory=Lineage, description="Where the model came from.")
    task: Task | None = Field(default=None, description="The model's task.")
    labels: list[str] = Field(default_factory=list, description="Class names in label-id order (classifiers).")
    method: JsonObject | None = Field(default=None, description="The method, with a search's best values.")
    hyperparameters: JsonObject | None = Field(default=None, description="The hyperparameters trained with.")
    search: JsonObject | None = Field(default=None, description="The search and its trials, when there was one.")
    training: JsonObject = Field(default_factory=dict, description="How training went (steps, early stopping).")
    metrics: ManifestMetrics = Field(default_factory=ManifestMetrics, description="Test and validation metrics.")
    baseline: BaselineReport | None = Field(
        default=None, description="The classical baseline trained on the same split, or why the run has none."
    )
    decisions: list[Decision] = Field(
        default_factory=list, description="The values chosen for the spec's auto fields, and why; empty without any."
    )
    output: str | None = Field(default=None, description="The run's output URI.")
    variants: dict[str, ManifestVariant] = Field(default_factory=dict, description="Exported variants by name.")
    best_variant: str | None = Field(default=None, description="The variant `best` resolves to.")

    @field_serializer("run")
    def _run_as_given(self, run: RunIdentity) -> dict[str, Any]:
        return run.to_wire()  # what a local run leaves unset (its namespace, say) stays out, as in the run config

    def folder_of(self, variant: str) -> PurePosixPath:
        """The folder of `variant`, relative to the run's output; KeyError when the run has no such variant."""
        entry = self.variants[variant]
        return PurePosixPath(entry.path or variant_path(variant))

    def to_json(self) -> str:
        document: dict[str, Any] = self.model_dump(mode="json", by_alias=True)
        return json.dumps(document, indent=2) + "\n"

    def save(self, root: Path) -> Path:
        """Write kubetune.json into the run's output folder `root`; returns its path."""
        path = root / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, root: Path) -> ArtifactManifest | None:
        """The manifest in `root`; None when `root` has none (a variant's own folder, say)."""
        path = root / MANIFEST_FILE
        if not path.is_file():
            return None
        # json.loads: today's writer never writes NaN, but a version-1 manifest may hold one in its metrics.
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
