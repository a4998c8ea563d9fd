"""Run the training loop on Ray Train workers and bring back the trained weights.

`build_trainer` is the single place a TorchTrainer is made, so a hyperparameter search
can run the very same training per trial (with its own callbacks and storage).

A Ray Train worker is one training process. On GPUs there is one per GPU (one DDP
process per GPU), so `workers` pods with `gpusPerWorker` GPUs each run
`workers * gpusPerWorker` Ray Train workers and every GPU of a pod trains; on CPU there
is one per worker.
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
from kubetune.runtime.contract import WorkerResources
from kubetune.runtime.io.errors import invalid_run_cause
from kubetune.runtime.reporting.base import Reporter, TrainingProgress
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.torch.config import _TorchBackend

from .checkpoints import TrainingPosition, TrainingState
from .loop import WorkerEvent, check_worker_cuda, iterate_events, train_loop_per_worker
from .plan import TrainingPlan
from .preemption import install_signal_handler, marked_busy

# Share of the local CPUs the workers may take; the rest keeps Ray's own processes responsive.
LOCAL_CPU_SHARE = 0.9
RELAY_POLL_S = 0.2
# Worker failures a training run survives; each restart resumes from the newest checkpoint. A preemption
# (`preemption.PreemptedError`) counts as one: Ray Train cannot tell an error its workers raise from a failure.
MAX_WORKER_FAILURES = 2


@dataclass(frozen=True)
class WorkerShape:
    """What each Ray Train worker (one training process) asks Ray for, and how many torch threads it runs."""

    workers: int  # Ray Train workers of one training: see `training_processes`
    cpus_per_worker: float
    use_gpu: bool  # one GPU per Ray Train worker
    threads_per_worker: int


def training_processes(resources: WorkerResources) -> int:
    """Ray Train workers of a run: one per GPU of every worker pod, or one per worker on CPU."""
    return resources.workers * max(1, resources.gpus_per_worker)


def worker_shape(resources: WorkerResources, cluster_cpus: float, concurrent_runs: int = 1) -> WorkerShape:
    """Fit the workers of `concurrent_runs` trainings on the cluster: fractional CPUs when it is small.

    A pod's given CPUs are shared by the processes of its GPUs (Ray counts CPUs in steps of 1/10000).
    """
    processes = training_processes(resources)
    total = processes * concurrent_runs
    if resources.cpus_per_worker is not None:
        cpus = resources.cpus_per_worker
        if resources.gpus_per_worker > 1:
            # Rounded down, so the processes together never ask for more than the pod has.
            cpus = math.floor(10000 * cpus / resources.gpus_per_worker + 1e-6) / 10000
        threads = max(1, int(cpus))
    else:
        cpus = min(1.0, math.floor(100 * LOCAL_CPU_SHARE * cluster_cpus / total) / 100)
        threads = max(1, int(cluster_cpus // total))
    return WorkerShape(processes, max(cpus, 0.01), resources.gpus_per_worker > 0, threads)


class _PreemptibleBackend(_TorchBackend):
    """Ray Train's torch backend, with every worker taking SIGTERM as a notice to checkpoint and stop.

    Ray Train runs the training function in a thread of the worker actor; `execute` runs on
    the actor's main thread, the only one that may install a signal handler.
    """

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:  # type: ignore[override]
        worker_group.execute(install_signal_handler)
        super().on_start(worker_group, backend_config)


class _CudaCheckedBackend(_PreemptibleBackend):
    """Also checks every worker for CUDA before NCCL's process group.

    NCCL cannot start without CUDA, so Ray Train would fail there, before the training loop
    runs, with an error that names no spec field. The check raises InvalidRunError instead,
    during Ray Train's setup: not a worker failure, so FailureConfig does not retry it.
    """

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:  # type: ignore[override]
        worker_group.execute(check_worker_cuda)
        super().on_start(worker_group, backend_config)


class _PreemptibleTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _PreemptibleBackend


class _CudaCheckedTorchConfig(TorchConfig):
    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _CudaCheckedBackend


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
        marked_busy(train_loop_per_worker),
        torch_config=_CudaCheckedTorchConfig() if shape.use_gpu else _PreemptibleTorchConfig(),
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


def _forward(event: WorkerEvent, reporter: Reporter) -> None:
    if isinstance(event, TrainingProgress):
        reporter.progress(event)
    else:
        reporter.metrics(event.split, event.values, event.step)


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


def placement_groups() -> set[str]:
    from ray.util.placement_group import placement_group_table

    return set(placement_group_table())


def remove_leftover_placement_groups(before: set[str]) -> None:
    """Free what trainings that ended abnormally left reserved (groups this job made since `before`).

    A TorchTrainer whose controller dies or fails mid-run leaves its workers' placement group to
    Ray Train's own cleaner, which acts only where Ray serves its state API (the dashboard) and
    only after it has seen the controller dead: until then the group would stay reserved and
    starve every later training of this Ray.
    """
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    for group_id, info in placement_group_table().items():
        # A placement group id ends with the id of the job that created it.
        if group_id in before or not group_id.endswith(job) or info.get("state") == "REMOVED":
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


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
    before = placement_groups()
    try:
        with _RelayPump(relay, reporter):
            trainer = build_trainer(plan, shape, str(storage_path), name, relay, storage_filesystem=storage_filesystem)
            result = trainer.fit()
    except Exception as failure:
        # An invalid run found on a worker (no CUDA there) exits as invalid, not as a crash.
        invalid = invalid_run_cause(failure)
        if invalid is None:
            raise
        raise invalid from None
    finally:
        ray.kill(relay.actor)  # type: ignore[arg-type]
        remove_leftover_placement_groups(before)
    # Train V2 raises from fit(); a result that still carries an error is raised here the same way.
    error: BaseException | None = getattr(result, "error", None)
    if error is not None:
        raise invalid_run_cause(error) or error
    if result.checkpoint is None:
        raise RuntimeError("training reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = TrainingState.load(Path(folder))
    return TrainingOutcome(state)
