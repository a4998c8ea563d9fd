"""The training planner: memory per device, speed and GPU-hours of a run, from config.json alone.

Pure functions of typed values (no torch, no I/O, no clock), so the operator, the CLI and the
runtime can all call it. Entry points: `shape_from_config` reads a parsed config.json,
`plan` estimates a run.
"""

from .gpus import GPU_TYPES, GpuType, gpu_type
from .inputs import DeviceKind, PlanInput, Sharding, Topology
from .parameters import Parameters, lora_targets, method_parameters
from .plan import GpuEstimate, MemoryPlan, Plan, plan
from .shape import ConfigError, Family, ModelShape, shape_from_config
from .throughput import DEFAULT_MFU

__all__ = [
    "DEFAULT_MFU",
    "GPU_TYPES",
    "ConfigError",
    "DeviceKind",
    "Family",
    "GpuEstimate",
    "GpuType",
    "MemoryPlan",
    "ModelShape",
    "Parameters",
    "Plan",
    "PlanInput",
    "Sharding",
    "Topology",
    "gpu_type",
    "lora_targets",
    "method_parameters",
    "plan",
    "shape_from_config",
]
