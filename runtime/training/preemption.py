"""Preemption-safe checkpoints: a notice to stop, agreed by every rank at an optimizer step.

A training pod that Kubernetes deletes (node drain, spot reclaim, Kueue preemption) gets its
grace period to save its work. Two notices reach a Ray Train worker:

- SIGTERM to the worker process. Ray's own handler would end the process at once, mid-step;
  `install_signal_handler` replaces it (on the worker actor's main thread, where Python
  signal handlers live: Ray Train runs the training function in another thread) with one
  that only records the notice. A second SIGTERM ends the process as before.
- A file the pod's preStop hook creates (`RuntimeSettings.preemption_notice`). The kubelet
  signals only a container's PID 1, the shell that runs `ray start --block`, and that shell
  ignores SIGTERM: Ray's processes never see it. The hook runs first and the file tells them.

Only the ranks on the leaving pod see a notice, yet every rank must write its part of the
checkpoint (a sharded run's shards) and stop with the others: `PreemptionWatch.requested`
is a collective, a one-number all-reduce each optimizer step, so all ranks agree.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from kubetune.runtime.io.settings import RuntimeSettings
from torch import nn

from .checkpoints import TrainingPosition, TrainingState, trainable_state
from .sharding import ShardedWeights

NOTICE_SIGNAL = signal.SIGTERM
# How long a worker that signals itself waits for its handler to record the notice.
SIGNAL_WAIT_S = 10.0
_notice = threading.Event()  # set by the signal handler: this process was asked to stop


# A process that works for the run (a training worker, the driver) marks itself busy beside the notice file,
# as `<notice>.<pid>.busy`: the pod's preStop hook waits for busy processes only, so an idle pod (the run
# is over) stops at once instead of waiting out the grace period.
BUSY_SUFFIX = ".busy"


def busy_marker(notice_file: Path, pid: int) -> Path:
    return notice_file.with_name(f"{notice_file.name}.{pid}{BUSY_SUFFIX}")


@contextlib.contextmanager
def busy(notice_file: Path | None) -> Iterator[None]:
    """Mark this process busy for the pod's preStop hook while the block runs (nothing without a notice file)."""
    if notice_file is None:
        yield
        return
    marker = busy_marker(notice_file, os.getpid())
    with contextlib.suppress(OSError):  # a pod without a writable /tmp only loses the early stop
        marker.touch()
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def marked_busy(function: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    """A Ray Train worker function that marks its worker busy while it trains."""

    def run(config: dict[str, Any]) -> None:
        with busy(config["plan"].settings.preemption_notice):
            function(config)

    run.__name__ = function.__name__
    return run


class PreemptedError(RuntimeError):
    """Raised by every rank after its preemption checkpoint: Ray Train restarts the run from that checkpoint."""


def install_signal_handler() -> bool:
    """Record SIGTERM as a preemption notice instead of ending the process; False off the main thread.

    Idempotent: a restarted worker group may run it again in a process that already has it.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.getsignal(NOTICE_SIGNAL)
    if getattr(previous, "_kubetune_preemption", False):
        return True

    def on_notice(signum: int, frame: FrameType | None) -> None:
        if not _notice.is_set():
            _notice.set()
            return
        # A second notice: whoever sends it will not wait for a checkpoint.
        signal.signal(NOTICE_SIGNAL, previous)
        if callable(previous):
            previous(signum, frame)
        else:
            signal.raise_signal(signum)

    on_notice._kubetune_preemption = True  # type: ignore[attr-defined]
    signal.signal(NOTICE_SIGNAL, on_notice)
    return True


def notice_received(notice_file: Path | None) -> bool:
    """Whether this process was told to stop: by the signal, or by the notice file."""
    return _notice.is_set() or (notice_file is not None and notice_file.exists())


def clear_notice() -> None:
    """Forget a signal received (for tests: a real notice ends the process)."""
    _notice.clear()


class PreemptionWatch:
    """Asks, at each optimizer step, whether any rank has a preemption notice; every rank must ask.

    `signal_at_step`: this worker sends itself SIGTERM after that step (`faults.preempt_step`).
    """

    def __init__(
        self, notice_file: Path | None, world: int, device: torch.device, signal_at_step: int | None = None
    ) -> None:
        self.notice_file, self.world, self.device = notice_file, world, device
        self.signal_at_step = signal_at_step

    @classmethod
    def of(
        cls, settings: RuntimeSettings, rank: int, world: int, device: torch.device, first_attempt: bool
    ) -> PreemptionWatch:
        """A worker's watch: the last rank of a first attempt signals itself where `faults.preempt_step` says."""
        fault = settings.faults.preempt_step if first_attempt and rank == world - 1 else None
        return cls(settings.preemption_notice, world, device, fault)

    def requested(self, step: int) -> bool:
        if step == self.signal_at_step:
            _signal_self()
        local = notice_received(self.notice_file)
        if self.world == 1 or not dist.is_initialized():
            return local
        # The process group's device: NCCL reduces on the GPU, gloo on the CPU.
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self, step: int) -> NoReturn:
        """End this worker after its checkpoint report, once every rank has made its own.

        Ray Train records a checkpoint when every rank's report of it has arrived, and a rank's
        error ends the attempt: without the barrier, a rank without files to write (DDP's ranks
        but the first) could fail before the first rank's report of the checkpoint is out.
        """
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
        raise PreemptedError(f"preempted after step {step}: resume from its checkpoint")


def _signal_self() -> None:
    """SIGTERM to this process, as the kubelet or a test would send it; returns once the handler has run.

    Python runs signal handlers on the main thread, between its bytecodes: soon, not at once.
    """
    os.kill(os.getpid(), NOTICE_SIGNAL)
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while not _notice.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)


def preemption_metrics(best: dict[str, float], step: int, epoch: int) -> dict[str, Any]:
    """What a preemption checkpoint reports: the best validation so far (as the final report), marked."""
    return {
        **{f"validation_{name}": value for name, value in best.items()},
        "step": step,
        "epoch": epoch,
        "preempted": True,
    }


# What a worker of a sharded run writes into a checkpoint: model, optimizer, best weights unless current.
Shards = tuple[nn.Module, torch.optim.Optimizer, ShardedWeights | None]


def checkpoint_now(
    model: nn.Module,
    unwrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: TrainingPosition,
    rank: int,
    sharded: bool,
    best: tuple[dict[str, torch.Tensor], ShardedWeights | None],
) -> tuple[TrainingState | None, Shards | None]:
    """This rank's part of a checkpoint of the current weights between validations, as the loop's `_report`
    takes it: as a validation's checkpoint, but the best weights are never the current ones.

    `best` holds the best weights so far (DDP, rank 0) or this rank's shards of them (sharded); empty or
    None when none validated yet: a resumed run then counts the checkpoint's weights as the best.
    """
    best_weights, best_shards = best
    if sharded:
        state = TrainingState({}, {}, None, scheduler.state_dict(), position)
        return (state if rank == 0 else None), (model, optimizer, best_shards)
    if rank != 0:
        return None, None
    weights = trainable_state(unwrapped)
    return TrainingState(weights, best_weights, optimizer.state_dict(), scheduler.state_dict(), position), None
