"""lm-evaluation-harness tasks scored on a model in memory: the benchmark metrics beside the test metrics.

A task's metrics are named <task>.<metric> (<task>.<metric>.<filter> for a filter other than lm-eval's
`none`). Only metrics that improve upward are kept (accuracy, exact match, F1, ...), so the promotion gate
can bound how far each may fall; lm-eval's perplexities are left out.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

from torch import nn

from .contract.evaluation import LmEvalSpec
from .io.errors import InvalidRunError
from .io.settings import RuntimeSettings
from .io.storage import download_s3, local_path, parse_uri

# lm-eval's seeds, fixed so that few-shot examples and sampling are the same for every model of a run.
SEED = 1234
# lm-eval's name for "no filter" in its results' keys (`acc,none`).
NO_FILTER = "none"


def task_folder(spec: LmEvalSpec, settings: RuntimeSettings) -> Path | None:
    """The local folder of the task YAML files (an s3:// folder is downloaded first)."""
    if spec.task_folder is None:
        return None
    scheme = parse_uri(spec.task_folder).scheme
    if scheme == "hf":
        raise InvalidRunError(
            "evaluation.lmEval.taskFolder", "hf:// is not a folder of task files; use s3, pvc or a path"
        )
    folder = download_s3(spec.task_folder, settings) if scheme == "s3" else local_path(spec.task_folder, settings)
    if not folder.is_dir():
        raise InvalidRunError("evaluation.lmEval.taskFolder", f"{spec.task_folder} is not a folder")
    return folder


def _named(results: dict[str, Any], higher_is_better: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for task in tasks:
        directions = higher_is_better.get(task, {})
        for key, value in results.get(task, {}).items():
            metric, _, applied = key.partition(",")
            if not applied or not directions.get(metric) or not isinstance(value, int | float):
                continue  # a name, a sample count, a standard error, or a metric that improves downward
            name = f"{task}.{metric}" if applied == NO_FILTER else f"{task}.{metric}.{applied}"
            metrics[name] = float(value) if math.isfinite(value) else math.nan
    return metrics


def benchmark_metrics(
    model: nn.Module, tokenizer: Any, spec: LmEvalSpec, settings: RuntimeSettings | None = None
) -> dict[str, float]:
    """The metrics of `spec.tasks` for `model` (in eval mode, on its device), named <task>.<metric>."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = task_folder(spec, settings or RuntimeSettings.from_environment())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # lm-eval logs every request batch at INFO: a run's console keeps its own lines.
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        evaluator = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size, device=str(device))
        manager = TaskManager(include_path=str(folder) if folder is not None else None)
        unknown = [task for task in spec.tasks if task not in manager.all_tasks]
        if unknown:
            where = f"in {spec.task_folder} or " if folder is not None else ""
            raise InvalidRunError(
                "evaluation.lmEval.tasks", f"unknown task(s) {', '.join(unknown)}: not {where}lm-evaluation-harness's"
            )
        # Relative data_files in the task files are read from their folder.
        with contextlib.chdir(folder) if folder is not None else contextlib.nullcontext():
            output = lm_eval.simple_evaluate(
                model=evaluator,
                tasks=list(spec.tasks),
                num_fewshot=spec.num_fewshot,
                limit=spec.limit,
                task_manager=manager,
                log_samples=False,
                bootstrap_iters=0,
                random_seed=SEED,
                numpy_random_seed=SEED,
                torch_random_seed=SEED,
                fewshot_random_seed=SEED,
            )
    finally:
        model.train(was_training)
    if output is None:  # only on ranks other than lm-eval's first, which a single process never is
        return {}
    return _named(output["results"], output.get("higher_is_better", {}), list(spec.tasks))
