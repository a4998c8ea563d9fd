"""The run pipeline: load, evaluate the base, train (or search), evaluate, compress, export.

`run_pipeline` is the Python API; `kubetune.runtime.finetune` is the command around it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoints import TrainingPosition, TrainingState, load_trainable_state
from .cluster import ray_cluster
from .compress import best_variant
from .contract import Method, MethodType, Precision, RunIdentity, RunSpec, Task, WorkerResources
from .contract.report import Stage
from .data import TaskData, load_data
from .errors import DataError, InvalidRunError
from .export import MANIFEST_FILE, VARIANTS_FOLDER, ManifestInputs, spec_hash, write_manifest
from .models import build_model, check_method_fits_machine
from .plan import TrainingPlan, with_overrides
from .reporting import Reporter, Reporters, TensorBoardReporter
from .result import RunResult
from .settings import RuntimeSettings
from .storage import anchored, cache_folder, join_uri, local_path, output_path, parse_uri, upload_directory
from .train import cluster_cpus, train, worker_shape
from .variants import COMPRESSED, VariantContext, build_variants, planned_variants, test_metrics

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
    """Refuse, before any work, what this runtime or machine cannot do."""
    use_gpu = resources.gpus_per_worker > 0
    check_method_fits_machine(spec.method, use_gpu)
    if spec.hyperparameters.precision == Precision.FP16 and not (use_gpu and torch.cuda.is_available()):
        raise InvalidRunError("hyperparameters.precision", "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if use_gpu and not torch.cuda.is_available():
        raise InvalidRunError("resources.gpusPerWorker", "GPUs were requested but this machine has no CUDA GPU")


def _staging_root(spec: RunSpec, options: RunOptions) -> Path:
    """Local folder the results are written to (the output itself unless it is remote)."""
    if _remote_output(spec):
        return cache_folder(spec.output.uri, options.settings, "outputs")
    return local_path(spec.output.uri, options.settings)


def _remote_output(spec: RunSpec) -> bool:
    return parse_uri(spec.output.uri).scheme == "s3"


def _checkpoint_storage(spec: RunSpec, root: Path) -> tuple[str, Any]:
    """Ray Train storage for checkpoints: inside the output (on S3 directly for s3:// outputs)."""
    parsed = parse_uri(spec.output.uri)
    if parsed.scheme != "s3":
        return str(output_path(root, CHECKPOINTS_FOLDER, spec.output.uri).resolve()), None
    from .s3fs import arrow_s3_filesystem

    return join_uri(parsed.location, CHECKPOINTS_FOLDER), arrow_s3_filesystem()


def _check_chat_template(processor: Any, data: TaskData) -> None:
    uses_chat = any(isinstance(item, dict) and "messages" in item for item in data.train.inputs[:1])
    if uses_chat and not getattr(processor, "chat_template", None):
        raise DataError(
            "data.fields.messages",
            "the data holds chat messages but the model's tokenizer has no chat template; "
            "use prompt/completion fields or a model with a chat template",
        )


def _evaluate_base(spec: RunSpec, data: TaskData, options: RunOptions) -> dict[str, float]:
    """Test metrics of the base model (for classification with a freshly initialised, seeded head)."""
    as_is = Method(type=MethodType.FULL)  # loaded as training loads it, with nothing applied
    model, processor = build_model(spec.model, as_is, data.labels, spec.hyperparameters.seed, options.settings)
    if spec.model.task == Task.CAUSAL_LM:
        _check_chat_template(processor, data)
    metrics = test_metrics(model, processor, spec, data)
    del model
    return metrics


def _uri_of(spec: RunSpec, root: Path, path: Path) -> str:
    """Where `path` (inside the staging root) ends up in the output."""
    relative = path.relative_to(root).as_posix()
    if _remote_output(spec):
        return join_uri(spec.output.uri, relative)
    return str(path.resolve())


def run_pipeline(spec: RunSpec, options: RunOptions | None = None, reporter: Reporter | None = None) -> RunResult:
    """Fine-tune `spec` end to end; raises InvalidRunError for a spec or data that cannot work."""
    options = options or RunOptions()
    spec = _with_absolute_paths(spec, Path.cwd())
    check_runnable(spec, options.resources)
    root = _staging_root(spec, options)
    root.mkdir(parents=True, exist_ok=True)
    _check_output_paths(root, spec.output.uri)
    tensorboard = TensorBoardReporter(output_path(root, TENSORBOARD_FOLDER, spec.output.uri))
    events = Reporters([tensorboard, *([reporter] if reporter else [])])
    try:
        result = _run(spec, options, root, events)
        tensorboard.close()
        if _remote_output(spec):
            upload_directory(root, spec.output.uri)
            shutil.rmtree(root, ignore_errors=True)
    except BaseException as error:
        events.failed(str(error) or type(error).__name__)
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
    plan = TrainingPlan(spec, data.labels, data.train, data.validation, options.settings)
    storage_path, filesystem = _checkpoint_storage(spec, root)
    name = options.identity.run_name or "train"
    with ray_cluster(options.local_cpus):
        if spec.search is None:
            events.stage_started(
                Stage.TRAIN, f"{spec.method.type.value} on {options.resources.workers} Ray Train worker(s)"
            )
            outcome = train(plan, options.resources, storage_path, name, events, storage_filesystem=filesystem)
            return _Trained(spec, outcome.state)
        from .search import run_search

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


def _run(spec: RunSpec, options: RunOptions, root: Path, events: Reporters) -> RunResult:
    events.stage_started(Stage.LOAD, f"data from {spec.data.train}")
    data = load_data(spec, options.settings)
    events.data({"train": len(data.train), "validation": len(data.validation), "test": len(data.test)}, data.labels)
    events.stage_started(
        Stage.EVALUATE_BASE,
        f"base model on {len(data.test)} test examples (training: {len(data.train)}, validation: "
        f"{len(data.validation)})",
    )
    before = _evaluate_base(spec, data, options)
    events.metrics("test-before", before, 0)

    trained = _train_or_search(spec, data, options, root, events)
    effective = trained.spec
    hp = effective.hyperparameters

    events.stage_started(Stage.EVALUATE, "fine-tuned model on the test set")
    # The base evaluation has just fetched the model: an s3:// download is reused, not repeated.
    settings = replace(options.settings, reuse_downloads=True)
    model, processor = build_model(effective.model, effective.method, data.labels, hp.seed, settings)
    load_trainable_state(model, trained.state.weights)
    after = test_metrics(model, processor, effective, data)
    events.metrics("test-after", after, trained.position.step)

    events.stage_started(Stage.COMPRESS, "variants: " + ", ".join(planned_variants(effective)))
    context = VariantContext(
        effective, data, after, lambda variant: events.variant(variant.name, variant.report(str(variant.folder)))
    )
    variants = build_variants(model, processor, root, context)
    reports = {variant.name: variant.report(_uri_of(spec, root, variant.folder)) for variant in variants}
    best = best_variant(reports, COMPRESSED)

    events.stage_started(Stage.EXPORT, f"to {spec.output.uri}")
    inputs = _manifest_inputs(spec, options, data, before, after, trained, best)
    manifest = write_manifest(root, inputs, variants)
    result = RunResult(
        metrics_before=before,
        metrics_after=after,
        validation=trained.position.best_metrics,
        artifacts={name: report.uri for name, report in reports.items()},
        variants=reports,
        best_variant=best,
        manifest_uri=_uri_of(spec, root, manifest),
        tensorboard_uri=_uri_of(spec, root, root / TENSORBOARD_FOLDER),
        spec_hash=spec_hash(spec),
        steps=trained.position.step,
        epochs=trained.position.epochs_done,
        stopped_early=trained.position.stopped_early,
        resumed_from_step=trained.position.resumed_from_step,
        trials=trained.search["trials"] if trained.search else None,
        best_hyperparameters=trained.search["bestHyperparameters"] if trained.search else None,
    )
    return result


def _manifest_inputs(
    spec: RunSpec,
    options: RunOptions,
    data: TaskData,
    before: dict[str, float],
    after: dict[str, float],
    trained: _Trained,
    best: str,
) -> ManifestInputs:
    position = trained.position
    return ManifestInputs(
        spec=spec,
        identity=options.identity,
        data_sources=data.sources,
        labels=data.labels,
        metrics_before=before,
        metrics_after=after,
        validation=position.best_metrics,
        training={
            "steps": position.step,
            "bestStep": position.best_step,
            "stoppedEarly": position.stopped_early,
            "resumedFromStep": position.resumed_from_step,
            "samplesPerSecondPerWorker": position.samples_per_second,
            "workers": options.resources.workers,
            "examples": {"train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
        },
        output_uri=spec.output.uri,
        best_variant=best,
        search=trained.search,
        effective=trained.spec,
    )
