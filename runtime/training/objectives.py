"""What a training step minimises: the task's loss (sft), or a preference objective's (dpo, orpo, simpo, kto).

The preference losses are TRL's (DPOTrainer, ORPOTrainer, CPOTrainer with loss_type simpo, KTOTrainer), written
against log-probabilities so they run inside kubetune's own loop: resume, search, FSDP and validation stay as
they are for every objective. TRL keeps its losses inside its trainers (methods bound to Accelerate state), so
they are restated here, and tests check them against TRL's own code. dpo and kto score the model against the
base model: with adapters that is the same model with its adapters disabled; otherwise a frozen copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from kubetune.runtime.contract import (
    PREFERENCE_OBJECTIVES,
    REFERENCE_OBJECTIVES,
    DpoLoss,
    Objective,
    PreferenceOptions,
    RunSpec,
    Sharding,
)
from kubetune.runtime.data.preference import mismatched_rows, paired_count, sequence_logps
from kubetune.runtime.data.task_ops import TaskOps
from kubetune.runtime.evaluate import forward_logits
from kubetune.runtime.io.errors import InvalidRunError
from torch import nn
from torch.nn import functional

DEFAULT_BETA = 0.1
DEFAULT_SIMPO_GAMMA = 0.5

Batch = dict[str, torch.Tensor]


class TrainingObjective(Protocol):
    def loss(self, model: nn.Module, inputs: Batch, options: dict[str, Any]) -> torch.Tensor:
        """The batch's mean training loss, from `model`'s forward pass (`options` go to it)."""


@dataclass(frozen=True)
class Supervised:
    """The task's own loss: cross-entropy of the labels (classification) or of the completion tokens (sft)."""

    ops: TaskOps

    def loss(self, model: nn.Module, inputs: Batch, options: dict[str, Any]) -> torch.Tensor:
        return self.ops.loss(forward_logits(model, inputs, **options), inputs["labels"])


class Reference:
    """The base model's completion log-probabilities: the policy with its adapters disabled, or a frozen copy."""

    def __init__(self, policy: nn.Module, adapters: nn.Module | None, frozen: nn.Module | None) -> None:
        self.policy, self.adapters, self.frozen = policy, adapters, frozen

    @torch.no_grad()
    def logps(self, inputs: Batch) -> torch.Tensor:
        if self.frozen is not None:
            return sequence_logps(forward_logits(self.frozen, inputs), inputs["labels"])[0]
        assert self.adapters is not None
        disabled: Any = self.adapters.disable_adapter()  # type: ignore[operator]
        with disabled:
            return sequence_logps(forward_logits(self.policy, inputs), inputs["labels"])[0]


def frozen_reference(model: nn.Module, spec: RunSpec, sharding: Sharding) -> nn.Module | None:
    """A frozen copy of the base model, when the objective needs a reference that adapters cannot give.

    Taken before a resumed run loads its weights, so it is always the base model.
    """
    objective = spec.method.resolved_objective
    if not spec.method.keeps_frozen_reference:
        return None
    if sharding == Sharding.FSDP:
        raise InvalidRunError(
            "method.objective",
            f"{objective.value} with method.type {spec.method.type.value} keeps a whole reference model on every "
            "GPU, which a sharded (fsdp) run cannot hold; use method.type lora, or objective orpo or simpo",
        )
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def _mean_nll(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return -sums.sum() / counts.sum().clamp(min=1)


@dataclass
class Preference:
    """A preference objective's loss over a batch of pairs (chosen rows, then rejected) or kto examples."""

    objective: Objective
    options: PreferenceOptions
    reference: Reference | None

    @property
    def beta(self) -> float:
        return self.options.beta or DEFAULT_BETA

    def loss(self, model: nn.Module, inputs: Batch, options: dict[str, Any]) -> torch.Tensor:
        sums, counts = sequence_logps(forward_logits(model, inputs, **options), inputs["labels"])
        if self.objective == Objective.KTO:
            return self._kto(model, inputs, sums)
        pairs = paired_count(inputs)
        chosen, rejected = sums[:pairs], sums[pairs : 2 * pairs]
        chosen_tokens, rejected_tokens = counts[:pairs], counts[pairs : 2 * pairs]
        if self.objective == Objective.DPO:
            assert self.reference is not None
            reference = self.reference.logps(inputs)
            return dpo_loss(
                chosen - reference[:pairs],
                rejected - reference[pairs : 2 * pairs],
                chosen_tokens,
                rejected_tokens,
                self.beta,
                self.options.loss_type or DpoLoss.SIGMOID,
            )
        chosen_mean, rejected_mean = chosen / chosen_tokens.clamp(min=1), rejected / rejected_tokens.clamp(min=1)
        if self.objective == Objective.ORPO:
            return _mean_nll(chosen, chosen_tokens) + orpo_penalty(chosen_mean, rejected_mean, self.beta)
        gamma = self.options.simpo_gamma if self.options.simpo_gamma is not None else DEFAULT_SIMPO_GAMMA
        return simpo_loss(chosen_mean, rejected_mean, self.beta, gamma)

    def _kto(self, model: nn.Module, inputs: Batch, sums: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None
        reference = self.reference.logps(inputs)
        mismatched = mismatched_rows(inputs)
        with torch.no_grad():
            kl_policy = sequence_logps(forward_logits(model, mismatched), mismatched["labels"])[0]
        kl = (kl_policy - self.reference.logps(mismatched)).mean().detach()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(kl, op=dist.ReduceOp.SUM)
            kl = kl / dist.get_world_size()
        return kto_loss(
            sums - reference,
            inputs["desirable"].bool(),
            kl.clamp(min=0),
            self.beta,
            self.options.desirable_weight or 1.0,
            self.options.undesirable_weight or 1.0,
        )


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
    loss_type: DpoLoss,
) -> torch.Tensor:
    """DPOTrainer's loss from the log-ratios (policy - reference) of the chosen and rejected completions."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == DpoLoss.SIGMOID:
        losses = -functional.logsigmoid(beta * delta)
    elif loss_type == DpoLoss.HINGE:
        losses = torch.relu(1 - beta * delta)
    else:  # ipo, per completion token as TRL normalises it
        per_token = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    return losses.mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_penalty(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """ORPOTrainer's odds-ratio term (added to the chosen completions' NLL) from mean per-token log-probs."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return -(beta * functional.logsigmoid(log_odds)).mean()


def simpo_loss(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """CPOTrainer's simpo loss (cpo_alpha 0) from mean per-token log-probs: a margin of gamma, no reference."""
    logits = (chosen_mean - rejected_mean) - gamma / beta
    return (-functional.logsigmoid(beta * logits)).mean()


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> torch.Tensor:
    """KTOTrainer's loss from each example's log-ratio (policy - reference) and the batch's KL estimate."""
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios[desirable] - kl)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios[~desirable])))
    return torch.cat([desirable_losses, undesirable_losses]).mean()


def training_objective(
    spec: RunSpec, ops: TaskOps, policy: nn.Module, adapters: nn.Module, frozen: nn.Module | None
) -> TrainingObjective:
    """The objective of `spec`: `policy` is the (possibly wrapped) model trained, `adapters` the peft model
    inside it, `frozen` the reference copy from `frozen_reference`."""
    objective = spec.method.resolved_objective
    if objective not in PREFERENCE_OBJECTIVES:
        return Supervised(ops)
    reference = None
    if objective in REFERENCE_OBJECTIVES:
        reference = Reference(policy, None if frozen is not None else adapters, frozen)
    return Preference(objective, spec.method.preference_options, reference)
