"""The training loop every Ray Train worker runs: data parallel over gloo or NCCL, the model whole on
every worker (DDP) or sharded across them (FSDP2, `resources.sharding: fsdp`; see `sharding`).

Rank 0 sends progress through a relay queue to the driver's reporters, writes the
checkpoints (sharded: every rank writes its shards, rank 0 the rest), and all ranks agree
on validation metrics through an all-reduce, so early stopping stops every worker at the
same step. Workers given GPUs (one each) are
checked for CUDA by `check_worker_cuda` before Ray Train starts NCCL on them.
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from kubetune.runtime.contract import Hyperparameters, Mode, Precision, Sharding
from kubetune.runtime.data.task_ops import TaskOps, task_ops, totals_size
from kubetune.runtime.evaluate import forward_logits, run_evaluation
from kubetune.runtime.models import build_model
from kubetune.runtime.reporting.base import TrainingProgress
from torch import nn
from torch.utils.data import DistributedSampler

from .batches import PackedTrainingBatches, check_packed_attention, training_batches
from .checkpoints import TrainingPosition, TrainingState, load_trainable_state, trainable_state
from .devices import require_cuda
from .objectives import frozen_reference, training_objective
from .optim import build_optimizer, build_scheduler
from .plan import TrainingPlan
from .preemption import PreemptionWatch, checkpoint_now, preemption_metrics
from .sharding import (
    ShardedWeights,
    gathered_weights,
    gradient_sync,
    has_shards,
    load_shards,
    save_shards,
    shard_model,
)
from .sharding import snapshot as sharded_snapshot

# Seconds between progress events; every step would flood the driver on fast models.
PROGRESS_INTERVAL_S = 0.5


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def steps_per_epoch(examples: int, workers: int, batch_size: int, accumulation: int) -> tuple[int, int]:
    """(batches, optimizer steps) per epoch on each worker; the sampler pads shards to equal size."""
    per_worker = -(-examples // workers)
    batches = -(-per_worker // batch_size)
    return batches, -(-batches // accumulation)


def evaluation_points(batches: int, evaluations: int) -> set[int]:
    """Batch counts after which to validate: evenly spread, always including the epoch's end."""
    count = min(evaluations, batches)
    return {round(k * batches / count) for k in range(1, count + 1)}


def improved(value: float, best: float | None, mode: Mode, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == Mode.MAX else value < best - min_delta


def _autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == Precision.FP32:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass(frozen=True)
class SplitMetrics:
    """Metrics of one split (validation, during training) after optimizer step `step`."""

    split: str
    values: dict[str, float]
    step: int


# What rank 0 sends the driver through the relay queue.
WorkerEvent = TrainingProgress | SplitMetrics


class _Relay:
    """Progress to the driver, from rank 0 only, never failing the training over a lost event."""

    def __init__(self, queue: Any, rank: int) -> None:
        self.queue = queue if rank == 0 else None
        self.last_sent = 0.0

    def send(self, event: WorkerEvent, force: bool = False) -> None:
        now = time.monotonic()
        if self.queue is None or (not force and now - self.last_sent < PROGRESS_INTERVAL_S):
            return
        self.last_sent = now
        with contextlib.suppress(Exception):
            self.queue.put_nowait(event)


class InjectedFaultError(RuntimeError):
    """The failure `RuntimeSettings.faults.train_step` asks for: proves that a run survives a lost worker."""


def _validate(
    model: nn.Module, processor: Any, ops: TaskOps, plan: TrainingPlan, hp: Hyperparameters, rank: int, world: int
) -> dict[str, float]:
    """Metrics over the whole validation set: each rank scores a disjoint shard, then the totals add up."""
    task = plan.spec.model.task
    shard = plan.validation.shard(rank, world)
    device = next(model.parameters()).device
    size = totals_size(task, len(plan.labels), plan.spec.method.resolved_objective)
    totals = run_evaluation(
        model, processor, ops, shard, hp.resolved_max_sequence_length, hp.resolved_batch_size, device, size
    ).totals
    if plan.sharding == Sharding.FSDP:
        _match_forward_passes(model, processor, ops, plan, hp, len(shard), world, device)
    totals = totals.to(device)
    if world > 1 and dist.is_initialized():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return ops.metrics(totals.cpu())


@torch.no_grad()
def _match_forward_passes(
    model: nn.Module,
    processor: Any,
    ops: TaskOps,
    plan: TrainingPlan,
    hp: Hyperparameters,
    shard_size: int,
    world: int,
    device: torch.device,
) -> None:
    """Forward passes whose results are dropped, until this rank has run as many as the largest shard needs.

    A sharded model gathers its weights with collectives in every forward pass, so every rank must run
    the same number; validation shards may differ by an example, and so by a batch.
    """
    largest_shard = math.ceil(len(plan.validation) / world)  # rank 0's
    missing = math.ceil(largest_shard / hp.resolved_batch_size) - math.ceil(shard_size / hp.resolved_batch_size)
    if missing <= 0:
        return
    was_training = model.training
    model.eval()
    inputs = ops.encode(processor, plan.validation.subset(range(1)), hp.resolved_max_sequence_length)
    inputs = {name: value.to(device) for name, value in inputs.items()}
    for _ in range(missing):
        forward_logits(model, inputs)
    model.train(was_training)


def _batches(sampler: DistributedSampler[int], batch_size: int) -> list[list[int]]:
    indices = list(iter(sampler))
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def _report(metrics: dict[str, Any], state: TrainingState | None, shards: _Shards | None = None) -> None:
    """Every rank reports (Ray Train expects it); rank 0 passes the checkpoint, and every rank its shards."""
    if state is None and shards is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        if shards is not None:
            save_shards(Path(folder), *shards)
        if state is not None:
            state.save(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


# What a worker of a sharded run writes into a checkpoint: model, optimizer, best weights unless current.
_Shards = tuple[nn.Module, torch.optim.Optimizer, ShardedWeights | None]


def _no_sync(model: nn.Module, skip_sync: bool) -> contextlib.AbstractContextManager[Any]:
    no_sync = getattr(model, "no_sync", None)
    if skip_sync and no_sync is not None:
        context: contextlib.AbstractContextManager[Any] = no_sync()
        return context
    return gradient_sync(model, not skip_sync)  # a sharded model's switch; nothing for a DDP one


def check_worker_cuda() -> None:
    """On a Ray Train worker given a GPU: refuse the run (InvalidRunError) when torch sees no CUDA device.

    Ray Train runs this on every worker before the NCCL process group, which needs CUDA and
    would otherwise fail first, before `train_loop_per_worker` could say why.
    """
    require_cuda("a Ray Train worker")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: config holds the TrainingPlan and the progress relay."""
    plan: TrainingPlan = config["plan"]
    spec = plan.effective_spec
    hp = spec.hyperparameters
    torch.set_num_threads(plan.threads_per_worker)
    seed_everything(hp.seed)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    relay = _Relay(config.get("relay"), rank)

    settings = plan.settings.reusing_downloads()
    model, processor = build_model(spec.model, spec.method, plan.labels, hp.seed, settings)
    ops = task_ops(spec.model.task, len(plan.labels), spec.method.resolved_objective)
    frozen = frozen_reference(model, spec, plan.sharding)  # before a resumed run's weights: the base model
    if hp.resolved_gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (adapters) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    model.train()

    sharded = plan.sharding == Sharding.FSDP
    resumed = ray.train.get_checkpoint()
    state = None
    if resumed is not None:
        with resumed.as_directory() as folder:
            state = TrainingState.load(Path(folder))
        # A sharded checkpoint keeps its weights in the shards; the final one holds them whole.
        if state.weights:
            load_trainable_state(model, state.weights)
    position = state.position if state else TrainingPosition()
    if state is not None:
        position.resumed_from_step = position.step
    # An empty best in a checkpoint means its current weights were the best.
    best_weights = (state.best_weights or state.weights) if state else {}
    best_shards: ShardedWeights | None = None  # sharded: this worker's shards of the best weights

    source = training_batches(plan.train, processor, ops, hp, bool(spec.data.packing))
    batches_per_epoch, optimizer_steps = steps_per_epoch(
        source.units, world, source.units_per_batch, hp.gradient_accumulation_steps
    )
    total_steps = optimizer_steps * hp.epochs
    unwrapped = model
    if sharded:
        model = shard_model(model, ray.train.torch.get_device(), hp.resolved_precision)
    else:
        model = ray.train.torch.prepare_model(model)
    device = next(model.parameters()).device
    objective = training_objective(spec, ops, model, unwrapped, None if frozen is None else frozen.to(device))
    if isinstance(source, PackedTrainingBatches):
        check_packed_attention(model, source.packed, device)
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, hp, total_steps)
    if state is not None and state.optimizer is not None and state.scheduler is not None:
        optimizer.load_state_dict(state.optimizer)
    if state is not None and state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if sharded and resumed is not None:
        with resumed.as_directory() as folder:
            if has_shards(Path(folder)):
                # Without best weights of their own, the checkpoint's current weights are the best.
                best_shards = load_shards(Path(folder), model, optimizer) or sharded_snapshot(model)
    scaler = torch.amp.GradScaler(device.type, enabled=hp.resolved_precision == Precision.FP16)
    # The sampler only needs the length: it hands out example (or packed batch) indices.
    indices: Any = range(source.units)
    sampler: DistributedSampler[int] = DistributedSampler(
        indices, num_replicas=world, rank=rank, shuffle=True, seed=hp.seed
    )
    checkpoints = evaluation_points(batches_per_epoch, hp.evaluations_per_epoch)
    preemption = PreemptionWatch.of(plan.settings, rank, world, device, first_attempt=resumed is None)
    accumulation = hp.gradient_accumulation_steps
    loss_value = 0.0
    for epoch in range(position.epoch, hp.epochs):
        sampler.set_epoch(epoch)
        batches = _batches(sampler, source.units_per_batch)
        for batch_index, indices in enumerate(batches):
            if batch_index < position.batch:
                continue  # resumed mid-epoch: these were trained before the checkpoint
            group_start = batch_index - batch_index % accumulation
            group_size = min(accumulation, len(batches) - group_start)
            steps_now = batch_index + 1 == group_start + group_size
            started = time.perf_counter()
            inputs, examples = source.inputs(indices)
            inputs = {name: value.to(device) for name, value in inputs.items()}
            with _no_sync(model, not steps_now), _autocast(hp.resolved_precision, device):
                loss = objective.loss(model, inputs, source.forward_options) / group_size
            scaler.scale(loss).backward()  # type: ignore[no-untyped-call]
            loss_value += float(loss.detach())
            if steps_now:
                scaler.unscale_(optimizer)
                if hp.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                # Samples/s of the whole group: every worker trains as many examples as the first (packed: about).
                elapsed = position.train_seconds + time.perf_counter() - started
                relay.send(
                    TrainingProgress(
                        step=position.step,
                        total_steps=total_steps,
                        epoch=epoch + (batch_index + 1) / len(batches),
                        loss=loss_value,
                        learning_rate=float(scheduler.get_last_lr()[0]),
                        epochs=hp.epochs,
                        epoch_steps=optimizer_steps,
                        samples_per_second=world * (position.train_samples + examples) / max(elapsed, 1e-9),
                    ),
                    # The last step of each epoch always goes out: it closes the epoch's bar.
                    force=position.step % optimizer_steps == 0 or position.step == total_steps,
                )
                loss_value = 0.0
                fault = plan.settings.faults.train_step
                if fault is not None and position.step == fault and resumed is None and rank == 0:
                    raise InjectedFaultError(f"injected failure at step {fault} (KUBETUNE_FAULTS train_step)")
            position.batch = batch_index + 1
            # Throughput counts the training steps only, not validation or checkpoints.
            position.train_seconds += time.perf_counter() - started
            position.train_samples += examples
            position.epochs_done = epoch + position.batch / len(batches)
            # Told to stop (pod deleted): checkpoint this step, not only the last validation's, and stop.
            preempted = steps_now and preemption.requested(position.step)
            if preempted and position.batch not in checkpoints:
                best = (best_weights, best_shards)
                parts = checkpoint_now(model, unwrapped, optimizer, scheduler, position, rank, sharded, best)
                _report(preemption_metrics(position.best_metrics, position.step, epoch), *parts)
                preemption.stop(position.step)
            if position.batch not in checkpoints:
                continue
            metrics = _validate(model, processor, ops, plan, hp, rank, world)
            relay.send(SplitMetrics("validation", metrics, position.step), True)
            value = metrics[plan.metric.value]
            min_delta = hp.early_stopping.min_delta if hp.early_stopping else 0.0
            current = trainable_state(unwrapped) if rank == 0 and not sharded else {}
            best_now = improved(value, position.best_metrics.get(plan.metric.value), plan.mode, min_delta)
            if best_now:
                position.best_metrics, position.best_step = metrics, position.step
                position.evaluations_without_improvement = 0
                best_weights = current
                best_shards = sharded_snapshot(model) if sharded else None
            else:
                position.evaluations_without_improvement += 1
            if hp.early_stopping and position.evaluations_without_improvement >= hp.early_stopping.patience:
                position.stopped_early = True
            metrics_out = {**_prefixed(metrics), "step": position.step, "epoch": epoch}
            if sharded:
                # The shards hold weights, optimizer and an older best; rank 0 adds the schedule and position.
                state = TrainingState({}, {}, None, scheduler.state_dict(), position)
                shards = (model, optimizer, None if best_now else best_shards)
                _report(metrics_out, state if rank == 0 else None, shards)
            else:
                # When the current weights are the best, the checkpoint stores them once.
                stored_best = {} if best_weights is current else best_weights
                state = TrainingState(current, stored_best, optimizer.state_dict(), scheduler.state_dict(), position)
                _report(metrics_out, state if rank == 0 else None)
            if position.stopped_early:
                break
            if preempted:  # at a validation: its checkpoint holds this step
                preemption.stop(position.step)
        if position.stopped_early:
            break
        position.epoch, position.batch = epoch + 1, 0

    # The exported model is the one that validated best, not necessarily the last.
    if sharded:
        best_weights = gathered_weights(model, best_shards)
    final = TrainingState(best_weights, {}, None, None, position)
    _report({**_prefixed(position.best_metrics), "step": position.step, "final": True}, final if rank == 0 else None)


def _prefixed(metrics: dict[str, float]) -> dict[str, float]:
    return {f"validation_{name}": value for name, value in metrics.items()}


def iterate_events(queue: Any) -> Iterator[WorkerEvent]:
    """Drain the relay queue without blocking."""
    while not queue.empty():
        yield queue.get_nowait()
