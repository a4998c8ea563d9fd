"""How the model's weights are adapted: full fine-tune, LoRA/DoRA, QLoRA or freeze."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field, model_validator

from .common import ContractModel, cel_rule, with_cel

MODULE_NAME_PATTERN = r"^[A-Za-z0-9_.*\[\]-]+$"


class MethodType(StrEnum):
    FULL = "full"
    LORA = "lora"
    DORA = "dora"
    QLORA = "qlora"
    FREEZE = "freeze"


ADAPTER_METHODS = frozenset({MethodType.LORA, MethodType.DORA, MethodType.QLORA})


class LoraOptions(ContractModel):
    """Low-rank adapter settings (LoRA, DoRA and QLoRA), as in peft's LoraConfig."""

    rank: int = Field(default=8, ge=1, le=1024, description="Rank r of the low-rank update matrices.")
    alpha: float = Field(
        default=16.0, gt=0, le=4096, description="Scaling numerator: the update is scaled by alpha/rank."
    )
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout applied to the adapter input.")
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Names (or suffixes) of the modules to adapt, e.g. [query, value]. "
            "When omitted, the attention projections of the model's architecture are chosen."
        ),
    )
    merge: bool = Field(
        default=True, description="Also export a variant with the adapter merged into the base weights."
    )


class QuantizedBaseOptions(ContractModel):
    """How QLoRA stores the frozen base model (bitsandbytes 4-bit). GPU only."""

    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type: nf4 or fp4.")
    double_quant: bool = Field(default=True, description="Also quantize the quantization constants.")


class FreezeOptions(ContractModel):
    """Train only the classifier head and the top encoder/decoder layers."""

    trainable_layers: int = Field(
        default=2,
        ge=0,
        le=1000,
        description="Number of top transformer layers left trainable (0 trains the head only).",
    )


class Method(ContractModel):
    """The fine-tuning method and its options. Options of other methods must not be set."""

    model_config = with_cel(
        cel_rule(
            "!has(self.freeze) || self.type == 'freeze'", "freeze options are only valid with type freeze", ".freeze"
        ),
        cel_rule(
            "!has(self.lora) || self.type in ['lora', 'dora', 'qlora']",
            "lora options are only valid with type lora, dora or qlora",
            ".lora",
        ),
        cel_rule("!has(self.qlora) || self.type == 'qlora'", "qlora options are only valid with type qlora", ".qlora"),
    )

    type: MethodType = Field(default=MethodType.LORA, description="full, lora, dora, qlora (GPU only) or freeze.")
    lora: LoraOptions | None = Field(default=None, description="Adapter options for lora, dora and qlora.")
    qlora: QuantizedBaseOptions | None = Field(default=None, description="Base-model quantization for qlora.")
    freeze: FreezeOptions | None = Field(default=None, description="Options for freeze.")

    @model_validator(mode="after")
    def _options_match_type(self) -> Method:
        if self.freeze is not None and self.type != MethodType.FREEZE:
            raise ValueError(f"freeze is set but type is {self.type.value!r}; use type 'freeze'")
        if self.lora is not None and self.type not in ADAPTER_METHODS:
            raise ValueError(f"lora is set but type is {self.type.value!r}; use lora, dora or qlora")
        if self.qlora is not None and self.type != MethodType.QLORA:
            raise ValueError(f"qlora is set but type is {self.type.value!r}; use type 'qlora'")
        return self

    @property
    def lora_options(self) -> LoraOptions:
        """The adapter options in effect (defaults when not given)."""
        return self.lora or LoraOptions()

    @property
    def freeze_options(self) -> FreezeOptions:
        return self.freeze or FreezeOptions()

    @property
    def qlora_options(self) -> QuantizedBaseOptions:
        return self.qlora or QuantizedBaseOptions()
