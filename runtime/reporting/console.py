"""The run on a console: stages, a bar per epoch, the search's trials, each variant, then the results.

On a terminal the bars and the trial table update in place. When the output is captured
(CI, `kubectl logs`, a file) nothing can update in place, so the same events become
plain lines: one per finished epoch (and one every `LINE_INTERVAL_S` in a long epoch),
one per trial that starts or ends, one per variant.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kubetune.runtime.contract.report import RunReport, Stage, Unavailable, VariantReport
from rich.console import Console, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .base import TrainingProgress, TrialBoard, TrialState

# Seconds between two progress lines within one epoch when the output is not a terminal.
LINE_INTERVAL_S = 15.0


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _values(hyperparameters: dict[str, object]) -> str:
    return ", ".join(
        f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in sorted(hyperparameters.items())
    )


def _size(report: VariantReport) -> str:
    return "—" if report.size_bytes is None else f"{report.size_bytes / 1e6:.1f}"


def _latency(report: VariantReport) -> str:
    return "—" if report.latency_ms_p50 is None else f"{report.latency_ms_p50:.1f}"


def variant_line(name: str, report: VariantReport) -> str:
    """One variant in words, e.g. `int8: 23.1 MB, p50 4.2 ms, accuracy 0.9500, accepted`."""
    metrics = ", ".join(f"{key} {value:.4f}" for key, value in sorted(report.metrics.items()))
    verdict = "accepted" if report.accepted else f"not accepted: {report.reason}"
    parts = [f"{_size(report)} MB", f"p50 {_latency(report)} ms", metrics, verdict]
    return f"{name}: " + ", ".join(part for part in parts if part)


def baseline_line(result: RunReport) -> str | None:
    """Why the run has no classical baseline, in words; None when it has one (the table shows it) or says nothing."""
    baseline = result.baseline
    if baseline is None or baseline.metrics:
        return None
    return f"no classical baseline: {baseline.skipped or 'not measured'}"


def decisions_table(result: RunReport) -> Table | None:
    """The values chosen for the spec's `auto` fields and why; None when the spec left none to the run."""
    if not result.decisions:
        return None
    table = Table(title="auto values")
    table.add_column("field", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("why")
    for decision in result.decisions:
        value = str(decision.value).lower() if isinstance(decision.value, bool) else str(decision.value)
        table.add_row(escape(decision.field), escape(value), escape(decision.reason))
    return table


def results_table(result: RunReport, promoted: str | None = None) -> Table:
    """Base model, classical baseline, fine-tuned model and every variant side by side.

    `promoted` marks what the gate promotes.
    """
    before, after, variants = result.metrics_before or {}, result.metrics_after or {}, result.variants or {}
    baseline = result.baseline if result.baseline is not None and result.baseline.metrics else None
    names = sorted(set(before) | set(after))
    table = Table(title="results (test set)")
    table.add_column("model")
    for name in names:
        table.add_column(name, justify="right")
    for column in ("size MB", "p50 ms"):
        table.add_column(column, justify="right")
    table.add_column("accepted")
    table.add_row("base model", *(_number(before.get(name)) for name in names), "", "", "")
    if baseline is not None:
        label = f"baseline ({baseline.model})" if baseline.model else "baseline"
        table.add_row(escape(label), *(_number(baseline.metrics.get(name)) for name in names), "", "", "")
    table.add_row("fine-tuned", *(_number(after.get(name)) for name in names), "", "", "")
    for variant, report in variants.items():
        label = f"  {variant}"
        if variant == result.best_variant:
            label += " (best)"
        if variant == promoted:
            label = f"[bold green]{label} ← promoted[/bold green]"
        verdict = "yes" if report.accepted else f"no: {escape(report.reason or '')}"
        metrics = (_number(report.metrics.get(name)) for name in names)
        table.add_row(label, *metrics, _size(report), _latency(report), verdict)
    return table


def trials_table(board: TrialBoard) -> Table:
    table = Table(title=f"search: {board.completed}/{board.total} trials done")
    for column in ("trial", "state", "hyperparameters", board.metric, "reports"):
        table.add_column(column, justify="right" if column in (board.metric, "reports") else "left")
    for row in board.rows:
        values = _values(row.hyperparameters)
        table.add_row(row.trial_id, row.state.value, values, _number(row.metric), str(row.reports))
    return table


class ConsoleReporter:
    """Renders a run's events on `console`; `show_result=False` leaves the final table and errors to the caller."""

    def __init__(
        self, console: Console | None = None, show_result: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.console = console or Console()
        self.show_result = show_result
        self.clock = clock
        self.in_place = self.console.is_terminal
        self._bars: Progress | None = None
        self._epoch_task: TaskID | None = None
        self._epoch: int | None = None
        self._epoch_started = 0.0
        self._last_line = 0.0
        self._live: Live | None = None
        self._trial_states: dict[str, TrialState] = {}

    def _stop_displays(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars, self._epoch_task, self._epoch = None, None, None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _print(self, renderable: RenderableType | str) -> None:
        self.console.print(renderable, soft_wrap=True, highlight=False)

    def stage_started(self, stage: Stage, message: str = "") -> None:
        self._stop_displays()
        self._print(f"[bold cyan]{stage.value}[/bold cyan] {escape(message)}")

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        sizes = " / ".join(f"{count} {split}" for split, count in splits.items())
        shown = f"; {len(labels)} labels: {', '.join(labels)}" if labels else ""
        self._print(f"  {sizes} examples{escape(shown)}")

    # Training: a bar per epoch on a terminal, a line per epoch otherwise.

    def progress(self, progress: TrainingProgress) -> None:
        speed = "" if progress.samples_per_second is None else f"{progress.samples_per_second:.1f} samples/s"
        epoch_steps = progress.epoch_steps or progress.total_steps
        if self.in_place:
            self._update_bar(progress, epoch_steps, speed)
            return
        now = self.clock()
        if progress.epoch_index != self._epoch:
            self._epoch, self._epoch_started, self._last_line = progress.epoch_index, now, now
        ended = progress.step_in_epoch >= epoch_steps or progress.step == progress.total_steps
        if not ended and now - self._last_line < LINE_INTERVAL_S:
            return
        self._last_line = now
        elapsed = now - self._epoch_started
        timing = f"{elapsed:.0f} s" if ended else f"ETA {self._eta(progress, epoch_steps, elapsed)}"
        self._print(
            f"  epoch {progress.epoch_index + 1}/{progress.epochs}: step {progress.step_in_epoch}/{epoch_steps}, "
            f"loss {progress.loss:.4f}" + (f", {speed}" if speed else "") + f", {timing}"
        )

    @staticmethod
    def _eta(progress: TrainingProgress, epoch_steps: int, elapsed: float) -> str:
        done = max(progress.step_in_epoch, 1)
        return f"{elapsed / done * (epoch_steps - progress.step_in_epoch):.0f} s"

    def _update_bar(self, progress: TrainingProgress, epoch_steps: int, speed: str) -> None:
        if self._bars is None:
            self._bars = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[loss]}"),
                TextColumn("{task.fields[speed]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bars.start()
        if progress.epoch_index != self._epoch or self._epoch_task is None:
            if self._epoch_task is not None:
                self._bars.update(self._epoch_task, completed=epoch_steps)
            description = f"epoch {progress.epoch_index + 1}/{progress.epochs}"
            self._epoch_task = self._bars.add_task(description, total=epoch_steps, loss="", speed="")
            self._epoch = progress.epoch_index
        loss = f"loss {progress.loss:.4f}"
        self._bars.update(self._epoch_task, completed=progress.step_in_epoch, loss=loss, speed=speed)

    # Search: a live table on a terminal, a line per trial that starts or ends otherwise.

    def trials(self, board: TrialBoard) -> None:
        if self.in_place:
            if self._live is None:
                self._live = Live(trials_table(board), console=self.console, auto_refresh=False)
                self._live.start()
            self._live.update(trials_table(board), refresh=True)
            return
        for row in board.rows:
            if self._trial_states.get(row.trial_id) == row.state or row.state == TrialState.PENDING:
                continue
            self._trial_states[row.trial_id] = row.state
            metric = "" if row.metric is None else f", {board.metric} {row.metric:.4f}"
            self._print(
                f"  trial {row.trial_id} {row.state.value} ({board.completed}/{board.total} done): "
                f"{_values(row.hyperparameters)}{metric}"
            )

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        if self._bars is not None and split == "validation":
            shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(values.items()))
            self._bars.console.print(f"  validation (step {step}): {shown}", highlight=False)
            return
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(values.items()))
        self._print(f"  {split} (step {step}): {shown}")

    def variant(self, name: str, report: VariantReport) -> None:
        self._print(f"  {escape(variant_line(name, report))}")

    def result(self, result: RunReport) -> None:
        self._stop_displays()
        if not self.show_result:
            return
        decisions = decisions_table(result)
        if decisions is not None:
            self._print(decisions)
        self._print(results_table(result))
        skipped = baseline_line(result)
        if skipped:
            self._print(f"  [dim]{escape(skipped)}[/dim]")
        for variant, report in sorted((result.variants or {}).items()):
            self._print(f"  [dim]{variant}[/dim] {escape(report.uri)}")
        if result.manifest_uri:
            self._print(f"  [dim]manifest[/dim] {escape(result.manifest_uri)}")

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        self._stop_displays()
        if self.show_result:
            self._print(f"[red]run failed:[/red] {escape(message)}")
