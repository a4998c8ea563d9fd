"""How the model's weights are adapted (full fine-tune, LoRA/DoRA, QLoRA or freeze) and what they learn
(the objective: supervised fine-tuning or a preference objective)."""

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


class Objective(StrEnum):
    """What the training optimises; the names are TRL's."""

    SFT = "sft"
    DPO = "dpo"
    ORPO = "orpo"
    KTO = "kto"
    SIMPO = "simpo"


PREFERENCE_OBJECTIVES = frozenset({Objective.DPO, Objective.ORPO, Objective.KTO, Objective.SIMPO})
# Objectives that score the model against the base model (the reference); with adapters, the reference
# is the same model with its adapters disabled, so no second copy is held.
REFERENCE_OBJECTIVES = frozenset({Objective.DPO, Objective.KTO})


class DpoLoss(StrEnum):
    SIGMOID = "sigmoid"
    HINGE = "hinge"
    IPO = "ipo"


class PreferenceOptions(ContractModel):
    """Parameters of a preference objective (defaults as in TRL); each only with the objective that uses it."""

    beta: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description=(
            "Temperature of the preference loss: how far the model may move from the reference (dpo, kto), the "
            "weight of the odds-ratio term (orpo) or the reward scale (simpo). 0.1 when omitted."
        ),
    )
    loss_type: DpoLoss | None = Field(
        default=None, description="dpo only: sigmoid (the DPO paper's), hinge (SLiC) or ipo. sigmoid when omitted."
    )
    simpo_gamma: float | None = Field(
        default=None,
        ge=0.0,
        le=100.0,
        description="simpo only: the target reward margin gamma (TRL's simpo_gamma). 0.5 when omitted.",
    )
    desirable_weight: float | None = Field(
        default=None, gt=0.0, le=100.0, description="kto only: weight of the desirable examples' loss. 1 when omitted."
    )
    undesirable_weight: float | None = Field(
        default=None,
        gt=0.0,
        le=100.0,
        description="kto only: weight of the undesirable examples' loss. 1 when omitted.",
    )


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
        cel_rule(
            "!has(self.preference) || (has(self.objective) && self.objective != 'sft')",
            "preference options need a preference objective (dpo, orpo, kto or simpo)",
            ".preference",
        ),
        cel_rule(
            "!has(self.preference) || !has(self.preference.lossType) || self.objective == 'dpo'",
            "preference.lossType is only valid with objective dpo",
            ".preference.lossType",
        ),
        cel_rule(
            "!has(self.preference) || !has(self.preference.simpoGamma) || self.objective == 'simpo'",
            "preference.simpoGamma is only valid with objective simpo",
            ".preference.simpoGamma",
        ),
        cel_rule(
            "!has(self.preference) || (!has(self.preference.desirableWeight)"
            " && !has(self.preference.undesirableWeight)) || self.objective == 'kto'",
            "preference.desirableWeight and undesirableWeight are only valid with objective kto",
            ".preference",
        ),
    )

    type: MethodType = Field(default=MethodType.LORA, description="full, lora, dora, qlora (GPU only) or freeze.")
    lora: LoraOptions | None = Field(default=None, description="Adapter options for lora, dora and qlora.")
    qlora: QuantizedBaseOptions | None = Field(default=None, description="Base-model quantization for qlora.")
    freeze: FreezeOptions | None = Field(default=None, description="Options for freeze.")
    # Unset (not sft) by default: a spec written before objectives existed keeps its run hash.
    objective: Objective | None = Field(
        default=None,
        description=(
            "What training optimises: sft (supervised fine-tuning on completions), or a preference objective on "
            "prompt/chosen/rejected data: dpo, orpo, simpo, or kto (which also takes prompt/completion/label "
            "records). Preference objectives need model.task causal-lm. sft when omitted."
        ),
    )
    preference: PreferenceOptions | None = Field(default=None, description="Parameters of the preference objective.")

    @model_validator(mode="after")
    def _options_match_type(self) -> Method:
        if self.freeze is not None and self.type != MethodType.FREEZE:
            raise ValueError(f"freeze is set but type is {self.type.value!r}; use type 'freeze'")
        if self.lora is not None and self.type not in ADAPTER_METHODS:
            raise ValueError(f"lora is set but type is {self.type.value!r}; use lora, dora or qlora")
        if self.qlora is not None and self.type != MethodType.QLORA:
            raise ValueError(f"qlora is set but type is {self.type.value!r}; use type 'qlora'")
        self._check_preference()
        return self

    def _check_preference(self) -> None:
        options, objective = self.preference, self.resolved_objective
        if options is None:
            return
        if objective not in PREFERENCE_OBJECTIVES:
            raise ValueError("preference options need a preference objective (dpo, orpo, kto or simpo)")
        if options.loss_type is not None and objective != Objective.DPO:
            raise ValueError(f"preference.lossType is only valid with objective dpo, not {objective.value}")
        if options.simpo_gamma is not None and objective != Objective.SIMPO:
            raise ValueError(f"preference.simpoGamma is only valid with objective simpo, not {objective.value}")
        if (options.desirable_weight, options.undesirable_weight) != (None, None) and objective != Objective.KTO:
            raise ValueError(
                "preference.desirableWeight and undesirableWeight are only valid with objective kto, "
                f"not {objective.value}"
            )

    @property
    def resolved_objective(self) -> Objective:
        return self.objective or Objective.SFT

    @property
    def keeps_frozen_reference(self) -> bool:
        """Whether training holds a frozen copy of the base model: dpo and kto without adapters to disable."""
        return self.resolved_objective in REFERENCE_OBJECTIVES and self.type not in ADAPTER_METHODS

    @property
    def preference_options(self) -> PreferenceOptions:
        return self.preference or PreferenceOptions()

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
