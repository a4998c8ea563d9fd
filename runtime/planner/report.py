"""The plan report of a run: the plan, the GPU it is judged on, the `auto` values and the fixes.

Pure assembly from values already read (the spec, its workers, the parsed config.json, the
training data's token lengths): `kubetune plan` and the cluster's plan Job
(`python -m kubetune.runtime.recipe.plan`) build the same report here, and `run_plan`
summarises it as the RunPlan the operator reads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from kubetune.runtime.contract import AUTO, ContractModel, Hyperparameters, Precision, RunSpec, WorkerResources
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.plan import RunPlan
from pydantic import Field

from .auto import NothingFitsError, quantile, resolve_batch, resolve_precision, resolve_sequence_length
from .gpus import GPU_TYPES, GpuType
from .inputs import DeviceKind, PlanInput, Topology
from .plan import Plan, plan
from .shape import ConfigError, ModelShape, shape_from_config
from .suggest import Suggestion, does_not_fit_message, suggestions

REPORTED_QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class TrainingData:
    """The training split's token lengths (untruncated) and its label names."""

    lengths: list[int]
    labels: list[str]

    def tokens(self, max_length: int) -> int:
        """Tokens the model sees in one pass: each example truncated to the sequence length."""
        return sum(min(length, max_length) for length in self.lengths)


class SequenceLengths(ContractModel):
    """Token lengths of the training examples, by quantile."""

    examples: int = Field(ge=1, description="Training examples measured.")
    quantiles: dict[str, int] = Field(description="Token length per quantile: p50, p90, p95, p99, max.")
    train_tokens: int = Field(ge=0, description="Tokens of one pass, each example truncated to the sequence length.")


class PlanReport(ContractModel):
    """What `kubetune plan` prints: the plan, the GPU it is judged on, the auto values and the fixes."""

    job: str = Field(description="The FineTuneJob's name.")
    plan: Plan = Field(description="Memory per device, fit and speed per GPU type.")
    gpu: str | None = Field(default=None, description="The GPU type the job is judged on (--gpu or resources.gpuType).")
    fits: bool | None = Field(default=None, description="Whether the job fits that GPU; absent without one.")
    sequence_lengths: SequenceLengths | None = Field(default=None, description="The training data's token lengths.")
    decisions: list[Decision] = Field(description="What auto fields would be set to, and why.")
    suggestions: list[Suggestion] = Field(description="Changes that make a job that does not fit, fit.")
    message: str | None = Field(default=None, description="Why the job does not fit and what would.")
    notes: list[str] = Field(description="What the plan could not take into account.")


def model_shape(config: dict[str, Any]) -> ModelShape:
    """The shape of the model of a parsed config.json; SpecError on spec.model.uri when the planner cannot read it."""
    try:
        return shape_from_config(config)
    except ConfigError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None


def _quantile_name(q: float) -> str:
    return "max" if q == 1 else f"p{q * 100:g}"


# What an `auto` field is planned with until the plan's own decisions replace it.
_PLACEHOLDERS = {"batchSize": 1, "maxSequenceLength": 128, "precision": Precision.FP32, "gradientCheckpointing": False}


def _planned(hyper: Hyperparameters) -> Hyperparameters:
    """The hyperparameters with placeholders for `auto` fields (replaced by the decisions, see _decided)."""
    fields = hyper.auto_fields()
    if not fields:
        return hyper
    wire = hyper.to_wire() | {name: _PLACEHOLDERS[name] for name in fields}
    wire.pop("effectiveBatchSize", None)
    wire.pop("sequenceLengthQuantile", None)
    return Hyperparameters.model_validate(wire)


def _decided(inp: PlanInput, hyper: Hyperparameters, decisions: list[Decision]) -> PlanInput:
    """The plan's input with the decisions' values for the spec's `auto` fields."""
    chosen = {decision.field.rpartition(".")[2]: decision.value for decision in decisions}
    auto = set(hyper.auto_fields())
    update: dict[str, Any] = {}
    for name, attribute in (
        ("batchSize", "batch_size"),
        ("maxSequenceLength", "sequence_length"),
        ("gradientCheckpointing", "gradient_checkpointing"),
    ):
        if name in auto and isinstance(chosen.get(name), bool | int):
            update[attribute] = chosen[name]
    if "batchSize" in auto and isinstance(chosen.get("gradientAccumulationSteps"), int):
        update["gradient_accumulation_steps"] = chosen["gradientAccumulationSteps"]
    if "precision" in auto and isinstance(chosen.get("precision"), str):
        update["precision"] = Precision(str(chosen["precision"]))
    return replace(inp, **update)


def _plan_input(spec: RunSpec, resources: WorkerResources, shape: ModelShape, data: TrainingData | None) -> PlanInput:
    hyper = _planned(spec.hyperparameters)
    # Planned on GPUs even for a CPU run: what it would need on one is the question.
    device = DeviceKind.CUDA
    labels = len(spec.model.labels or (data.labels if data else [])) or 2
    return PlanInput(
        shape=shape,
        task=spec.model.task,
        method=spec.method,
        batch_size=hyper.resolved_batch_size,
        sequence_length=hyper.resolved_max_sequence_length,
        precision=hyper.resolved_precision,
        optimizer=hyper.optimizer,
        gradient_checkpointing=hyper.resolved_gradient_checkpointing,
        gradient_accumulation_steps=hyper.gradient_accumulation_steps,
        labels=labels,
        topology=Topology(resources.workers, max(1, resources.gpus_per_worker), resources.sharding),
        device=device,
        train_tokens=data.tokens(hyper.resolved_max_sequence_length) if data else None,
        epochs=hyper.epochs,
    )


def _decisions(
    inp: PlanInput, gpu: GpuType | None, data: TrainingData | None, q: float, hyper: Hyperparameters
) -> list[Decision]:
    # A spec with auto fields keeps its other values; one without any is shown what auto would choose for all.
    auto = set(hyper.auto_fields()) or {"maxSequenceLength", "precision"}
    decisions = []
    if data is not None:
        decisions.append(resolve_sequence_length(data.lengths, inp.shape.max_positions, q))
        if "maxSequenceLength" in hyper.auto_fields():
            inp = replace(inp, sequence_length=int(decisions[-1].value))
    decisions.append(resolve_precision(gpu, inp.device))
    if gpu is not None:
        # The batch for the precision it would choose, keeping the run's effective batch.
        precision = Precision(str(decisions[-1].value)) if "precision" in auto else inp.precision
        effective = (
            hyper.effective_batch_size or inp.batch_size * inp.gradient_accumulation_steps * inp.topology.devices
        )
        try:
            resolved = resolve_batch(replace(inp, precision=precision), gpu.memory_bytes, effective_batch=effective)
            decisions.extend(resolved.decisions)
        except NothingFitsError as error:
            decisions.append(Decision(field="spec.hyperparameters.batchSize", value="none", reason=str(error)))
    return decisions


def build_report(
    spec: RunSpec,
    resources: WorkerResources,
    *,
    job: str,
    gpu: GpuType | None,
    config: dict[str, Any],
    data: TrainingData | None,
    sequence_quantile: float,
    notes: list[str],
) -> PlanReport:
    """The plan of the run on `gpu` (None: not judged) from its parsed config.json and, if read, its data.

    `sequence_quantile` is the token-length quantile for an auto maxSequenceLength when the spec names none;
    `notes` are what the caller could not take into account. SpecError names what cannot be used.
    """
    notes = list(notes)
    shape = model_shape(config)
    if data is not None and not data.lengths:
        raise SpecError([f"spec.data.train {spec.data.train}: no training examples"])
    hyper = spec.hyperparameters
    length_quantile = hyper.sequence_length_quantile or sequence_quantile
    decisions = _decisions(_plan_input(spec, resources, shape, data), gpu, data, length_quantile, hyper)
    inp = _decided(_plan_input(spec, resources, shape, data), hyper, decisions)
    if hyper.max_sequence_length == AUTO and data is None:
        notes.append("maxSequenceLength is auto and the training data was not read: planned with 128 tokens")
    if resources.gpus_per_worker == 0:
        notes.append("the job asks for no GPUs (resources.gpusPerWorker): planned as if each worker had one")
    result = plan(inp, gpus=GPU_TYPES if gpu is None or gpu in GPU_TYPES else (*GPU_TYPES, gpu))
    lengths = None
    if data is not None:
        lengths = SequenceLengths(
            examples=len(data.lengths),
            quantiles={_quantile_name(q): quantile(data.lengths, q) for q in REPORTED_QUANTILES},
            train_tokens=data.tokens(inp.sequence_length),
        )
    fits = None
    found: list[Suggestion] = []
    message = None
    if gpu is not None:
        fits = result.memory.total_bytes <= gpu.memory_bytes
        if not fits:
            found = suggestions(inp, gpu)
            message = does_not_fit_message(inp, gpu, found)
    return PlanReport(
        job=job,
        plan=result,
        gpu=gpu.name if gpu else None,
        fits=fits,
        sequence_lengths=lengths,
        decisions=decisions,
        suggestions=found,
        message=message,
        notes=notes,
    )


def run_plan(report: PlanReport) -> RunPlan:
    """The summary the operator reads: the figures on the GPU the run was judged on, the decisions, the fix."""
    estimate = next((item for item in report.plan.gpus if item.gpu == report.gpu), None)
    return RunPlan(
        gpu=report.gpu,
        fits=report.fits,
        devices=report.plan.devices,
        memory_per_device_bytes=report.plan.memory.total_bytes,
        device_memory_bytes=estimate.memory_bytes if estimate else None,
        tokens_per_second=estimate.tokens_per_second if estimate else None,
        gpu_hours=estimate.gpu_hours if estimate else None,
        decisions=report.decisions,
        message=report.message,
        notes=report.notes,
    )
