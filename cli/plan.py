"""`kubetune plan FILE.yaml`: what a FineTuneJob needs before it runs, from the model's config.json.

Memory per device with its breakdown, whether it fits each GPU type, step time, tokens/s and
GPU-hours, the values the planner would choose for `auto` fields and why, and, for a job that
does not fit its GPU, the smallest changes that would.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.operator.api.finetunejob import FineTuneJob
from kubetune.runtime.contract import AUTO, ContractModel, Hyperparameters, Precision
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.planner import (
    DEFAULT_QUANTILE,
    GPU_TYPES,
    ConfigError,
    Decision,
    DeviceKind,
    GpuType,
    ModelShape,
    NothingFitsError,
    Plan,
    PlanInput,
    Suggestion,
    Topology,
    does_not_fit_message,
    gpu_type,
    plan,
    quantile,
    resolve_batch,
    resolve_precision,
    resolve_sequence_length,
    shape_from_config,
    suggestions,
)
from pydantic import Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .plan_sources import TrainingData, data_is_local, model_config, training_data
from .run import read_local_run, run_spec

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID = 0, 1, 2
REPORTED_QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)
GIB = 2**30


@dataclass(frozen=True)
class PlanFlags:
    gpu: str | None = None
    data: bool | None = None  # None: read it when it is local
    json: bool = False
    quantile: float = DEFAULT_QUANTILE


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


def _quantile_name(q: float) -> str:
    return "max" if q == 1 else f"p{q * 100:g}"


def _chosen_gpu(job: FineTuneJob, flags: PlanFlags, notes: list[str]) -> GpuType | None:
    if flags.gpu is not None:
        return gpu_type(flags.gpu)  # ValueError lists the known names
    named = job.spec.resources.gpu_type
    if named is None:
        return None
    try:
        return gpu_type(named)
    except ValueError:
        notes.append(
            f"spec.resources.gpuType {named} is not in the planner's table: name one with --gpu "
            f"({', '.join(g.name for g in GPU_TYPES)})"
        )
        return None


def _shape(config: dict[str, Any]) -> ModelShape:
    try:
        return shape_from_config(config)
    except ConfigError as error:
        raise SpecError([f"spec.model.uri: {error}"]) from None


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


def _plan_input(job: FineTuneJob, shape: ModelShape, data: TrainingData | None) -> PlanInput:
    spec = job.spec
    hyper = _planned(spec.hyperparameters)
    gpus = spec.resources.gpus_per_worker
    # Planned on GPUs even for a CPU job: what it would need on one is the question.
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
        topology=Topology(spec.resources.workers, max(1, gpus), spec.resources.sharding),
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
        # The batch for the precision it would choose, keeping the job's effective batch.
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


def build_report(path: Path, flags: PlanFlags) -> PlanReport:
    """The plan of the file's FineTuneJob; SpecError names what cannot be used."""
    job = read_local_run(path).job
    spec = run_spec(job, None)
    notes: list[str] = []
    gpu = _chosen_gpu(job, flags, notes)
    config = model_config(spec.model)
    read_data = data_is_local(spec) if flags.data is None else flags.data
    if flags.data is None and not read_data:
        notes.append(f"spec.data.train {spec.data.train} is not local: token lengths and GPU-hours unknown")
    shape = _shape(config)
    data = training_data(spec, shape.max_positions) if read_data else None
    hyper = job.spec.hyperparameters
    quantile_ = hyper.sequence_length_quantile or flags.quantile
    decisions = _decisions(_plan_input(job, shape, data), gpu, data, quantile_, hyper)
    inp = _decided(_plan_input(job, shape, data), hyper, decisions)
    if hyper.max_sequence_length == AUTO and data is None:
        notes.append("maxSequenceLength is auto and the training data was not read: planned with 128 tokens")
    if job.spec.resources.gpus_per_worker == 0:
        notes.append("the job asks for no GPUs (resources.gpusPerWorker): planned as if each worker had one")
    result = plan(inp, gpus=GPU_TYPES if gpu is None or gpu in GPU_TYPES else (*GPU_TYPES, gpu))
    lengths = None
    if data is not None:
        if not data.lengths:
            raise SpecError([f"spec.data.train {spec.data.train}: no training examples"])
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
        job=str(job.metadata["name"]),
        plan=result,
        gpu=gpu.name if gpu else None,
        fits=fits,
        sequence_lengths=lengths,
        decisions=decisions,
        suggestions=found,
        message=message,
        notes=notes,
    )


def _gib(value: int) -> str:
    return f"{value / GIB:.3g}"


def _memory_table(report: PlanReport) -> Table:
    memory = report.plan.memory
    table = Table(title=f"Memory per device ({report.plan.devices} device{'s' if report.plan.devices > 1 else ''})")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, value in (
        ("weights", memory.weights_bytes),
        ("adapters", memory.adapter_bytes),
        ("gradients", memory.gradient_bytes),
        ("optimizer state", memory.optimizer_bytes),
        ("activations", memory.activation_bytes),
        ("framework overhead", memory.overhead_bytes),
    ):
        table.add_row(part, _gib(value))
    table.add_row(f"[bold]total[/bold] (peak at {memory.peak_phase})", f"[bold]{_gib(memory.total_bytes)}[/bold]")
    return table


def _gpu_table(report: PlanReport) -> Table:
    table = Table(title=f"Per GPU type (MFU {report.plan.mfu:g})")
    for column, justify in (("GPU", "left"), ("memory GiB", "right"), ("fits", "center"), ("step s", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    table.add_column("tokens/s", justify="right")
    table.add_column("GPU-hours", justify="right")
    for estimate in report.plan.gpus:
        name = f"[bold]{estimate.gpu}[/bold] ←" if estimate.gpu == report.gpu else estimate.gpu
        fits = "[green]✓[/green]" if estimate.fits else "[red]✗[/red]"
        step = f"{estimate.step_seconds:.3g}" if estimate.step_seconds is not None else "no math for it"
        tokens = f"{estimate.tokens_per_second:,.0f}" if estimate.tokens_per_second is not None else "-"
        hours = f"{estimate.gpu_hours:.3g}" if estimate.gpu_hours is not None else "unknown"
        table.add_row(name, f"{estimate.memory_bytes / GIB:g}", fits, step, tokens, hours)
    return table


def _decision_table(report: PlanReport) -> Table:
    table = Table(title="What auto would choose")
    table.add_column("field", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("why")
    for decision in report.decisions:
        table.add_row(decision.field, _shown(decision.value), escape(decision.reason))
    return table


def _suggestion_table(report: PlanReport) -> Table:
    table = Table(title="What would make it fit (each planned again)")
    table.add_column("change", no_wrap=True)
    table.add_column("GiB per device", justify="right")
    table.add_column("on")
    for suggestion in report.suggestions:
        change = ", ".join(f"{path}: {_shown(value)}" for path, value in suggestion.changes.items())
        table.add_row(change, _gib(suggestion.total_bytes), suggestion.gpu)
    return table


def _shown(value: bool | int | str) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def print_report(report: PlanReport, console: Console) -> None:
    plan_ = report.plan
    console.print(
        f"[bold]{escape(report.job)}[/bold]: {plan_.parameters:,} parameters, {plan_.trainable_parameters:,} "
        f"trainable, {plan_.flops_per_token / 1e9:.3g} GFLOPs per training token",
        soft_wrap=True,
    )
    console.print(_memory_table(report))
    console.print(_gpu_table(report))
    lengths = report.sequence_lengths
    if lengths is not None:
        shown = ", ".join(f"{name} {value:,}" for name, value in lengths.quantiles.items())
        console.print(
            f"token lengths of {lengths.examples:,} training examples: {shown}; "
            f"{lengths.train_tokens:,} tokens per epoch",
            soft_wrap=True,
        )
    else:
        console.print("token lengths and GPU-hours: unknown (the training data was not read)")
    console.print(_decision_table(report))
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}", soft_wrap=True)
    if report.gpu is not None and report.fits:
        console.print(f"[green]✓[/green] fits on the {report.gpu}", soft_wrap=True)
    elif report.message is not None:
        if report.suggestions:
            console.print(_suggestion_table(report))
        console.print(f"[red]✗[/red] {escape(report.message)}", soft_wrap=True)


def plan_command(path: Path, flags: PlanFlags, console: Console, errors: Console) -> int:
    if not 0 < flags.quantile <= 1:
        errors.print("[red]error:[/red] --quantile must be in (0, 1]")
        return EXIT_INVALID
    try:
        report = build_report(path, flags)
    except SpecError as error:
        for problem in error.problems:
            errors.print(f"[red]✗[/red] {escape(problem)}", soft_wrap=True)
        return EXIT_INVALID
    except ValueError as error:  # an unknown --gpu, a planner input out of range
        errors.print(f"[red]✗[/red] {escape(str(error))}", soft_wrap=True)
        return EXIT_INVALID
    if flags.json:
        sys.stdout.write(report.model_dump_json(by_alias=True, indent=2) + "\n")
    else:
        print_report(report, console)
    return EXIT_DOES_NOT_FIT if report.fits is False else EXIT_FITS
