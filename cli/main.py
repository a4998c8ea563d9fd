"""`kubetune`: `plan` a FineTuneJob's memory, speed and GPU-hours, `run` it and `serve` its model on this machine,
`validate` manifests, write the `crds`, and start the `operator`."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from kubetune.operator.api.finetunejob import FineTuneJob
from kubetune.operator.api.manifests import Manifest
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.contract.serving import Variant
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# `kubetune plan`'s exit status (kept here so --help needs no planner import).
PLAN_EXIT_CODES = (
    "exit status: 0 the plan fits the GPU (or no GPU type is named), 1 it does not fit (the suggestions say "
    "what would), 2 the file, the model's config.json, the data or an option cannot be used"
)

console = Console()
errors = Console(stderr=True)


def _load(path: Path) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except OSError as error:
        raise SpecError([f"cannot read: {error.strerror}"]) from None
    except yaml.YAMLError as error:
        raise SpecError([f"not valid YAML: {error}"]) from None


def _summary(manifest: Manifest) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    if isinstance(manifest, FineTuneJob):
        job = manifest.spec
        search = job.search
        rows = [
            ("model", f"{job.model.uri} ({job.model.task.value})"),
            ("data", job.data.train),
            ("method", job.method.type.value),
            (
                "training",
                f"{job.hyperparameters.epochs} epochs, lr {job.hyperparameters.learning_rate:g}, "
                f"batch {job.hyperparameters.batch_size}, {job.hyperparameters.precision}",
            ),
            (
                "search",
                "none"
                if search is None
                else f"{search.algorithm.value}, {search.effective_trials} trials on {', '.join(search.space)}",
            ),
            (
                "compression",
                f"{job.compression.quantization.method.value}, pruning "
                f"{job.compression.pruning.method.value}, max drop {job.compression.max_accuracy_drop:g}",
            ),
            (
                "workers",
                f"{job.resources.workers} x ({job.resources.cpu_per_worker} CPU, "
                f"{job.resources.memory_per_worker}, {job.resources.gpus_per_worker} GPU)",
            ),
            ("output", job.output.uri),
        ]
    else:
        deployment = manifest.spec
        reference = deployment.model.from_fine_tune_job
        rows = [
            ("model", deployment.model.uri or f"FineTuneJob {reference.name if reference else '?'}"),
            ("replicas", f"{deployment.autoscaling.min_replicas}..{deployment.autoscaling.max_replicas}"),
            ("auth", "bearer token" if deployment.auth else "open"),
        ]
    for key, value in rows:
        table.add_row(f"[dim]{key}[/dim]", value)
    return table


def _report(where: str, error: SpecError) -> None:
    errors.print(f"[red]✗[/red] {escape(where)}", soft_wrap=True)
    for problem in error.problems:
        errors.print(f"    {escape(problem)}", soft_wrap=True)


def validate(paths: list[Path], *, local: bool = False, operator_settings: bool = False) -> int:
    from kubetune.cli.validate import check
    from kubetune.operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_environment() if operator_settings else None
    except SettingsError as error:
        errors.print(f"[red]✗[/red] {escape(str(error))}", soft_wrap=True)
        return 2

    failed = 0
    for path in paths:
        try:
            documents = _load(path)
            if not documents:
                raise SpecError(["no manifests found"])
        except SpecError as error:
            failed += 1
            _report(str(path), error)
            continue
        for index, document in enumerate(documents):
            where = str(path) if len(documents) == 1 else f"{path}#{index + 1}"
            try:
                manifest = check(document, local=local, settings=settings)
            except SpecError as error:
                failed += 1
                _report(where, error)
                continue
            console.print(
                f"[green]✓[/green] {escape(where)}: {manifest.kind} {manifest.metadata['name']}", soft_wrap=True
            )
            console.print(_summary(manifest))
    return 1 if failed else 0


def crds(directories: list[Path]) -> int:
    from kubetune.operator import crdgen

    if not directories:
        for text in crdgen.rendered().values():
            sys.stdout.write("---\n" + text)
        return 0
    for path in crdgen.write(directories):
        console.print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="validate FineTuneJob and ModelDeployment manifests")
    check.add_argument("paths", nargs="+", type=Path, metavar="FILE")
    check.add_argument(
        "--local",
        action="store_true",
        help="check for `kubetune run` on this machine (local output paths allowed), not for a cluster",
    )
    check.add_argument(
        "--operator-settings",
        action="store_true",
        help="also check what the operator's settings allow (images, priority classes, tolerations, node labels, "
        "remote code), read from KUBETUNE_* environment variables as the operator reads them",
    )
    generate = commands.add_parser("crds", help="write the CRDs into directories (stdout when none)")
    generate.add_argument("directories", nargs="*", type=Path, metavar="DIR")
    operator = commands.add_parser("operator", help="run the operator against the current cluster")
    operator.add_argument(
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch only this namespace (repeatable); all namespaces by default",
    )
    operator.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port (0 disables); KUBETUNE_METRICS_PORT or 8080 by default",
    )
    operator.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's health endpoint for probes at this URL (e.g. http://0.0.0.0:8081/healthz)",
    )
    operator.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reconcile only while holding the Lease the replicas elect a leader on (KUBETUNE_LEADER_ELECTION, "
        "off by default; the chart turns it on)",
    )
    local = commands.add_parser(
        "run", help="fine-tune, compress and serve a FineTuneJob manifest on this machine (no cluster)"
    )
    local.add_argument("path", type=Path, metavar="FILE", help="a FineTuneJob (and optionally a ModelDeployment)")
    local.add_argument("--output", metavar="DIR", help="write results here instead of the job's spec.output.uri")
    local.add_argument("--no-serve", action="store_true", help="stop after the results; do not serve")
    local.add_argument("--port", type=int, default=8000, help="port of the local endpoint (default 8000)")
    local.add_argument("--workers", type=int, help="training workers (default: the job's resources.workers)")
    local.add_argument("-v", "--verbose", action="store_true", help="show Ray's and other libraries' logs")
    planning = commands.add_parser(
        "plan",
        help="memory per GPU, fit per GPU type, speed and GPU-hours of a FineTuneJob, before it runs",
        description="The plan of a FineTuneJob from its model's config.json (never the weights): memory per "
        "device with its breakdown, fit per GPU type, step time, tokens/s, GPU-hours, the values auto fields "
        "would get and why; for a job that does not fit its GPU, the changes that would make it fit.",
        epilog=PLAN_EXIT_CODES,
    )
    planning.add_argument("path", type=Path, metavar="FILE", help="a file with one FineTuneJob")
    planning.add_argument(
        "--gpu", metavar="TYPE", help="judge the job on this GPU type (default: the job's resources.gpuType)"
    )
    planning.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tokenize the training data for its token lengths and the run's GPU-hours (default: when it is local)",
    )
    planning.add_argument(
        "--quantile",
        type=float,
        default=0.95,
        help="the share of the training examples an auto maxSequenceLength covers whole (default 0.95)",
    )
    planning.add_argument("--json", action="store_true", help="print the plan as JSON")
    serving = commands.add_parser("serve", help="serve an exported model or run output on this machine")
    serving.add_argument("uri", metavar="PATH_OR_URI", help="a run's output folder or a variant's folder (path, s3://)")
    serving.add_argument(
        "--variant", default="best", choices=[v.value for v in Variant], help="variant of a run's output (best)"
    )
    serving.add_argument("--port", type=int, default=8000, help="port of the local endpoint (default 8000)")
    serving.add_argument("--name", help="the model's name in answers (default: the job's or the folder's name)")
    serving.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (off by default here: it slows the start by 30-80 s on 2 cores)",
    )
    serving.add_argument("-v", "--verbose", action="store_true", help="show Ray's and other libraries' logs")
    commands.add_parser("version", help="print the version")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.paths, local=args.local, operator_settings=args.operator_settings)
    if args.command == "run":
        from .run import RunFlags, run_command

        if args.workers is not None and args.workers < 1:
            errors.print("[red]error:[/red] --workers must be at least 1")
            return 2
        flags = RunFlags(args.output, not args.no_serve, args.port, args.workers, args.verbose)
        return run_command(args.path, flags)
    if args.command == "plan":
        from .plan import PlanFlags, plan_command

        return plan_command(args.path, PlanFlags(args.gpu, args.data, args.json, args.quantile), console, errors)
    if args.command == "serve":
        from .serve import serve_command

        return serve_command(args.uri, Variant(args.variant), args.port, args.name, args.compile, args.verbose)
    if args.command == "crds":
        return crds(args.directories)
    if args.command == "operator":
        from kubetune.operator.main import run
        from kubetune.operator.settings import Settings, SettingsError

        try:
            settings = Settings.from_environment()
        except SettingsError as error:
            console.print(f"[red]invalid setting:[/red] {error}", soft_wrap=True, highlight=False)
            return 2
        if args.metrics_port is not None:
            settings = settings.model_copy(update={"metrics_port": args.metrics_port})
        if args.leader_election is not None:
            settings = settings.model_copy(update={"leader_election": args.leader_election})
        try:
            run(args.namespace, settings, liveness=args.liveness)
        except SettingsError as error:  # what keeps the leader election from working
            console.print(f"[red]invalid setting:[/red] {error}", soft_wrap=True, highlight=False)
            return 2
        return 0
    console.print(version("kubetune"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
