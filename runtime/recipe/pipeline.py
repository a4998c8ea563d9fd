"""The run pipeline: load, evaluate the base, train (or search), evaluate, compress, export.

`run_pipeline` is the Python API; `kubetune.runtime.recipe.finetune` is the command around it.
This is the driver: it loads the data, trains through Ray Train and reports. The stages
that hold the whole model run where `stages.stage_placement` says (on GPU nodes in a
cluster; see `stages`); the driver itself never needs a GPU.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.runtime.baseline import fit_baseline
from kubetune.runtime.contract import MethodType, Precision, RunIdentity, RunSpec, Sharding, WorkerResources
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.contract.manifest import MANIFEST_FILE, VARIANTS_FOLDER
from kubetune.runtime.contract.report import BaselineReport, RunReport, Stage
from kubetune.runtime.contract.run import allowed_metrics
from kubetune.runtime.contract.runconfig import SHARDED_QLORA_PROBLEM
from kubetune.runtime.data.chat import chat_field, check_chat_template
from kubetune.runtime.data.load import TaskData, load_data
from kubetune.runtime.io.errors import InvalidRunError, invalid_run_cause, unavailable_cause
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import (
    anchored,
    cache_folder,
    join_uri,
    local_path,
    output_path,
    parse_uri,
    upload_directory,
)
from kubetune.runtime.models import check_method_fits_machine, load_processor, tokenizer_location
from kubetune.runtime.reporting.base import Reporter, Reporters, TensorBoardReporter
from kubetune.runtime.training.checkpoints import TrainingPosition, TrainingState
from kubetune.runtime.training.plan import TrainingPlan, with_overrides
from kubetune.runtime.training.train import cluster_cpus, train, training_processes, worker_shape
from kubetune.runtime.variants.export import spec_digest

from .auto_values import resolve_auto
from .ray_cluster import ray_cluster
from .stages import (
    FineTunedJob,
    StagePlacement,
    check_gpus_exist,
    finish,
    output_uri,
    remote_output,
    run_base_evaluation,
    stage_placement,
)

TENSORBOARD_FOLDER = "tensorboard"
CHECKPOINTS_FOLDER = "checkpoints"


@dataclass(frozen=True)
class RunOptions:
    """How and where this run executes; the spec says what runs."""

    identity: RunIdentity = field(default_factory=RunIdentity)
    resources: WorkerResources = field(default_factory=WorkerResources)
    settings: RuntimeSettings = field(default_factory=RuntimeSettings.from_environment)
    # CPUs of a Ray cluster started for this run (ignored when Ray is already up or remote).
    local_cpus: int | None = None


def check_runnable(spec: RunSpec, resources: WorkerResources) -> None:
    """Refuse, before any work, what the spec cannot do on the workers it asks for.

    Only what the spec decides: whether CUDA works is checked where CUDA is used (Ray Train
    workers, GPU stages), never here, since the driver runs on the Ray head, which has no GPU.
    """
    if resources.sharding == Sharding.FSDP and spec.method.type == MethodType.QLORA:
        raise InvalidRunError("resources.sharding", SHARDED_QLORA_PROBLEM)
    if resources.gpus_per_worker > 0:
        return
    check_method_fits_machine(spec.method, use_gpu=False)
    if spec.hyperparameters.precision == Precision.FP16:
        raise InvalidRunError("hyperparameters.precision", "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")


def check_resolved(spec: RunSpec, resources: WorkerResources) -> None:
    """Refuse a spec that still holds `auto` after resolution: training reads concrete values only."""
    left = spec.hyperparameters.auto_fields()
    if left:
        raise InvalidRunError(
            ", ".join(f"hyperparameters.{name}" for name in left), "still auto after the run resolved its auto values"
        )
    check_runnable(spec, resources)


def _staging_root(spec: RunSpec, options: RunOptions) -> Path:
    """Local folder the results are written to (the output itself unless it is remote)."""
    if remote_output(spec):
        return cache_folder(spec.output.uri, options.settings, "outputs")
    return local_path(spec.output.uri, options.settings)


def _checkpoint_storage(spec: RunSpec, root: Path) -> tuple[str, Any]:
    """Ray Train storage for checkpoints: inside the output (on S3 directly for s3:// outputs)."""
    parsed = parse_uri(spec.output.uri)
    if parsed.scheme != "s3":
        return str(output_path(root, CHECKPOINTS_FOLDER, spec.output.uri).resolve()), None
    from kubetune.runtime.io.s3fs import arrow_s3_filesystem

    return join_uri(parsed.location, CHECKPOINTS_FOLDER), arrow_s3_filesystem()


def run_pipeline(spec: RunSpec, options: RunOptions | None = None, reporter: Reporter | None = None) -> RunReport:
    """Fine-tune `spec` end to end; raises InvalidRunError for a spec or data that cannot work."""
    options = options or RunOptions()
    try:
        spec = _with_absolute_paths(spec, Path.cwd())
        check_runnable(spec, options.resources)
        ray_address = os.environ.get("RAY_ADDRESS")
        placement = stage_placement(options.resources, ray_address)
    except BaseException as error:  # before any other reporter exists
        if reporter is not None:
            report_failure(reporter, error)
        raise
    # Stages in Ray need Ray from the start; a local CPU run starts it for training only, as it always did.
    with ray_cluster(options.local_cpus, state_api=True) if placement.remote else contextlib.nullcontext():
        if placement.remote:
            try:
                check_gpus_exist(options.resources, ray_address)
            except BaseException as error:
                if reporter is not None:
                    report_failure(reporter, error)
                raise
        return _run_here(spec, options, placement, reporter)


def report_failure(events: Reporter | Reporters, error: BaseException) -> None:
    """Tell the reporters the run failed; for a run that cannot work, which spec field says why; for one
    that could not reach what it needs, what that was (its own message, not Ray's wrapping of it)."""
    invalid = invalid_run_cause(error)
    unavailable = None if invalid else unavailable_cause(error)
    if unavailable is not None:
        events.failed(str(unavailable), unavailable=unavailable.what)
        return
    events.failed(str(error) or type(error).__name__, invalid_field=invalid.where if invalid else None)


def _run_here(spec: RunSpec, options: RunOptions, placement: StagePlacement, reporter: Reporter | None) -> RunReport:
    root = _staging_root(spec, options)
    root.mkdir(parents=True, exist_ok=True)
    _check_output_paths(root, spec.output.uri)
    tensorboard = TensorBoardReporter(output_path(root, TENSORBOARD_FOLDER, spec.output.uri))
    events = Reporters([tensorboard, *([reporter] if reporter else [])])
    try:
        result = _run(spec, options, placement, root, events)
        tensorboard.close()
        if remote_output(spec):
            # Disjoint from a stage's own upload (variants, manifest): that stage wrote elsewhere.
            upload_directory(root, spec.output.uri)
            shutil.rmtree(root, ignore_errors=True)
    except BaseException as error:
        report_failure(events, error)
        raise
    events.result(result)
    return result


def _check_output_paths(root: Path, uri: str) -> None:
    """Refuse an output folder whose symlinks lead elsewhere now, before training, not when exporting."""
    for name in (VARIANTS_FOLDER, MANIFEST_FILE, CHECKPOINTS_FOLDER):
        output_path(root, name, uri)


def _with_absolute_paths(spec: RunSpec, base: Path) -> RunSpec:
    """Relative plain paths in the spec, resolved where the run was started."""
    data = spec.data
    return spec.model_copy(
        update={
            "model": spec.model.model_copy(update={"uri": anchored(spec.model.uri, base)}),
            "data": data.model_copy(
                update={
                    "train": anchored(data.train, base),
                    "validation": anchored(data.validation, base),
                    "test": anchored(data.test, base),
                }
            ),
            "output": spec.output.model_copy(update={"uri": anchored(spec.output.uri, base)}),
        }
    )


@dataclass(frozen=True)
class _Trained:
    """Training's outcome, with or without a search."""

    spec: RunSpec  # with the best trial's values applied
    state: TrainingState
    search: dict[str, Any] | None = None

    @property
    def position(self) -> TrainingPosition:
        return self.state.position


def _train_or_search(spec: RunSpec, data: TaskData, options: RunOptions, root: Path, events: Reporters) -> _Trained:
    plan = TrainingPlan(
        spec, data.labels, data.train, data.validation, options.settings, sharding=options.resources.sharding
    )
    storage_path, filesystem = _checkpoint_storage(spec, root)
    name = options.identity.run_name or "train"
    with ray_cluster(options.local_cpus, state_api=True):
        if spec.search is None:
            events.stage_started(Stage.TRAIN, f"{spec.method.type.value} on {_workers_text(options.resources)}")
            outcome = train(plan, options.resources, storage_path, name, events, storage_filesystem=filesystem)
            return _Trained(spec, outcome.state)
        from kubetune.runtime.training.search import run_search

        search = spec.search
        message = f"{search.algorithm.value} search, {search.effective_trials} sample(s), {search.scheduler.value}"
        events.stage_started(Stage.SEARCH, message)
        shape = worker_shape(options.resources, cluster_cpus(), search.max_concurrent_trials)
        found = run_search(plan, shape, storage_path, f"{name}-search", events, filesystem)
    summary = {
        "bestHyperparameters": found.overrides,
        "bestValidation": found.metrics,
        "trials": len(found.trials),
        "trialResults": found.trials,
    }
    return _Trained(with_overrides(spec, found.overrides), found.state, summary)


def _workers_text(resources: WorkerResources) -> str:
    """Who trains: on GPUs, the worker pods and the Ray Train workers (one per GPU) they run."""
    processes = training_processes(resources)
    sharded = ", model sharded (FSDP)" if resources.sharding == Sharding.FSDP else ""
    if resources.gpus_per_worker == 0:
        return f"{processes} Ray Train worker(s){sharded}"
    gpus = f"{resources.workers} worker(s) x {resources.gpus_per_worker} GPU(s)"
    return f"{gpus}: {processes} Ray Train worker(s){sharded}"


def _run(spec: RunSpec, options: RunOptions, placement: StagePlacement, root: Path, events: Reporters) -> RunReport:
    events.stage_started(Stage.LOAD, f"data from {spec.data.train}")
    data = load_data(spec, options.settings)
    events.data({"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}, data.labels)
    _check_chat_template(spec, data, options.settings)
    written = spec  # as the user wrote it: the lineage and the digest
    resolved = resolve_auto(spec, data, options.resources, options.settings, training_processes(options.resources))
    spec = resolved.spec
    check_resolved(spec, options.resources)
    events.stage_started(
        Stage.EVALUATE_BASE,
        f"base model and classical baseline on {len(data.test)} test examples (training: {len(data.train)}, "
        f"validation: {len(data.validation)})",
    )
    before = run_base_evaluation(spec, options.settings, placement, data)
    events.metrics("test-before", before, 0)
    # In the driver, on the split it loaded: the very examples the fine-tuned model trains and is tested on.
    baseline = fit_baseline(spec.model.task, data, spec.hyperparameters.seed)
    measured = {name: value for name, value in baseline.metrics.items() if value is not None}
    if measured:
        events.metrics("test-baseline", measured, 0)

    trained = _train_or_search(spec, data, options, root, events)
    job = _fine_tuned_job(written, options, data, before, trained, baseline, resolved.decisions)
    finished = finish(job, trained.state.weights, placement, events, trained.position.step, data, root)
    return RunReport(
        stage=Stage.DONE,
        metrics_before=before,
        metrics_after=finished.metrics,
        benchmark_metrics=benchmark_names(spec, before),
        baseline=baseline,
        validation=trained.position.best_metrics,
        variants=finished.variants,
        best_variant=finished.best,
        manifest_uri=finished.manifest_uri,
        tensorboard_uri=output_uri(spec, root, root / TENSORBOARD_FOLDER),
        spec_digest=spec_digest(written),
        decisions=resolved.decisions or None,
        step=trained.position.step,
        epoch=trained.position.epochs_done,
        stopped_early=trained.position.stopped_early,
        resumed_from_step=trained.position.resumed_from_step,
        trials_completed=trained.search["trials"] if trained.search else None,
        best_hyperparameters=trained.search["bestHyperparameters"] if trained.search else None,
    )


def benchmark_names(spec: RunSpec, metrics: dict[str, float]) -> list[str] | None:
    """The benchmark metrics among a model's test metrics: those that are not kubetune's own."""
    if spec.lm_eval is None:
        return None
    return sorted(set(metrics) - allowed_metrics(spec.model.task, spec.method.resolved_objective))


def _check_chat_template(spec: RunSpec, data: TaskData, settings: RuntimeSettings) -> None:
    """Refuse chat data for a tokenizer without a chat template now, from the tokenizer alone (no weights)."""
    if chat_field(spec, data) is not None:
        tokenizer = load_processor(tokenizer_location(spec.model, settings), spec.model)
        check_chat_template(tokenizer, spec, data)


def _fine_tuned_job(
    spec: RunSpec,
    options: RunOptions,
    data: TaskData,
    before: dict[str, float],
    trained: _Trained,
    baseline: BaselineReport,
    decisions: list[Decision],
) -> FineTunedJob:
    position = trained.position
    resources = options.resources
    training: dict[str, Any] = {
        "steps": position.step,
        "bestStep": position.best_step,
        "stoppedEarly": position.stopped_early,
        "resumedFromStep": position.resumed_from_step,
        # Of one Ray Train worker (a training process: one per GPU on GPUs).
        "samplesPerSecondPerWorker": position.samples_per_second,
        "workers": resources.workers,
        "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
    }
    if resources.sharding != Sharding.NONE:
        training["sharding"] = resources.sharding.value
    if resources.gpus_per_worker > 0:
        training |= {"gpusPerWorker": resources.gpus_per_worker, "rayTrainWorkers": training_processes(resources)}
    return FineTunedJob(
        spec=spec,
        effective=trained.spec,
        identity=options.identity,
        settings=options.settings,
        metrics_before=before,
        validation=position.best_metrics,
        training=training,
        search=trained.search,
        baseline=baseline,
        decisions=decisions,
    )
