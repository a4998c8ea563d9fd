"""Where a run tells what it is doing: the console, a JSON-lines file, TensorBoard.

A `Reporter` receives the same events wherever the run happens; the Kubernetes-object
reporter (`kube_reporter`) for runs inside the cluster implements the same protocol.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .contract.report import Stage
from .result import RunResult


@dataclass(frozen=True)
class TrainingProgress:
    """One training step as seen by the first worker."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float


class Reporter(Protocol):
    def stage_started(self, stage: Stage, message: str = "") -> None:
        """A pipeline stage began."""

    def progress(self, progress: TrainingProgress) -> None:
        """Training advanced by an optimizer step."""

    def trials(self, completed: int, total: int) -> None:
        """A search trial finished."""

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        """Metrics of a split (validation during training; test-before / test-after at the end)."""

    def result(self, result: RunResult) -> None:
        """The run finished and produced `result`."""

    def failed(self, message: str) -> None:
        """The run failed; `message` says why."""


class Reporters:
    """Sends every event to each of several reporters."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def stage_started(self, stage: Stage, message: str = "") -> None:
        for reporter in self.reporters:
            reporter.stage_started(stage, message)

    def progress(self, progress: TrainingProgress) -> None:
        for reporter in self.reporters:
            reporter.progress(progress)

    def trials(self, completed: int, total: int) -> None:
        for reporter in self.reporters:
            reporter.trials(completed, total)

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        for reporter in self.reporters:
            reporter.metrics(split, values, step)

    def result(self, result: RunResult) -> None:
        for reporter in self.reporters:
            reporter.result(result)

    def failed(self, message: str) -> None:
        for reporter in self.reporters:
            reporter.failed(message)


class JsonLinesReporter:
    """Appends one JSON object per event to a file (machine-readable progress)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, event: str, **fields: Any) -> None:
        with self.path.open("a", encoding="utf-8") as stream:
            stream.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def stage_started(self, stage: Stage, message: str = "") -> None:
        self._write("stage", stage=stage.value, message=message)

    def progress(self, progress: TrainingProgress) -> None:
        self._write("progress", **asdict(progress))

    def trials(self, completed: int, total: int) -> None:
        self._write("trials", completed=completed, total=total)

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        self._write("metrics", split=split, values=values, step=step)

    def result(self, result: RunResult) -> None:
        self._write("result", result=result.model_dump(mode="json", by_alias=True))

    def failed(self, message: str) -> None:
        self._write("failed", message=message)


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events a JsonLinesReporter wrote."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TensorBoardReporter:
    """Training loss, learning rate and metrics as TensorBoard scalars."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def stage_started(self, stage: Stage, message: str = "") -> None:
        pass

    def trials(self, completed: int, total: int) -> None:
        pass

    def progress(self, progress: TrainingProgress) -> None:
        self.writer.add_scalar("train/loss", progress.loss, progress.step)
        self.writer.add_scalar("train/learning_rate", progress.learning_rate, progress.step)
        self.writer.add_scalar("train/epoch", progress.epoch, progress.step)

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{split}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Write everything to disk (closing twice is harmless)."""
        self.writer.close()

    def result(self, result: RunResult) -> None:
        self.close()

    def failed(self, message: str) -> None:
        self.close()


def _format(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def metrics_table(before: dict[str, float], after: dict[str, float]) -> Table:
    table = Table(title="test metrics")
    for column in ("metric", "base model", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        change = f"{new - old:+.4f}" if old is not None and new is not None else "—"
        table.add_row(name, _format(old), _format(new), change)
    return table


def variants_table(result: RunResult) -> Table:
    table = Table(title="variants")
    for column in ("variant", "size MB", "p50 ms", "metrics", "accepted"):
        table.add_column(column, justify="left" if column in {"variant", "metrics", "accepted"} else "right")
    for name, variant in result.variants.items():
        size = "—" if variant.size_bytes is None else f"{variant.size_bytes / 1e6:.1f}"
        latency = "—" if variant.latency_ms_p50 is None else f"{variant.latency_ms_p50:.1f}"
        shown = ", ".join(f"{key} {value:.4f}" for key, value in sorted(variant.metrics.items()))
        verdict = "yes" if variant.accepted else f"no: {variant.reason}"
        marker = " (best)" if name == result.best_variant else ""
        table.add_row(name + marker, size, latency, shown, verdict)
    return table


class ConsoleReporter:
    """Progress bars while training, then a table of the base and fine-tuned metrics."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar, self._task = None, None

    def stage_started(self, stage: Stage, message: str = "") -> None:
        self._close_bar()
        self.console.print(f"[bold cyan]{stage.value}[/bold cyan] {message}")

    def trials(self, completed: int, total: int) -> None:
        self.console.print(f"  search: {completed}/{total} trials done")

    def progress(self, progress: TrainingProgress) -> None:
        if self._bar is None:
            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=progress.total_steps, status="")
        assert self._task is not None
        status = f"epoch {progress.epoch:.2f} loss {progress.loss:.4f}"
        self._bar.update(self._task, completed=progress.step, total=progress.total_steps, status=status)

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in sorted(values.items()))
        self.console.print(f"  {split} (step {step}): {shown}")

    def result(self, result: RunResult) -> None:
        self._close_bar()
        self.console.print(metrics_table(result.metrics_before, result.metrics_after))
        if result.variants:
            self.console.print(variants_table(result))
        for variant, uri in sorted(result.artifacts.items()):
            self.console.print(f"  [dim]{variant}[/dim] {uri}")
        self.console.print(f"  [dim]manifest[/dim] {result.manifest_uri}")

    def failed(self, message: str) -> None:
        self._close_bar()
        self.console.print(f"[red]run failed:[/red] {message}")
