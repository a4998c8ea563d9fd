"""`kubetune plan FILE.yaml`: what a FineTuneJob needs before it runs, from the model's config.json.

Memory per device with its breakdown, whether it fits each GPU type, step time, tokens/s and
GPU-hours, the values the planner would choose for `auto` fields and why, and, for a job that
does not fit its GPU, the smallest changes that would.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kubetune.operator.api.finetunejob import FineTuneJob
from kubetune.runtime.contract import WorkerResources
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.data.plan_sources import data_is_local, model_config, training_data
from kubetune.runtime.io.errors import UnavailableError
from kubetune.runtime.planner import DEFAULT_QUANTILE, GPU_TYPES, GpuType, gpu_type
from kubetune.runtime.planner.report import PlanReport, SequenceLengths, build_report, model_shape
from kubetune.runtime.reporting.plan_console import print_report
from rich.console import Console
from rich.markup import escape

from .run import read_local_run, run_spec

__all__ = ["PlanFlags", "PlanReport", "SequenceLengths", "plan_command", "plan_job", "print_report"]

EXIT_FITS, EXIT_DOES_NOT_FIT, EXIT_INVALID = 0, 1, 2


@dataclass(frozen=True)
class PlanFlags:
    gpu: str | None = None
    data: bool | None = None  # None: read it when it is local
    json: bool = False
    quantile: float = DEFAULT_QUANTILE


def _chosen_gpu(job: FineTuneJob, flags: PlanFlags, notes: list[str]) -> GpuType | None:
    if flags.gpu is not None:
        return gpu_type(flags.gpu)  # ValueError lists the known names
    named = job.spec.resources.gpu_type
    if named is None:
        return None
    try:
        return gpu_type(named)  # a planner name or a gpu.product label value
    except ValueError:
        notes.append(
            f"spec.resources.gpuType {named} is not in the planner's table: name one with --gpu "
            f"({', '.join(g.name for g in GPU_TYPES)})"
        )
        return None


def plan_job(path: Path, flags: PlanFlags) -> PlanReport:
    """The plan of the file's FineTuneJob; SpecError names what cannot be used."""
    job = read_local_run(path).job
    spec = run_spec(job, None)
    notes: list[str] = []
    gpu = _chosen_gpu(job, flags, notes)
    config = model_config(spec.model)
    read_data = data_is_local(spec) if flags.data is None else flags.data
    if flags.data is None and not read_data:
        notes.append(f"spec.data.train {spec.data.train} is not local: token lengths and GPU-hours unknown")
    shape = model_shape(config)
    data = training_data(spec, shape.max_positions) if read_data else None
    resources = job.spec.resources
    workers = WorkerResources(
        workers=resources.workers, gpus_per_worker=resources.gpus_per_worker, sharding=resources.sharding
    )
    return build_report(
        spec,
        workers,
        job=str(job.metadata["name"]),
        gpu=gpu,
        config=config,
        data=data,
        sequence_quantile=flags.quantile,
        notes=notes,
    )


def plan_command(path: Path, flags: PlanFlags, console: Console, errors: Console) -> int:
    if not 0 < flags.quantile <= 1:
        errors.print("[red]error:[/red] --quantile must be in (0, 1]")
        return EXIT_INVALID
    try:
        report = plan_job(path, flags)
    except SpecError as error:
        for problem in error.problems:
            errors.print(f"[red]✗[/red] {escape(problem)}", soft_wrap=True)
        return EXIT_INVALID
    except UnavailableError as error:  # a model hub or object store that does not answer now
        errors.print(f"[red]✗[/red] {escape(str(error))}", soft_wrap=True)
        return EXIT_INVALID
    except ValueError as error:  # an unknown --gpu, a planner input out of range
        errors.print(f"[red]✗[/red] {escape(str(error))}", soft_wrap=True)
        return EXIT_INVALID
    if flags.json:
        sys.stdout.write(report.model_dump_json(by_alias=True, indent=2) + "\n")
    else:
        print_report(report, console)
    return EXIT_DOES_NOT_FIT if report.fits is False else EXIT_FITS
