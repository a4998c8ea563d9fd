"""`python -m kubetune.runtime.recipe.plan --config run.json [--output FILE]`: plan a GPU run on a CPU.

On a cluster a CPU-only Job runs this before the run's RayJob is created. It reads the run
config, the model's config.json (never its weights) and, when maxSequenceLength is auto, the
training data's token lengths; prints the plan's tables (for `kubectl logs`); and writes the
RunPlan as camelCase JSON under `plan.json` in the run's report ConfigMap (or to --output).

Exit status: 0 when the RunPlan was written, whether the run fits or not, and also when the spec
cannot be planned (the RunPlan then names the field in invalidField); 1 when something the plan
needs cannot be reached now (a model hub, object storage, the API server), for the Job to retry;
2 for a run config or an option that cannot be used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kubetune.runtime.contract import AUTO, RunConfig, Task
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.plan import PLAN_KEY, RunPlan
from kubetune.runtime.data.plan_sources import model_config, training_data
from kubetune.runtime.io.errors import UnavailableError
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.planner import DEFAULT_QUANTILE, GPU_TYPES, GpuType, gpu_type
from kubetune.runtime.planner.report import PlanReport, build_report, model_shape, run_plan
from kubetune.runtime.reporting.plan_console import print_report
from rich.console import Console

from .finetune import entry_config

EXIT_WRITTEN, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
# Attempts to write the plan when the API server does not answer or is busy; then the Job retries.
WRITE_ATTEMPTS = 3
WRITE_RETRY_WAIT_S = 1.0
# The leading field path of a problem (`model.uri: ...`, `data.format: ...`); a URI or path is none.
_FIELD_PATH = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:\.[A-Za-z][A-Za-z0-9]*|\[\d+\])*(?=: | )")
# Columns of the tables in a log (`kubectl logs`), where rich would otherwise assume 80 and wrap the reasons.
LOG_WIDTH = 120
# What a problem that names no spec field is about: the data (its reader names the file instead).
DATA_FIELD = "data.train"


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune.runtime.recipe.plan", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="run.json: a RunConfig or a bare RunSpec (default: $KUBETUNE_RUN_CONFIG)"
    )
    parser.add_argument(
        "--output", type=Path, help="write the RunPlan JSON to this file instead of the run's report ConfigMap"
    )
    return parser.parse_args(argv)


def _judged_gpu(named: str | None, notes: list[str]) -> GpuType | None:
    """The planner's GPU type of resources.gpuType (a planner name or a gpu.product label value)."""
    if named is None:
        notes.append("resources.gpuType is not set: the run is not judged against a GPU's memory")
        return None
    try:
        return gpu_type(named)
    except ValueError:
        known = ", ".join(gpu.name for gpu in GPU_TYPES)
        notes.append(f"resources.gpuType {named} is not in the planner's table ({known}): the run is not judged")
        return None


def _reads_data(config: RunConfig) -> bool:
    """Token lengths are read only for what needs them: an auto maxSequenceLength (images have none)."""
    spec = config.spec
    return spec.hyperparameters.max_sequence_length == AUTO and spec.model.task != Task.IMAGE_CLASSIFICATION


def plan_run(config: RunConfig, settings: RuntimeSettings) -> PlanReport:
    """The plan of the run on its resources.gpuType; SpecError names what cannot be used, UnavailableError
    what cannot be reached now."""
    notes: list[str] = []
    gpu = _judged_gpu(config.resources.gpu_type, notes)
    spec = config.spec
    parsed = model_config(spec.model, settings)
    data = training_data(spec, model_shape(parsed).max_positions, settings) if _reads_data(config) else None
    return build_report(
        spec,
        config.resources,
        job=config.run.job_name or config.run.run_name or "run",
        gpu=gpu,
        config=parsed,
        data=data,
        sequence_quantile=DEFAULT_QUANTILE,
        notes=notes,
    )


def refused_plan(error: SpecError) -> RunPlan:
    """The plan of a spec that cannot be planned: its first problem's field (without `spec.`) and every problem."""
    problems = [problem.removeprefix("spec.") for problem in error.problems] or ["the run cannot be planned"]
    match = _FIELD_PATH.match(problems[0])
    return RunPlan(invalid_field=match.group(0) if match else DATA_FIELD, error="; ".join(problems))


def plan_json(plan: RunPlan) -> str:
    """The RunPlan as the operator reads it: camelCase JSON without unset fields."""
    return json.dumps(plan.to_wire(), sort_keys=True)


def _transient(error: Exception) -> bool:
    """An API error that trying again may get past: the server is busy, or did not answer."""
    import kubernetes.client

    if isinstance(error, kubernetes.client.ApiException):
        return error.status is None or error.status >= 500 or error.status == 429
    return True  # urllib3 and socket errors: no answer at all


def write_to_config_map(plan: RunPlan, name: str, namespace: str, api: Any) -> None:
    """Merge the plan into ConfigMap `name` under PLAN_KEY, retrying what may pass; raises the last error."""
    from kubetune.runtime.reporting.kube_reporter import patch_config_map_data

    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            patch_config_map_data(api, name, namespace, {PLAN_KEY: plan_json(plan)})
            return
        except Exception as error:  # ApiException for a refusal; urllib3 and socket errors when unreachable
            if attempt == WRITE_ATTEMPTS or not _transient(error):
                raise
            time.sleep(WRITE_RETRY_WAIT_S * attempt)


def _write(plan: RunPlan, config: RunConfig, output: Path | None, errors: Console) -> int:
    if output is not None:
        output.write_text(json.dumps(plan.to_wire(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return EXIT_WRITTEN
    from kubetune.runtime.reporting.kube_reporter import described_api_error, in_cluster_api

    name, namespace = config.run.report_config_map, config.run.namespace
    assert name is not None and namespace is not None  # checked by main before planning
    try:
        write_to_config_map(plan, name, namespace, in_cluster_api())
    except Exception as error:
        shown = described_api_error(error)
        errors.print(f"cannot write the plan to {namespace}/{name}: {shown}", soft_wrap=True, markup=False)
        return EXIT_FAILED
    return EXIT_WRITTEN


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    errors = Console(stderr=True, highlight=False)
    started = entry_config(arguments.config, errors)
    if started is None:
        return EXIT_INVALID
    config, settings = started
    if arguments.output is None and not (config.run.report_config_map and config.run.namespace):
        errors.print(
            f"{arguments.config or settings.run_config} names no report ConfigMap "
            "(run.reportConfigMap and run.namespace): give --output",
            soft_wrap=True,
            markup=False,
        )
        return EXIT_INVALID
    try:
        report = plan_run(config, settings)
    except SpecError as error:
        for problem in error.problems:
            errors.print(f"cannot be planned: {problem}", soft_wrap=True, markup=False)
        plan = refused_plan(error)
    except UnavailableError as error:
        errors.print(f"cannot plan now: {error}", soft_wrap=True, markup=False)
        return EXIT_FAILED
    else:
        console = Console()
        print_report(report, console if console.is_terminal else Console(width=LOG_WIDTH))
        plan = run_plan(report)
    return _write(plan, config, arguments.output, errors)


if __name__ == "__main__":
    sys.exit(main())
