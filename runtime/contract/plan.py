"""What the plan of a GPU run found before any GPU was held: the operator launches or refuses on it.

On a cluster a run that asks for GPUs is planned first by a CPU-only Job (the entry point
`python -m kubetune.runtime.recipe.plan --config run.json`), which writes this model as JSON
under `PLAN_KEY` in the run's report ConfigMap. The operator creates the run's RayJob only
when the plan fits (or could not be judged); a plan that does not fit fails the run with the
figures and what would fit. The job's status carries the same summary.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

from .common import FiniteOrNull, Message, ShortText, WireModel
from .decisions import Decisions

PLAN_KEY = "plan.json"
# Notes a plan carries at most (what it could not take into account), cut rather than refused.
MAX_PLAN_NOTES = 4


def _first_notes(value: object) -> object:
    return value[:MAX_PLAN_NOTES] if isinstance(value, list) else value


class RunPlan(WireModel):
    """Memory per device and speed of a run as planned from the model's config.json, before it runs."""

    gpu: ShortText | None = Field(
        default=None,
        description="The planner's GPU type the run was judged on (from resources.gpuType); null when unknown.",
    )
    fits: bool | None = Field(
        default=None, description="Whether the run fits that GPU's memory; null when not judged (no known GPU type)."
    )
    devices: int | None = Field(default=None, ge=1, description="Training processes (GPUs) the run uses.")
    memory_per_device_bytes: int | None = Field(
        default=None, ge=0, description="Planned peak memory per device: weights, gradients, optimizer, activations."
    )
    device_memory_bytes: int | None = Field(default=None, ge=0, description="Memory of one GPU of that type.")
    tokens_per_second: FiniteOrNull = Field(
        default=None, ge=0, description="Planned training throughput of the whole run on that GPU type."
    )
    gpu_hours: FiniteOrNull = Field(
        default=None, ge=0, description="Planned GPU-hours of the run on that GPU type (null without the data)."
    )
    decisions: Decisions = Field(default_factory=list, description="Values chosen for auto fields, and why.")
    message: Message | None = Field(
        default=None, description="Why the run does not fit and what would (numbers and suggested changes)."
    )
    invalid_field: ShortText | None = Field(
        default=None, description="The spec field that keeps the run from being planned, below spec (model.uri, say)."
    )
    error: Message | None = Field(
        default=None, description="What keeps the run from being planned, when something does."
    )
    notes: Annotated[list[Message], BeforeValidator(_first_notes), Field(max_length=MAX_PLAN_NOTES)] = Field(
        default_factory=list, description="What the plan could not take into account."
    )

    @property
    def refused(self) -> bool:
        """The run cannot work as specified: it does not fit, or its spec cannot be planned."""
        return self.fits is False or self.invalid_field is not None
