"""The training planner: memory per device, speed and GPU-hours of a run, from config.json alone.

Pure functions of typed values (no torch, no I/O, no clock), so the operator, the CLI and the
runtime can all call it. Entry points: `shape_from_config` reads a parsed config.json,
`plan` estimates a run.
"""

from kubetune.runtime.contract import Sharding
from kubetune.runtime.contract.decisions import Decision

from .auto import (
    DEFAULT_QUANTILE,
    BatchResolution,
    NothingFitsError,
    quantile,
    resolve_batch,
    resolve_precision,
    resolve_sequence_length,
    total_bytes,
)
from .gpus import GPU_TYPES, GpuType, gpu_type
from .inputs import DeviceKind, PlanInput, Topology
from .parameters import Parameters, lora_targets, method_parameters
from .plan import GpuEstimate, MemoryPlan, Plan, plan
from .shape import ConfigError, Family, ModelShape, shape_from_config
from .suggest import Suggestion, does_not_fit_message, suggestions
from .throughput import DEFAULT_MFU

__all__ = [
    "DEFAULT_MFU",
    "DEFAULT_QUANTILE",
    "GPU_TYPES",
    "BatchResolution",
    "ConfigError",
    "Decision",
    "DeviceKind",
    "Family",
    "GpuEstimate",
    "GpuType",
    "MemoryPlan",
    "ModelShape",
    "NothingFitsError",
    "Parameters",
    "Plan",
    "PlanInput",
    "Sharding",
    "Suggestion",
    "Topology",
    "does_not_fit_message",
    "gpu_type",
    "lora_targets",
    "method_parameters",
    "plan",
    "quantile",
    "resolve_batch",
    "resolve_precision",
    "resolve_sequence_length",
    "shape_from_config",
    "suggestions",
    "total_bytes",
]
