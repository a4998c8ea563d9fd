"""A plan report on a console: memory per device, the GPU types, the auto values and the fixes.

`kubetune plan` prints it on a terminal; the cluster's plan Job prints the same to its log
(`kubectl logs`).
"""

from __future__ import annotations

from kubetune.runtime.planner.report import PlanReport
from rich.console import Console
from rich.markup import escape
from rich.table import Table

GIB = 2**30


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
    """The report as `kubetune plan` shows it: a summary line, the tables, the notes and the verdict."""
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
