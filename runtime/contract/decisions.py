"""A value chosen for a field the spec left to kubetune (`auto`), and why.

The planner makes these; the run report, the manifest and the job's status record them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema

from .common import Message, ShortText, WireModel

# Decisions a report carries at most: one per field a run may leave to kubetune, with room to spare.
MAX_DECISIONS = 8


class Decision(WireModel):
    """One value chosen for a field left to kubetune, and why."""

    field: ShortText = Field(
        description="The spec field decided, as a camelCase path (spec.hyperparameters.batchSize)."
    )
    # A number, a switch or a name: kept as written in a CRD status (which has no such union type).
    value: Annotated[bool | int | ShortText, WithJsonSchema({"x-kubernetes-preserve-unknown-fields": True})] = Field(
        description="The value chosen."
    )
    reason: Message = Field(description="Why this value: the figures it was chosen from.")


def _first_decisions(value: Any) -> Any:
    return value[:MAX_DECISIONS] if isinstance(value, list) else value


# The decisions a report or a status holds: the first MAX_DECISIONS, cut rather than refused.
Decisions = Annotated[list[Decision], BeforeValidator(_first_decisions), Field(max_length=MAX_DECISIONS)]
