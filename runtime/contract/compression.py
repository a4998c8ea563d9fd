"""Post-training compression: quantization, pruning and the accuracy budget."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from .common import ContractModel, cel_rule, with_cel


class QuantizationMethod(StrEnum):
    NONE = "none"
    INT8_WEIGHT_ONLY = "int8-weight-only"
    INT8_DYNAMIC = "int8-dynamic"


class PruningMethod(StrEnum):
    NONE = "none"
    MAGNITUDE = "magnitude"


class Quantization(ContractModel):
    """Integer quantization with torchao."""

    method: QuantizationMethod = Field(
        default=QuantizationMethod.INT8_DYNAMIC,
        description=(
            "none, int8-weight-only, or int8-dynamic (int8 weights and dynamically quantized "
            "int8 activations: the fastest on CPU)."
        ),
    )
    include_embeddings: bool = Field(
        default=True,
        description="Also store embedding tables as int8 (weight-only); they are often half of a small model.",
    )


class Pruning(ContractModel):
    """Global magnitude pruning of the linear layers' weights."""

    model_config = with_cel(
        cel_rule(
            "self.method == 'none' || self.amount > 0.0",
            "magnitude pruning needs amount > 0",
            ".amount",
        )
    )

    method: PruningMethod = Field(default=PruningMethod.NONE, description="none or magnitude.")
    amount: float = Field(
        default=0.3,
        ge=0.0,
        lt=1.0,
        description="Fraction of the linear-layer weights set to zero, smallest magnitudes first.",
    )


class Compression(ContractModel):
    """Compressed variants of the fine-tuned model, each measured (size, latency, metrics)."""

    quantization: Quantization = Field(default_factory=Quantization, description="Integer quantization.")
    pruning: Pruning = Field(default_factory=Pruning, description="Magnitude pruning.")
    max_accuracy_drop: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description=(
            "Largest drop of the test metric (accuracy for classification, as a fraction: 0.01 is one "
            "point) a compressed variant may show against the uncompressed fine-tuned model "
            "and still be accepted. For causal-lm the budget applies to relative perplexity growth."
        ),
    )
