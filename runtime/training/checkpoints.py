"""Training checkpoints: the trainable weights, optimizer and schedule, and where training stood.

Only parameters that train are stored (for adapters: the adapters and the head), so a
checkpoint is small for LoRA; the frozen rest is reloaded from the base model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

STATE_FILE = "training_state.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters that require gradients, by name."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put trained weights back into a model built the same way; every trainable weight must be present."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(expected - set(state))
    unknown = sorted(set(state) - {name for name, _ in model.named_parameters()})
    if missing or unknown:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, value in state.items():
            parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))


@dataclass
class TrainingPosition:
    """Where training stands; enough to resume exactly or to stop early."""

    epoch: int = 0
    batch: int = 0  # batches of `epoch` already done
    step: int = 0  # optimizer steps done
    epochs_done: float = 0.0  # fractional, for reports
    evaluations_without_improvement: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    stopped_early: bool = False
    resumed_from_step: int | None = None  # set when this attempt started from a checkpoint
    train_seconds: float = 0.0  # time in training steps on the first worker
    train_samples: int = 0  # examples the first worker trained on

    @property
    def samples_per_second(self) -> float:
        """Training throughput of the whole run: each worker trains its own share at this rate."""
        return self.train_samples / self.train_seconds if self.train_seconds else 0.0


@dataclass
class TrainingState:
    """A checkpoint's contents."""

    weights: dict[str, torch.Tensor]
    best_weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    scheduler: dict[str, Any] | None
    position: TrainingPosition

    def save(self, folder: Path) -> None:
        payload = {
            "weights": self.weights,
            "best_weights": self.best_weights,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "position": asdict(self.position),
        }
        torch.save(payload, folder / STATE_FILE)

    @classmethod
    def load(cls, folder: Path) -> TrainingState:
        # weights_only: a checkpoint folder may come from shared storage; unpickling it must not run code.
        payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        return cls(
            weights=payload["weights"],
            best_weights=payload["best_weights"],
            optimizer=payload["optimizer"],
            scheduler=payload["scheduler"],
            position=TrainingPosition(**payload["position"]),
        )
