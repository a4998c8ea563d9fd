"""How an exported model is served (Ray Serve): the arguments of the serving application."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ContractModel


class Variant(StrEnum):
    """Which exported variant to serve."""

    BEST = "best"
    FULL = "full"
    MERGED = "merged"
    INT8 = "int8"
    PRUNED = "pruned"


class Batching(ContractModel):
    """Dynamic request batching (Ray Serve @serve.batch)."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Most requests run in one forward pass.")
    batch_wait_timeout_ms: float = Field(
        default=5.0, ge=0.0, le=10000.0, description="How long a batch waits to fill before it runs."
    )


class ServingArgs(ContractModel):
    """Serving defaults for this model: used by the local run and by deployments that reference it."""

    variant: Variant = Field(
        default=Variant.BEST,
        description=(
            "best (smallest accepted compressed variant, else the fine-tuned one), full, merged, int8 or pruned."
        ),
    )
    batching: Batching = Field(default_factory=Batching, description="Request batching.")
    max_new_tokens: int = Field(
        default=128, ge=1, le=32768, description="Upper bound on generated tokens per completion (causal-lm)."
    )
    route_prefix: str = Field(
        default="/", pattern=r"^/[-A-Za-z0-9_./]*$", max_length=253, description="HTTP path prefix of the endpoint."
    )
