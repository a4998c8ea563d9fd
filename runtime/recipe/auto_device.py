"""The device `auto` values are resolved for: its kind, its GPU type when known, and its memory budget.

Read where the driver runs: its own CUDA GPU when it has one (a local run), else the GPU type Ray
labels the cluster's GPU nodes with, else (a CPU run) the host's available memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.runtime.contract import WorkerResources
from kubetune.runtime.io.errors import InvalidRunError
from kubetune.runtime.planner import GPU_TYPES, DeviceKind, GpuType

# Ray labels nodes with "accelerator_type:<type>" resources (e.g. accelerator_type:H100).
RAY_ACCELERATOR_PREFIX = "accelerator_type:"
# A GPU the planner's table names must have about the table's memory (the 40 and 80 GB A100 differ).
MEMORY_TOLERANCE = 0.1


@dataclass(frozen=True)
class AutoDevice:
    """Where training runs, as `auto` sees it."""

    kind: DeviceKind
    budget_bytes: int  # memory one training process may use
    gpu: GpuType | None = None  # the planner's GPU type; None on CPUs or for a GPU the table lacks
    name: str = "CPU"  # what the reasons call it
    bf16: bool = False  # whether an unknown GPU has bf16 math (known ones: the table says)


def _family(name: str) -> str:
    return name.split("-")[0].lower()


def _variant(name: str) -> str:
    return name.partition("-")[2].lower()


def table_gpu(device_name: str, memory_bytes: int | None) -> GpuType | None:
    """The planner's GPU type for a device name as torch or Ray gives it ("NVIDIA H100 80GB HBM3", "H100").

    Of a family's variants, the one the name spells (PCIe, 40GB) or that the memory matches; a PCIe card
    names itself so, so an H100 that does not is the SXM one.
    """
    words = set(device_name.lower().replace("-", " ").split())
    named = [gpu for gpu in GPU_TYPES if _family(gpu.name) in words]
    if memory_bytes is not None:
        named = [gpu for gpu in named if abs(gpu.memory_bytes - memory_bytes) <= MEMORY_TOLERANCE * gpu.memory_bytes]
    if not named:
        return None
    return max(named, key=lambda gpu: (_variant(gpu.name) in words, _variant(gpu.name) != "pcie"))


def _local_gpu() -> AutoDevice:
    import torch

    free, total = torch.cuda.mem_get_info()
    name = torch.cuda.get_device_name()
    gpu = table_gpu(name, total)
    budget = min(free, gpu.memory_bytes) if gpu is not None else free
    return AutoDevice(DeviceKind.CUDA, budget, gpu, name, bf16=torch.cuda.is_bf16_supported())


def _cluster_gpu() -> AutoDevice:
    import ray

    types = sorted(
        key.removeprefix(RAY_ACCELERATOR_PREFIX)
        for key in ray.cluster_resources()  # type: ignore[no-untyped-call]
        if key.startswith(RAY_ACCELERATOR_PREFIX)
    )
    for name in types:
        gpu = table_gpu(name, None)
        if gpu is not None:
            return AutoDevice(DeviceKind.CUDA, gpu.memory_bytes, gpu, gpu.name)
    raise InvalidRunError(
        "hyperparameters",
        "auto values need the GPU's type, and the cluster's GPU nodes name none the planner knows "
        f"(Ray accelerator types: {', '.join(types) or 'none'}); set the auto fields to values",
    )


def auto_device(resources: WorkerResources, processes: int) -> AutoDevice:
    """The device each of `processes` training processes gets, with its memory budget."""
    if resources.gpus_per_worker > 0:
        import torch

        return _local_gpu() if torch.cuda.is_available() else _cluster_gpu()
    import psutil

    return AutoDevice(DeviceKind.CPU, psutil.virtual_memory().available // max(1, processes))
