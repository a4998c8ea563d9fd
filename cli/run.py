"""`kubetune run FILE.yaml`: the FineTuneJob of a manifest file, run and served on this machine.

The same file `kubectl apply` takes: the FineTuneJob says what to train; a ModelDeployment
in the same file that follows the job sets how it is served. Training, search, evaluation
and compression run on a local Ray through the runtime's pipeline (what a RayJob runs);
the job's promotion gate judges the result; the promoted variant is served by the Serve
application the cluster runs, on 127.0.0.1, until Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubetune.operator.api.finetunejob import FineTuneJob, GateResult, JobPhase, RunRecord, Trigger
from kubetune.operator.api.modeldeployment import ModelDeployment
from kubetune.operator.observe.reports import finite_metrics
from kubetune.operator.status.gate import gate
from kubetune.runtime.contract import RunIdentity, RunSpec, WorkerResources
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.contract.serving import ServeAppArgs, Variant
from rich.console import Console
from rich.markup import escape

from .capture import Consoles, libraries_logged_to
from .serve import (
    busy_ports,
    interruptible,
    last_line,
    local_compile,
    local_ray,
    sample_of,
    serve_until_stopped,
)
from .validate import check

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NOT_PROMOTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LOG_FILE = "kubetune.log"
EVENTS_FILE = "events.jsonl"
# Where the log goes when the output is remote (s3://): a local folder named after the job.
REMOTE_OUTPUT_LOGS = Path("kubetune-output")
LOGGER = logging.getLogger("kubetune.cli.run")


@dataclass(frozen=True)
class LocalRun:
    """What a manifest file asks of a local run."""

    job: FineTuneJob
    deployment: ModelDeployment | None  # the file's ModelDeployment that follows the job, if any
    notes: list[str]  # what the file asks that a local run does not do

    @property
    def name(self) -> str:
        return str(self.job.metadata["name"])

    def workers(self, count: int | None = None) -> WorkerResources:
        """The local workers: `count` (or the job's resources.workers), sharded as the job asks."""
        resources = self.job.spec.resources
        return WorkerResources(workers=count or resources.workers, sharding=resources.sharding)


def read_local_run(path: Path) -> LocalRun:
    """The file's FineTuneJob (exactly one) and its ModelDeployment; SpecError names every problem."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]
    except OSError as error:
        raise SpecError([f"{path}: cannot read: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        raise SpecError([f"{path}: not valid YAML: {error}"]) from None
    problems: list[str] = []
    manifests = []
    for index, document in enumerate(documents):
        where = f"{path}" if len(documents) == 1 else f"{path}#{index + 1}"
        try:
            manifests.append(check(document, local=True))
        except SpecError as error:
            problems.extend(f"{where}: {problem}" for problem in error.problems)
    jobs = [m for m in manifests if isinstance(m, FineTuneJob)]
    if not problems and len(jobs) != 1:
        problems.append(f"{path}: a local run needs exactly one FineTuneJob, found {len(jobs)}")
    if problems:
        raise SpecError(problems)
    job = jobs[0]
    notes = []
    deployment = None
    for candidate in (m for m in manifests if isinstance(m, ModelDeployment)):
        reference = candidate.spec.model.from_fine_tune_job
        if reference is not None and reference.name == job.metadata["name"] and deployment is None:
            deployment = candidate
        else:
            notes.append(f"ModelDeployment {candidate.metadata['name']} does not follow this job: not used here")
    if job.spec.schedule:
        notes.append("spec.schedule: a local run runs once")
    if job.spec.storage is not None and job.spec.storage.hugging_face is not None:
        # Like the rest of spec.storage, it sets the pods' environment; here this machine's applies.
        notes.append("spec.storage.huggingFace: a local run uses this machine's HF_ENDPOINT and HF_HUB_OFFLINE")
    if deployment is not None and deployment.spec.auth is not None:
        notes.append("ModelDeployment auth: the local endpoint listens on 127.0.0.1 without a token")
    return LocalRun(job, deployment, notes)


def run_spec(job: FineTuneJob, output: str | None) -> RunSpec:
    """The run contract of the job (its cluster fields left out), with the output moved when asked."""
    spec = RunSpec.model_validate(job.spec.model_dump(include=set(RunSpec.model_fields)))
    if output is not None:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"uri": output})})
    return spec


def serve_args(run: LocalRun, output_uri: str) -> tuple[ServeAppArgs, str]:
    """The Serve application's arguments and route for the run's output: the deployment's settings, if any."""
    serving = run.job.spec.serving
    args = ServeAppArgs(
        model_uri=output_uri,
        variant=serving.variant,
        task=run.job.spec.model.task,
        model_name=run.name,
        batching=serving.batching,
        max_new_tokens=serving.max_new_tokens,
        compile=local_compile(None),
    )
    if run.deployment is None:
        return args, serving.route_prefix
    spec = run.deployment.spec
    reference = spec.model.from_fine_tune_job
    update = {"batching": spec.batching, "max_new_tokens": spec.max_new_tokens, "compile": local_compile(spec.compile)}
    if reference is not None:
        update["variant"] = reference.variant
    update["model_name"] = run.deployment.metadata["name"]
    return args.model_copy(update=update), spec.route_prefix


def judged(job: FineTuneJob, result: RunReport) -> GateResult:
    """The job's promotion gate on the local run's result (its final report), as the operator judges a cluster run."""
    record = RunRecord(
        number=1,
        ray_job_name="local",
        trigger=Trigger.SPEC_CHANGE,
        spec_generation=0,
        phase=JobPhase.SUCCEEDED,
        **finite_metrics(result.metrics_before, result.metrics_after, result.baseline),
    )
    return gate(job, record, result)


def log_file_for(spec: RunSpec, name: str) -> Path:
    from kubetune.runtime.io.storage import parse_uri

    if parse_uri(spec.output.uri).scheme == "s3":
        return (REMOTE_OUTPUT_LOGS / f"{name}.log").resolve()
    local = spec.output.uri.removeprefix("file://")
    return (Path(local) / LOG_FILE).resolve()


def missing_runtime() -> str | None:
    needed = ("torch", "ray", "transformers")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return f"kubetune run needs the runtime extra ({', '.join(missing)} missing): pip install 'kubetune[runtime]'"
    return None


@dataclass(frozen=True)
class RunFlags:
    output: str | None = None
    serve: bool = True
    port: int = 8000
    workers: int | None = None
    verbose: bool = False


def run_command(path: Path, flags: RunFlags) -> int:
    errors = Console(stderr=True)
    try:
        local = read_local_run(path)
    except SpecError as error:
        errors.print(f"[red]invalid manifest:[/red] {escape(str(path))}", highlight=False)
        for problem in error.problems:
            errors.print(f"  {escape(problem)}", soft_wrap=True, highlight=False)
        return EXIT_INVALID
    missing = missing_runtime()
    if missing is not None:
        errors.print(f"[red]error:[/red] {escape(missing)}", soft_wrap=True, highlight=False)
        return EXIT_INVALID
    if flags.serve and (busy := busy_ports(flags.port)):
        # Found now, not after the training: the endpoint could not start.
        for problem in busy:
            errors.print(f"[red]error:[/red] {escape(problem)}", soft_wrap=True, highlight=False)
        return EXIT_INVALID
    spec = run_spec(local.job, flags.output)
    log_file = log_file_for(spec, local.name)
    log_file.unlink(missing_ok=True)
    interruptible()
    with libraries_logged_to(None if flags.verbose else log_file) as consoles:
        return _run(local, spec, flags, consoles, log_file)


def _run(local: LocalRun, spec: RunSpec, flags: RunFlags, consoles: Consoles, log_file: Path) -> int:
    from kubetune.runtime.io.errors import InvalidRunError
    from kubetune.runtime.io.storage import anchored
    from kubetune.runtime.recipe.pipeline import RunOptions, run_pipeline
    from kubetune.runtime.reporting.base import JsonLinesReporter, Reporters
    from kubetune.runtime.reporting.console import ConsoleReporter, baseline_line, decisions_table, results_table

    out, err = consoles.out, consoles.err
    resources = local.workers(flags.workers)
    workers = resources.workers
    out.print(
        f"[bold]kubetune run[/bold] FineTuneJob {escape(local.name)}: {escape(spec.model.task.value)}, "
        f"{escape(spec.method.type.value)} on {workers} worker(s) → {escape(spec.output.uri)}",
        highlight=False,
    )
    if consoles.log_file is not None:
        out.print(f"  [dim]library logs: {escape(str(log_file))} (-v shows them here)[/dim]", highlight=False)
    for note in local.notes:
        out.print(f"  [dim]{escape(note)}[/dim]", highlight=False)
    # Beside the log; named after the job too when the log sits in a shared folder (remote outputs).
    events_file = log_file.with_name(EVENTS_FILE if log_file.name == LOG_FILE else f"{log_file.stem}.{EVENTS_FILE}")
    events_file.unlink(missing_ok=True)
    reporter = Reporters([ConsoleReporter(out, show_result=False), JsonLinesReporter(events_file)])
    identity = RunIdentity(job_name=local.name, run_name=local.name)
    options = RunOptions(identity=identity, resources=resources)
    where = f"details in {log_file}"
    try:
        with local_ray(None):
            result = run_pipeline(spec, options, reporter)
            verdict = judged(local.job, result)
            args, route = serve_args(local, anchored(spec.output.uri, Path.cwd()) or spec.output.uri)
            served = result.best_variant if args.variant == Variant.BEST else args.variant.value
            promoted = served if verdict.passed else None
            decisions = decisions_table(result)
            if decisions is not None:
                out.print(decisions)
            out.print(results_table(result, promoted))
            skipped = baseline_line(result)
            if skipped:
                out.print(f"  [dim]{escape(skipped)}[/dim]", highlight=False)
            _print_outputs(out, args.model_uri, result.manifest_uri, result.tensorboard_uri, log_file)
            if not verdict.passed:
                out.print(f"[yellow]not promoted:[/yellow] {escape(verdict.message)}", highlight=False)
                out.print(f"  [dim]to serve it anyway: kubetune serve {escape(args.model_uri)}[/dim]")
                return EXIT_NOT_PROMOTED
            out.print(f"[green]promoted:[/green] {served} ({escape(verdict.message)})", highlight=False)
            if flags.serve:
                sample = sample_of(spec.data.test or spec.data.train, spec.model.task)
                serve_until_stopped(args, spec.model.task, flags.port, out, sample, route)
    except InvalidRunError as error:
        err.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True, highlight=False)
        err.print(f"  [dim]{escape(where)}[/dim]", highlight=False)
        return EXIT_INVALID
    except KeyboardInterrupt:
        err.print("interrupted", highlight=False)
        return EXIT_INTERRUPTED
    except Exception as error:
        LOGGER.exception("the run failed")
        err.print(f"[red]run failed:[/red] {escape(last_line(error))}", soft_wrap=True, highlight=False)
        err.print(f"  [dim]{escape(where)}[/dim]", highlight=False)
        return EXIT_FAILED
    return EXIT_OK


def _print_outputs(out: Console, output: str, manifest: str | None, tensorboard: str | None, log_file: Path) -> None:
    out.print(f"  [dim]written to[/dim] {escape(output)}", highlight=False)
    if manifest:
        out.print(f"  [dim]manifest[/dim]   {escape(manifest)}", highlight=False)
    if tensorboard:
        out.print(f"  [dim]tensorboard[/dim] {escape(tensorboard)}", highlight=False)
    out.print(f"  [dim]log[/dim]        {escape(str(log_file))}", highlight=False)
