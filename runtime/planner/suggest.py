"""What would make a plan that does not fit its GPU fit: changes to the spec, each verified by planning again.

Candidates, smallest change first: gradient checkpointing, a smaller batch, a shorter sequence,
an adapter method (lora, then qlora), FSDP over more GPUs per worker or more workers, FSDP with
checkpointing where neither alone is enough, and the smallest larger GPU type of the table.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import replace

from kubetune.runtime.contract import ContractModel, Method, MethodType, Sharding
from pydantic import Field

from .auto import CHECKPOINTING_FIELD, SEQUENCE_FIELD, SEQUENCE_MULTIPLE, fits, largest_batch, total_bytes
from .gpus import GIB, GPU_TYPES, GpuType
from .inputs import DeviceKind, PlanInput, Topology

METHOD_FIELD = "spec.method.type"
BATCH_FIELD = "spec.hyperparameters.batchSize"
GPUS_FIELD = "spec.resources.gpusPerWorker"
WORKERS_FIELD = "spec.resources.workers"
SHARDING_FIELD = "spec.resources.sharding"
GPU_TYPE_FIELD = "spec.resources.gpuType"
# Device counts FSDP is tried with: a node's usual GPU counts.
SHARD_COUNTS = (2, 4, 8)
# How many suggestions a message names.
MESSAGE_SUGGESTIONS = 3


class Suggestion(ContractModel):
    """A change to the spec that makes the plan fit, verified by planning again."""

    changes: dict[str, bool | int | str] = Field(
        description="The fields to set (camelCase paths such as spec.method.type) and their values."
    )
    gpu: str = Field(description="The GPU type the changed plan fits on.")
    total_bytes: int = Field(ge=0, description="What one device must hold with the change.")

    @property
    def text(self) -> str:
        """`method qlora`, `gpusPerWorker 2 with sharding fsdp`: the fields' names and values."""
        return " with ".join(f"{_name(path)} {_wire(value)}" for path, value in self.changes.items())


def _name(path: str) -> str:
    """A field's last name; `method` for spec.method.type."""
    parts = path.split(".")
    return parts[-2] if parts[-1] == "type" and len(parts) > 1 else parts[-1]


def _wire(value: bool | int | str) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


# (what kind of change, only its smallest fitting one suggested; the fields set; the changed input)
Candidate = tuple[str, dict[str, bool | int | str], PlanInput]


def _shorter_sequence(inp: PlanInput, budget: int) -> int:
    """The longest multiple of 8 below the current length that fits (0 when none does)."""
    # In units of 8: the first multiple of 8 at or above the current length does not fit, as the current does not.
    low, high = 0, math.ceil(inp.sequence_length / SEQUENCE_MULTIPLE)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(replace(inp, sequence_length=middle * SEQUENCE_MULTIPLE), budget):
            low = middle
        else:
            high = middle
    return low * SEQUENCE_MULTIPLE


def _candidates(inp: PlanInput, gpu: GpuType) -> Iterator[Candidate]:
    budget = gpu.memory_bytes
    if not inp.gradient_checkpointing and inp.method.type != MethodType.QLORA:
        yield "checkpointing", {CHECKPOINTING_FIELD: True}, replace(inp, gradient_checkpointing=True)
    if inp.batch_size > 1:
        batch = largest_batch(inp, budget, cap=inp.batch_size - 1)
        if batch:
            yield "batch", {BATCH_FIELD: batch}, replace(inp, batch_size=batch)
    if not inp.shape.patches and inp.sequence_length > SEQUENCE_MULTIPLE:
        length = _shorter_sequence(inp, budget)
        if length:
            yield "sequence", {SEQUENCE_FIELD: length}, replace(inp, sequence_length=length)
    methods = [MethodType.LORA] if inp.method.type in (MethodType.FULL, MethodType.FREEZE) else []
    if inp.device == DeviceKind.CUDA and inp.method.type != MethodType.QLORA:
        methods.append(MethodType.QLORA)  # 4-bit weights need CUDA
    for method in methods:
        changed = inp.method.model_copy(update={"type": method})
        yield (
            method.value,
            {METHOD_FIELD: method.value},
            replace(inp, method=Method.model_validate(changed.model_dump())),
        )
    topology = inp.topology
    for count in SHARD_COUNTS:
        if count > topology.gpus_per_worker:
            sharded = Topology(topology.workers, count, Sharding.FSDP)
            yield "gpus", {GPUS_FIELD: count, SHARDING_FIELD: Sharding.FSDP.value}, replace(inp, topology=sharded)
    for count in SHARD_COUNTS:
        if count > topology.workers:
            sharded = Topology(count, topology.gpus_per_worker, Sharding.FSDP)
            yield "workers", {WORKERS_FIELD: count, SHARDING_FIELD: Sharding.FSDP.value}, replace(inp, topology=sharded)
    # Sharding and checkpointing together, where neither alone is enough.
    if not inp.gradient_checkpointing and inp.method.type != MethodType.QLORA:
        for count in SHARD_COUNTS:
            if count > topology.gpus_per_worker:
                sharded = Topology(topology.workers, count, Sharding.FSDP)
                changes: dict[str, bool | int | str] = {
                    GPUS_FIELD: count,
                    SHARDING_FIELD: Sharding.FSDP.value,
                    CHECKPOINTING_FIELD: True,
                }
                yield "gpus+checkpointing", changes, replace(inp, topology=sharded, gradient_checkpointing=True)


def suggestions(inp: PlanInput, gpu: GpuType, gpus: Sequence[GpuType] = GPU_TYPES) -> list[Suggestion]:
    """The changes that make `inp` fit on `gpu`, smallest first (the fewest GPUs of each kind of sharding),
    then the smallest larger GPU it fits on."""
    found = []
    kinds: set[str] = set()
    for kind, changes, changed in _candidates(inp, gpu):
        if kind in kinds or any(part in kinds for part in kind.split("+")):
            continue  # a smaller change of this kind (or a part of it alone) already fits
        planned = total_bytes(changed)
        if planned <= gpu.memory_bytes:
            kinds.add(kind)
            found.append(Suggestion(changes=changes, gpu=gpu.name, total_bytes=planned))
    needed = total_bytes(inp)
    larger = sorted(
        (other for other in gpus if other.memory_bytes > gpu.memory_bytes and other.memory_bytes >= needed),
        key=lambda other: other.memory_bytes,
    )
    for other in larger:
        if other.peak_tflops(inp.precision) is not None:  # bf16 needs Ampere or later
            found.append(Suggestion(changes={GPU_TYPE_FIELD: other.name}, gpu=other.name, total_bytes=needed))
            break
    return found


def _article(name: str) -> str:
    """`an L4`, `a T4`: the article as the name's first letter is spoken."""
    return "an" if name[:1].upper() in set("AEFHILMNORSX") else "a"


def does_not_fit_message(inp: PlanInput, gpu: GpuType, found: Sequence[Suggestion]) -> str:
    """`needs 38.2 GiB per GPU, an L4 has 24: fits with method qlora, or gpusPerWorker 2 with sharding fsdp`."""
    message = f"needs {total_bytes(inp) / GIB:.1f} GiB per GPU, {_article(gpu.name)} {gpu.name} has {gpu.memory_gib:g}"
    if not found:
        return message + ": no single change of method, sharding, batch, sequence length or GPU type makes it fit"
    return message + ": fits with " + ", or ".join(s.text for s in found[:MESSAGE_SUGGESTIONS])
