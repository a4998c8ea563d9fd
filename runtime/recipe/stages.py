"""The stages that hold the whole model: base evaluation, then evaluation, compression and export.

Where each stage runs
--------------------
The driver (the RayJob's entry point) runs on the Ray head. The head stays small (no
GPU, no CPUs for Ray's work), so it can be scheduled anywhere and never holds a model:
it loads the data, coordinates, reports, and uploads the run's own files. The stages
that hold the model run where the GPUs are, shaped like a worker pod (its GPUs and,
when given, its CPUs): the base evaluation as a Ray task, the fine-tuned model's
evaluation, compression and export as one Ray actor (one model load for the three).
GPU nodes do the GPU work; a GPU head would sit idle through training, and could not
be scheduled where only worker-shaped GPU nodes exist. The same path runs with 0 GPUs
in a cluster (on a worker pod's CPUs), so a CPU run in a cluster exercises what a GPU
run does. Only a local CPU run keeps the stages in the driver's process, where the
console shows each variant as soon as it is measured.

A stage in Ray loads the model and the data itself from the spec's URIs (s3:// downloads
go to its pod's cache; pvc:// is mounted on every pod), receives the trained weights
through the object store, and writes its variant folders and the manifest into the
output. For an s3:// output it stages them in its own pod and uploads them itself,
apart from what the driver uploads (TensorBoard; checkpoints go to S3 directly).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch
from kubetune.runtime.contract import Method, MethodType, RunIdentity, RunSpec, WorkerResources
from kubetune.runtime.contract.decisions import Decision
from kubetune.runtime.contract.report import BaselineReport, Stage, VariantReport
from kubetune.runtime.data.chat import check_chat_template
from kubetune.runtime.data.load import TaskData, load_data
from kubetune.runtime.io.errors import InvalidRunError, invalid_run_cause
from kubetune.runtime.io.settings import RuntimeSettings
from kubetune.runtime.io.storage import cache_folder, join_uri, local_path, parse_uri, upload_directory
from kubetune.runtime.models import build_model
from kubetune.runtime.reporting.base import Reporter
from kubetune.runtime.training.checkpoints import load_trainable_state
from kubetune.runtime.training.devices import require_cuda
from kubetune.runtime.variants.build import COMPRESSED, VariantContext, build_variants, planned_variants, test_metrics
from kubetune.runtime.variants.export import ExportedVariant, ManifestInputs, write_manifest
from kubetune.runtime.variants.measure import best_variant
from torch import nn

# Cache folder kind where a stage in Ray stages an s3:// output; the driver's staging folder is another.
STAGE_OUTPUTS = "stage-outputs"


@dataclass(frozen=True)
class StagePlacement:
    """Where the model-holding stages run: in the driver's process, or in Ray with these resources."""

    remote: bool
    num_gpus: int = 0
    # None: Ray's default; the stage then uses every CPU of its node (training is not running meanwhile).
    num_cpus: float | None = None

    def task_options(self) -> dict[str, Any]:
        # One call per worker process, so the model's memory (and GPU memory) is gone before training.
        # No retries: a failed stage fails the run, and the RayJob decides whether the run is retried.
        return {**self._resources(), "max_retries": 0, "max_calls": 1}

    def actor_options(self) -> dict[str, Any]:
        return {**self._resources(), "max_restarts": 0}

    def _resources(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_gpus": self.num_gpus}
        if self.num_cpus is not None:
            options["num_cpus"] = self.num_cpus
        return options


INLINE = StagePlacement(remote=False)


def stage_placement(resources: WorkerResources, ray_address: str | None) -> StagePlacement:
    """Where the stages of a run on `resources` run; `ray_address` is RAY_ADDRESS, set inside a RayJob.

    - GPUs requested: in Ray, with one worker pod's GPUs (and CPUs), since the driver's machine may have none.
    - In a Ray cluster, even without GPUs: the head must not hold the model.
    - Otherwise, a local CPU run: in the driver's process, as `kubetune run` always did.
    """
    if resources.gpus_per_worker == 0 and not ray_address:
        return INLINE
    return StagePlacement(True, resources.gpus_per_worker, resources.cpus_per_worker)


def check_gpus_exist(resources: WorkerResources, ray_address: str | None) -> None:
    """Refuse a GPU run this machine's own Ray can never place, rather than wait for its GPUs forever.

    In a cluster (RAY_ADDRESS) GPU nodes may still be starting, so Ray is left to wait for them.
    """
    needed = resources.workers * resources.gpus_per_worker
    if needed == 0 or ray_address:
        return
    found = float(ray.cluster_resources().get("GPU", 0))  # type: ignore[no-untyped-call]
    if found < needed:
        raise InvalidRunError(
            "resources.gpusPerWorker",
            f"{needed} GPU(s) were requested (workers x gpusPerWorker), but this machine's Ray has {found:g}",
        )


def remote_output(spec: RunSpec) -> bool:
    return parse_uri(spec.output.uri).scheme == "s3"


def output_uri(spec: RunSpec, root: Path, path: Path) -> str:
    """Where `path` (inside the local root the output is written to) ends up in the output."""
    if remote_output(spec):
        return join_uri(spec.output.uri, path.relative_to(root).as_posix())
    return str(path.resolve())


def _node_cpus() -> int:
    node = ray.get_runtime_context().get_node_id()
    for entry in ray.nodes():  # type: ignore[no-untyped-call]
        if entry.get("NodeID") == node:
            return max(1, int(entry.get("Resources", {}).get("CPU", 1)))
    return 1


def _stage_device(placement: StagePlacement, process: str) -> torch.device:
    """The device a stage evaluates on, checked for CUDA here, where CUDA is used."""
    if placement.remote:
        # Ray starts a task with one torch thread unless told: use the CPUs the stage holds.
        threads = _node_cpus() if placement.num_cpus is None else max(1, int(placement.num_cpus))
        torch.set_num_threads(threads)
    if placement.num_gpus > 0:
        return require_cuda(process)
    return torch.device("cpu")


def _get(ref: Any) -> Any:
    """ray.get, raising an invalid run found inside the task as itself (so the run exits as invalid)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as error:
        invalid = invalid_run_cause(error)
        if invalid is None:
            raise
        raise invalid from None


def evaluate_base(
    spec: RunSpec, settings: RuntimeSettings, placement: StagePlacement = INLINE, data: TaskData | None = None
) -> dict[str, float]:
    """Test metrics of the base model (for classification with a freshly initialised, seeded head)."""
    device = _stage_device(placement, "the base evaluation task")
    data = data if data is not None else load_data(spec, settings)
    as_is = Method(type=MethodType.FULL)  # loaded as training loads it, with nothing applied
    model, processor = build_model(spec.model, as_is, data.labels, spec.hyperparameters.seed, settings)
    check_chat_template(processor, spec, data)  # the driver checked already; a stage in Ray loads its own data
    return test_metrics(model.to(device), processor, spec, data, settings)


def run_base_evaluation(
    spec: RunSpec, settings: RuntimeSettings, placement: StagePlacement, data: TaskData
) -> dict[str, float]:
    """`evaluate_base` where `placement` says; a task loads its own data rather than receive the driver's."""
    if not placement.remote:
        return evaluate_base(spec, settings, placement, data)
    task: Any = ray.remote(**placement.task_options())(evaluate_base)
    metrics: dict[str, float] = _get(task.remote(spec, settings, placement))
    return metrics


@dataclass(frozen=True)
class FineTunedJob:
    """What the stages after training need from the driver: the specs and the manifest's lineage."""

    spec: RunSpec  # the run's spec: its output, and the lineage
    effective: RunSpec  # with the best trial's values applied
    identity: RunIdentity
    settings: RuntimeSettings
    metrics_before: dict[str, float]
    validation: dict[str, float]
    training: dict[str, Any]
    search: dict[str, Any] | None = None
    baseline: BaselineReport | None = None
    decisions: list[Decision] = field(default_factory=list)  # the values chosen for `auto` fields


@dataclass(frozen=True)
class Compressed:
    """Every variant's report (URIs in the output) and the variant serving's `best` resolves to."""

    reports: dict[str, VariantReport]
    best: str


class FineTunedStage:
    """Evaluates, compresses and exports the fine-tuned model, holding it across the three steps.

    Inline, the driver passes its data and the root it writes the output to (and uploads
    that itself); as a Ray actor, the stage loads the data and writes its own output.
    """

    def __init__(
        self,
        job: FineTunedJob,
        weights: dict[str, torch.Tensor],
        placement: StagePlacement = INLINE,
        data: TaskData | None = None,
        root: Path | None = None,
    ) -> None:
        self.job, self.weights, self.placement = job, weights, placement
        self.data, self.root = data, root
        self.model: nn.Module | None = None
        self.processor: Any = None
        self.after: dict[str, float] = {}
        self.variants: list[ExportedVariant] = []
        self.best = ""

    def evaluate(self) -> dict[str, float]:
        """Test metrics of the fine-tuned model."""
        device = _stage_device(self.placement, "the evaluation and compression task")
        # The base evaluation has fetched the model (on this machine, or pod): a download is reused.
        settings = self.job.settings.reusing_downloads()
        data = self.data = self.data if self.data is not None else load_data(self.job.spec, settings)
        effective = self.job.effective
        hp = effective.hyperparameters
        model, self.processor = build_model(effective.model, effective.method, data.labels, hp.seed, settings)
        load_trainable_state(model, self.weights)
        self.model = model.to(device)
        self.after = test_metrics(self.model, self.processor, effective, data, settings)
        return self.after

    def compress(self, measured: Callable[[ExportedVariant], None] | None = None) -> Compressed:
        """Write and measure every variant; `measured` hears of each as soon as it is measured."""
        assert self.model is not None and self.data is not None, "evaluate() comes first"
        spec, effective = self.job.spec, self.job.effective
        if effective.method.type != MethodType.QLORA:
            # Variants are written and measured as they are served: on CPU (a 4-bit base stays on its GPU).
            self.model.to("cpu")
        root = self.root = self.root if self.root is not None else _own_root(spec, self.job.settings)
        context = VariantContext(effective, self.data, self.after, self.job.settings.reusing_downloads())
        if measured is not None:
            context = replace(context, measured=measured)
        self.variants = build_variants(self.model, self.processor, root, context)
        self.model = None  # nothing after this needs it
        reports = {variant.name: variant.report(output_uri(spec, root, variant.folder)) for variant in self.variants}
        self.best = best_variant(reports, COMPRESSED)
        return Compressed(reports, self.best)

    def export(self, uploads: bool = False) -> str:
        """Write kubetune.json (and upload it with the variants when `uploads`); returns the manifest's URI."""
        assert self.root is not None and self.data is not None, "compress() comes first"
        job, data = self.job, self.data
        inputs = ManifestInputs(
            spec=job.spec,
            identity=job.identity,
            data_sources=data.sources,
            labels=data.labels,
            metrics_before=job.metrics_before,
            metrics_after=self.after,
            validation=job.validation,
            training=job.training,
            output_uri=job.spec.output.uri,
            best_variant=self.best,
            search=job.search,
            effective=job.effective,
            baseline=job.baseline,
            decisions=job.decisions,
        )
        manifest = write_manifest(self.root, inputs, self.variants)
        uri = output_uri(job.spec, self.root, manifest)
        if uploads:
            upload_directory(self.root, job.spec.output.uri)
            shutil.rmtree(self.root, ignore_errors=True)
        return uri


def _own_root(spec: RunSpec, settings: RuntimeSettings) -> Path:
    """Where a stage in Ray writes: the output itself, or for s3:// a local folder of its own to upload."""
    if remote_output(spec):
        root = cache_folder(spec.output.uri, settings, STAGE_OUTPUTS)
        shutil.rmtree(root, ignore_errors=True)  # what an earlier attempt left must not be uploaded
    else:
        root = local_path(spec.output.uri, settings)
    root.mkdir(parents=True, exist_ok=True)
    return root


@dataclass(frozen=True)
class Finished:
    """What the stages after training produced."""

    metrics: dict[str, float]
    variants: dict[str, VariantReport]
    best: str
    manifest_uri: str


def finish(
    job: FineTunedJob,
    weights: dict[str, torch.Tensor],
    placement: StagePlacement,
    events: Reporter,
    step: int,
    data: TaskData,
    root: Path,
) -> Finished:
    """Evaluate, compress and export the fine-tuned model where `placement` says, telling `events` as it goes.

    Inline, each variant is reported as soon as it is measured; from an actor, once all are.
    """
    effective, uri = job.effective, job.spec.output.uri
    events.stage_started(Stage.EVALUATE, "fine-tuned model on the test set")
    if not placement.remote:
        stage = FineTunedStage(job, weights, placement, data, root)
        after = stage.evaluate()
        events.metrics("test-after", after, step)
        events.stage_started(Stage.COMPRESS, "variants: " + ", ".join(planned_variants(effective)))
        compressed = stage.compress(lambda variant: events.variant(variant.name, variant.report(str(variant.folder))))
        events.stage_started(Stage.EXPORT, f"to {uri}")
        return Finished(after, compressed.reports, compressed.best, stage.export())
    actor_class: Any = ray.remote(**placement.actor_options())(FineTunedStage)
    actor = actor_class.remote(job, ray.put(weights), placement)
    try:
        after = _get(actor.evaluate.remote())
        events.metrics("test-after", after, step)
        events.stage_started(Stage.COMPRESS, "variants: " + ", ".join(planned_variants(effective)))
        compressed = _get(actor.compress.remote())
        for name, report in compressed.reports.items():
            events.variant(name, report)
        events.stage_started(Stage.EXPORT, f"to {uri}")
        manifest_uri = _get(actor.export.remote(remote_output(job.spec)))
    finally:
        ray.kill(actor)
    return Finished(after, compressed.reports, compressed.best, manifest_uri)
