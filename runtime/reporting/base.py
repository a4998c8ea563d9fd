"""Where a run tells what it is doing: the console, a JSON-lines file, TensorBoard.

A `Reporter` receives the same events wherever the run happens; the Kubernetes-object
reporter (`kube_reporter`) for runs inside the cluster implements the same protocol.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from kubetune.runtime.contract.report import RunReport, Stage, Unavailable, VariantReport


@dataclass(frozen=True)
class TrainingProgress:
    """One training step as seen by the first worker."""

    step: int
    total_steps: int
    epoch: float  # fractional: 1.5 is halfway through the second epoch
    loss: float
    learning_rate: float
    epochs: int = 1
    epoch_steps: int = 0  # optimizer steps per epoch (0: unknown)
    samples_per_second: float | None = None  # training examples per second, all workers together

    @property
    def epoch_index(self) -> int:
        """The epoch this step belongs to, from 0."""
        if self.epoch_steps <= 0:
            return max(0, min(self.epochs - 1, int(self.epoch)))
        return max(0, (self.step - 1) // self.epoch_steps)

    @property
    def step_in_epoch(self) -> int:
        if self.epoch_steps <= 0:
            return self.step
        return self.step - self.epoch_index * self.epoch_steps


class TrialState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    STOPPED_EARLY = "stopped early"
    FAILED = "failed"


@dataclass(frozen=True)
class TrialRow:
    """One search trial as the search sees it."""

    trial_id: str
    state: TrialState
    hyperparameters: dict[str, Any]
    metric: float | None = None  # the latest validation value of the search metric
    reports: int = 0  # validation reports so far


@dataclass(frozen=True)
class TrialBoard:
    """Every trial of a search, in start order, and how many the search plans."""

    metric: str
    rows: list[TrialRow]
    total: int

    @property
    def completed(self) -> int:
        return sum(row.state not in (TrialState.PENDING, TrialState.RUNNING) for row in self.rows)


class Reporter(Protocol):
    def stage_started(self, stage: Stage, message: str = "") -> None:
        """A pipeline stage began."""

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        """The data is loaded: examples per split, and the class labels (none for causal LM)."""

    def progress(self, progress: TrainingProgress) -> None:
        """Training advanced by an optimizer step."""

    def trials(self, board: TrialBoard) -> None:
        """A search trial started, reported or ended."""

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        """Metrics of a split (validation during training; test-before / test-after at the end)."""

    def variant(self, name: str, report: VariantReport) -> None:
        """A variant was exported and measured."""

    def result(self, result: RunReport) -> None:
        """The run finished and produced `result`."""

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        """The run failed; `message` says why. `invalid_field`: the spec field that makes it impossible;
        `unavailable`: what it could not reach (trying again later may help)."""


class Reporters:
    """Sends every event to each of several reporters."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def stage_started(self, stage: Stage, message: str = "") -> None:
        for reporter in self.reporters:
            reporter.stage_started(stage, message)

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        for reporter in self.reporters:
            reporter.data(splits, labels)

    def progress(self, progress: TrainingProgress) -> None:
        for reporter in self.reporters:
            reporter.progress(progress)

    def trials(self, board: TrialBoard) -> None:
        for reporter in self.reporters:
            reporter.trials(board)

    def variant(self, name: str, report: VariantReport) -> None:
        for reporter in self.reporters:
            reporter.variant(name, report)

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        for reporter in self.reporters:
            reporter.metrics(split, values, step)

    def result(self, result: RunReport) -> None:
        for reporter in self.reporters:
            reporter.result(result)

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        for reporter in self.reporters:
            reporter.failed(message, invalid_field, unavailable)


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

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        self._write("data", splits=splits, labels=labels)

    def progress(self, progress: TrainingProgress) -> None:
        self._write("progress", **asdict(progress))

    def trials(self, board: TrialBoard) -> None:
        self._write("trials", completed=board.completed, total=board.total, rows=[asdict(row) for row in board.rows])

    def variant(self, name: str, report: VariantReport) -> None:
        self._write("variant", name=name, report=report.model_dump(mode="json", by_alias=True))

    def metrics(self, split: str, values: dict[str, float], step: int) -> None:
        self._write("metrics", split=split, values=values, step=step)

    def result(self, result: RunReport) -> None:
        self._write("result", result=result.model_dump(mode="json", by_alias=True))

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        self._write(
            "failed",
            message=message,
            invalidField=invalid_field,
            unavailable=unavailable.value if unavailable else None,
        )


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

    def data(self, splits: dict[str, int], labels: list[str]) -> None:
        pass

    def trials(self, board: TrialBoard) -> None:
        pass

    def variant(self, name: str, report: VariantReport) -> None:
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

    def result(self, result: RunReport) -> None:
        self.close()

    def failed(self, message: str, invalid_field: str | None = None, unavailable: Unavailable | None = None) -> None:
        self.close()
