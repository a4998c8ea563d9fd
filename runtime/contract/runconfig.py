"""The run config file: a RunSpec plus who the run is and how many workers train it.

The operator writes this (camelCase JSON) into the run's ConfigMap; the entry point
`python -m kubetune.runtime.recipe.finetune --config run.json` reads it. A bare RunSpec is
accepted too (one worker, no identity).

Operator and runtime may come from different releases (`spec.resources.image`), so
the reader tolerates what it does not know: unknown envelope fields are ignored, and
spec fields a newer operator added are dropped and listed in `ignored_fields`, for
the run to warn about. Anything else wrong in the spec is still an error.
"""

from __future__ import annotations

import copy
from enum import StrEnum
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError

from .common import WireModel
from .run import RunSpec

# Written into every run config; readers accept any version.
RUN_CONFIG_SCHEMA_VERSION = 1


class RunIdentity(WireModel):
    """Which job and run this is; copied into the manifest and progress reports."""

    job_name: str | None = Field(default=None, max_length=253, description="Name of the FineTuneJob.")
    namespace: str | None = Field(default=None, max_length=63, description="Namespace of the FineTuneJob.")
    run_number: int | None = Field(default=None, ge=1, description="Run number of the job, counting from 1.")
    run_name: str | None = Field(default=None, max_length=253, description="Name of the run (e.g. its RayJob).")
    report_config_map: str | None = Field(
        default=None,
        max_length=253,
        description="ConfigMap (in `namespace`) the run writes its RunReport into; none when run locally.",
    )


class Sharding(StrEnum):
    """How the training processes hold the model."""

    NONE = "none"  # data parallel (DDP): every process holds the whole model
    FSDP = "fsdp"  # fully sharded (FSDP2): every process holds a shard of the weights and optimizer state


SHARDING_DESCRIPTION = (
    "How the training processes hold the model: none (data parallel, each holds the whole model) or fsdp "
    "(fully sharded data parallel: weights, gradients and optimizer state split across all training processes, "
    "for a model that does not fit one device; checkpoints are sharded too). Not with method.type qlora."
)

# Sharding splits parameters into DTensors; a 4-bit quantized base's packed weights cannot be split that way.
SHARDED_QLORA_PROBLEM = (
    "fsdp does not work with method.type qlora (its 4-bit base cannot be sharded): use sharding none, or method lora"
)
SHARDED_QLORA_MESSAGE = f"resources.sharding {SHARDED_QLORA_PROBLEM}"


class WorkerResources(WireModel):
    """Training workers of the run (in a cluster: worker pods)."""

    workers: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Training workers (in a cluster: pods); each runs one Ray Train worker, or one per GPU.",
    )
    cpus_per_worker: float | None = Field(
        default=None,
        gt=0.0,
        le=1024.0,
        description="Ray CPUs each worker takes (shared by its GPUs' Ray Train workers); when omitted the "
        "workers share this machine's CPUs.",
    )
    gpus_per_worker: int = Field(
        default=0, ge=0, le=16, description="GPUs per worker, all used (a Ray Train worker each); 0 trains on CPU."
    )
    sharding: Sharding = Field(default=Sharding.NONE, description=SHARDING_DESCRIPTION)
    gpu_type: str | None = Field(
        default=None,
        max_length=63,
        description="GPU model the workers run on (the node label nvidia.com/gpu.product); the plan judges "
        "the run's memory against it.",
    )


class RunConfig(WireModel):
    """Everything the run entry point reads."""

    schema_version: int = Field(
        default=RUN_CONFIG_SCHEMA_VERSION, ge=1, description="Version of the run config format the writer used."
    )
    spec: RunSpec = Field(description="What to fine-tune and how.")
    run: RunIdentity = Field(default_factory=RunIdentity, description="Which job and run this is.")
    resources: WorkerResources = Field(default_factory=WorkerResources, description="Training workers.")
    _ignored_fields: list[str] = PrivateAttr(default_factory=list)

    @property
    def ignored_fields(self) -> list[str]:
        """Spec fields this runtime does not know and left out (e.g. `spec.method.newOption`)."""
        return list(self._ignored_fields)

    @classmethod
    def from_document(cls, document: Any) -> RunConfig:
        """A RunConfig from its JSON form, or from a bare RunSpec document."""
        if not (isinstance(document, dict) and "spec" in document):
            return cls(spec=RunSpec.model_validate(document))
        document = copy.deepcopy(document)
        ignored: list[str] = []
        while True:
            try:
                config = cls.model_validate(document)
            except ValidationError as error:
                unknown = [e["loc"] for e in error.errors() if e["type"] == "extra_forbidden"]
                only_unknown = bool(unknown) and len(unknown) == error.error_count()
                if not only_unknown or not all(_drop(document, loc) for loc in unknown):
                    raise
                ignored += [".".join(str(part) for part in loc) for loc in unknown]
                continue
            config._ignored_fields = ignored
            return config


def _drop(document: Any, location: tuple[int | str, ...]) -> bool:
    """Remove the field at `location` (a pydantic error location) from the document."""
    node = document
    for part in location[:-1]:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if not (in_dict or in_list):
            return False  # a location through a union member or a validator, not a plain path
        node = node[part]
    if isinstance(node, dict) and location[-1] in node:
        del node[location[-1]]
        return True
    return False
