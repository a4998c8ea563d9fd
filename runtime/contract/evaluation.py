"""Evaluation beyond the run's test split: benchmark tasks of lm-evaluation-harness."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .common import ContractModel, Uri

TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]+$", max_length=128)]


class LmEvalSpec(ContractModel):
    """lm-evaluation-harness tasks scored on the base model, the fine-tuned model and each variant.

    Each task's metrics join the test metrics as <task>.<metric> (e.g. hellaswag.acc_norm), so the status,
    the results table and the promotion gate show them beside kubetune's own.
    """

    tasks: list[TaskName] = Field(
        min_length=1,
        max_length=8,
        description=(
            "Task (or group) names: lm-evaluation-harness's own (e.g. hellaswag, arc_easy; their data comes from "
            "the Hugging Face Hub) or those defined in taskFolder."
        ),
    )
    task_folder: Uri | None = Field(
        default=None,
        description=(
            "A folder of task YAML files (a path, file://, pvc:// or s3://), as lm-evaluation-harness defines "
            "tasks; relative data_files in them are read from this folder."
        ),
    )
    num_fewshot: int | None = Field(
        default=None, ge=0, le=64, description="Few-shot examples per prompt; each task's own when omitted."
    )
    limit: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Score at most this many examples of each task."
    )
    batch_size: int = Field(default=8, ge=1, le=1024, description="Requests scored per forward pass.")
    max_drop: float | None = Field(
        default=None,
        ge=0.0,
        le=1000.0,
        description=(
            "The promotion gate refuses a run whose fine-tuned model scores any task metric worse than the base "
            "model by more than this, in the metric's direction (0.02 is two points of accuracy): catastrophic "
            "forgetting. Omitted: not checked."
        ),
    )


class EvaluationSpec(ContractModel):
    """What else the run evaluates its models on."""

    lm_eval: LmEvalSpec | None = Field(default=None, description="Benchmark tasks of lm-evaluation-harness.")
