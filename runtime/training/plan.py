"""What every training worker needs, as one picklable value, and the values a search overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.runtime.contract import Hyperparameters, Method, Metric, Mode, RunSpec, Sharding
from kubetune.runtime.data.load import Examples
from kubetune.runtime.io.settings import RuntimeSettings

# Groups of nested method options a search may set ("lora.rank", "freeze.trainableLayers").
_METHOD_OPTIONS = frozenset({"lora", "freeze"})


def with_overrides(spec: RunSpec, overrides: dict[str, Any]) -> RunSpec:
    """`spec` with searched values applied: hyperparameter aliases or `lora.*` / `freeze.*` keys."""
    if not overrides:
        return spec
    auto = set(spec.hyperparameters.auto_fields()) & overrides.keys()
    if auto:  # the contract refuses such a search; a value left to kubetune is never a trial's
        raise ValueError(f"hyperparameters.{sorted(auto)[0]} is auto: it is resolved, not searched")
    hyperparameters = spec.hyperparameters.to_wire()
    method = spec.method.to_wire()
    for key, value in overrides.items():
        group, _, option = key.partition(".")
        if option and group in _METHOD_OPTIONS:
            method.setdefault(group, {})[option] = value
        else:
            hyperparameters[key] = value
    return spec.model_copy(
        update={
            "hyperparameters": Hyperparameters.model_validate(hyperparameters),
            "method": Method.model_validate(method),
        }
    )


@dataclass(frozen=True)
class TrainingPlan:
    """The spec, the label names and the examples a training run uses."""

    spec: RunSpec
    labels: list[str]
    train: Examples
    validation: Examples
    settings: RuntimeSettings
    threads_per_worker: int = 1
    sharding: Sharding = Sharding.NONE  # resources.sharding: how the workers hold the model
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_spec(self) -> RunSpec:
        return with_overrides(self.spec, self.overrides)

    @property
    def metric(self) -> Metric:
        return self.spec.search_metric

    @property
    def mode(self) -> Mode:
        return self.spec.search_mode
