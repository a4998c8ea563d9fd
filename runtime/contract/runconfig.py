"""The run config file: a RunSpec plus who the run is and how many workers train it.

The operator writes this (camelCase JSON) into the run's ConfigMap; the entry point
`python -m kubetune.runtime.finetune --config run.json` reads it. A bare RunSpec is
accepted too (one worker, no identity).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .common import ContractModel
from .run import RunSpec


class RunIdentity(ContractModel):
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


class WorkerResources(ContractModel):
    """Ray Train workers of the run."""

    workers: int = Field(default=1, ge=1, le=1024, description="Training workers (Ray Train num_workers).")
    cpus_per_worker: float | None = Field(
        default=None,
        gt=0.0,
        le=1024.0,
        description="Ray CPUs each worker takes; when omitted the workers share this machine's CPUs.",
    )
    gpus_per_worker: int = Field(default=0, ge=0, le=16, description="GPUs per worker; 0 trains on CPU.")


class RunConfig(ContractModel):
    """Everything the run entry point reads."""

    spec: RunSpec = Field(description="What to fine-tune and how.")
    run: RunIdentity = Field(default_factory=RunIdentity, description="Which job and run this is.")
    resources: WorkerResources = Field(default_factory=WorkerResources, description="Training workers.")

    @classmethod
    def from_document(cls, document: Any) -> RunConfig:
        """A RunConfig from its JSON form, or from a bare RunSpec document."""
        if isinstance(document, dict) and "spec" in document:
            return cls.model_validate(document)
        return cls(spec=RunSpec.model_validate(document))
