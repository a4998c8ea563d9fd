"""Run the training loop on Ray Train workers and bring back the trained weights.

`build_trainer` is the single place a TorchTrainer is made, so a hyperparameter search
can run the very same training per trial (with its own callbacks and storage).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from .checkpoints import TrainingPosition, TrainingState
from .contract import WorkerResources
from .loop import iterate_events, train_loop_per_worker
from .plan import TrainingPlan
from .reporting import Reporter, TrainingProgress

# Share of the local CPUs the workers may take; the rest keeps Ray's own processes responsive.
LOCAL_CPU_SHARE = 0.9
RELAY_POLL_S = 0.2
# Worker failures a training run survives; each restart resumes from the newest checkpoint.
MAX_WORKER_FAILURES = 2


@dataclass(frozen=True)
class WorkerShape:
    """What each Ray Train worker asks Ray for, and how many torch threads it runs."""

    workers: int
    cpus_per_worker: float
    use_gpu: bool
    threads_per_worker: int


def worker_shape(resources: WorkerResources, cluster_cpus: float, concurrent_runs: int = 1) -> WorkerShape:
    """Fit the workers of `concurrent_runs` trainings on the cluster: fractional CPUs when it is small."""
    workers = resources.workers * concurrent_runs
    if resources.cpus_per_worker is not None:
        cpus = resources.cpus_per_worker
    else:
        cpus = min(1.0, math.floor(100 * LOCAL_CPU_SHARE * cluster_cpus / workers) / 100)
    threads = max(1, int(cluster_cpus // workers) if resources.cpus_per_worker is None else int(cpus))
    return WorkerShape(resources.workers, max(cpus, 0.01), resources.gpus_per_worker > 0, threads)


def build_trainer(
    plan: TrainingPlan,
    shape: WorkerShape,
    storage_path: str,
    name: str,
    relay: Any = None,
    callbacks: Sequence[Any] = (),
    storage_filesystem: Any = None,
) -> TorchTrainer:
    resources: dict[str, float] = {"CPU": shape.cpus_per_worker}
    if shape.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        # Each worker runs torch with the threads its share of the CPUs allows (trials too).
        train_loop_config={"plan": replace(plan, threads_per_worker=shape.threads_per_worker), "relay": relay},
        scaling_config=ray.train.ScalingConfig(
            num_workers=shape.workers, use_gpu=shape.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=plan.spec.output.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=MAX_WORKER_FAILURES),
            callbacks=list(callbacks),
        ),
    )


@dataclass(frozen=True)
class TrainingOutcome:
    """The best weights and how training went."""

    state: TrainingState

    @property
    def position(self) -> TrainingPosition:
        return self.state.position


def _forward(event: dict[str, Any], reporter: Reporter) -> None:
    if event.get("kind") == "progress":
        reporter.progress(
            TrainingProgress(
                step=event["step"],
                total_steps=event["total_steps"],
                epoch=event["epoch"],
                loss=event["loss"],
                learning_rate=event["learning_rate"],
                epochs=event.get("epochs", 1),
                epoch_steps=event.get("epoch_steps", 0),
                samples_per_second=event.get("samples_per_second"),
            )
        )
    elif event.get("kind") == "metrics":
        reporter.metrics(event["split"], event["values"], event["step"])


class _RelayPump:
    """Moves worker events from the relay queue to the reporter while `fit` blocks the main thread."""

    def __init__(self, queue: Any, reporter: Reporter) -> None:
        self.queue, self.reporter = queue, reporter
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kubetune-progress", daemon=True)

    def _run(self) -> None:
        while not self.done.wait(RELAY_POLL_S):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        for event in iterate_events(self.queue):
            _forward(event, self.reporter)

    def __enter__(self) -> _RelayPump:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def cluster_cpus() -> float:
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return float(resources.get("CPU", os.cpu_count() or 1))


def train(
    plan: TrainingPlan,
    resources: WorkerResources,
    storage_path: Path | str,
    name: str,
    reporter: Reporter,
    storage_filesystem: Any = None,
) -> TrainingOutcome:
    """Train on Ray Train workers; checkpoints go to `storage_path/name`. Ray must be initialised."""
    from ray.util.queue import Queue

    shape = worker_shape(resources, cluster_cpus())
    relay = Queue(actor_options={"num_cpus": 0})
    try:
        with _RelayPump(relay, reporter):
            trainer = build_trainer(plan, shape, str(storage_path), name, relay, storage_filesystem=storage_filesystem)
            result = trainer.fit()
    finally:
        ray.kill(relay.actor)  # type: ignore[arg-type]
    # Train V2 raises from fit(); a result that still carries an error is raised here the same way.
    error: BaseException | None = getattr(result, "error", None)
    if error is not None:
        raise error
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = TrainingState.load(Path(folder))
    return TrainingOutcome(state)
