"""`python -m kubetune.runtime.recipe.finetune --config run.json`: one fine-tuning run.

The config is a RunConfig (a RunSpec with run identity and workers) or a bare RunSpec,
in camelCase JSON. Exit status: 0 success, 2 invalid spec or data (the message names
the field; also when a Ray worker finds it, e.g. a GPU node without CUDA), 1 any other
failure. In a cluster this is the RayJob's entry point on the Ray head, which needs no
GPU: training and the stages that hold the model run on the workers (see `stages`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune.runtime.contract import RunConfig
from kubetune.runtime.contract.errors import SpecError
from kubetune.runtime.io.errors import InvalidRunError, unavailable_cause
from kubetune.runtime.io.settings import RuntimeSettings, SettingsError
from kubetune.runtime.reporting.base import JsonLinesReporter, Reporter, Reporters
from kubetune.runtime.reporting.console import ConsoleReporter
from pydantic import ValidationError
from rich.console import Console

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def read_config(path: Path) -> RunConfig:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise SpecError([f"{path}: cannot read: {error.strerror}"]) from None
    except json.JSONDecodeError as error:
        raise SpecError([f"{path}: not valid JSON: {error}"]) from None
    try:
        return RunConfig.from_document(document)
    except ValidationError as error:
        root = "" if isinstance(document, dict) and "spec" in document else "spec"
        raise SpecError.from_validation(error, root) from None


def entry_config(config_path: Path | None, errors: Console) -> tuple[RunConfig, RuntimeSettings] | None:
    """The settings and run config an entry point starts from (--config, else KUBETUNE_RUN_CONFIG); None,
    having said why on `errors`, when a setting or the run config cannot be used."""
    try:
        settings = RuntimeSettings.from_environment()
    except SettingsError as error:
        errors.print(f"invalid setting: {error}", soft_wrap=True, markup=False, highlight=False)
        return None
    path = config_path or settings.run_config
    if path is None:
        errors.print("no run config: give --config or set KUBETUNE_RUN_CONFIG", soft_wrap=True, highlight=False)
        return None
    try:
        return read_config(path), settings
    except SpecError as error:
        for problem in error.problems:
            errors.print(f"invalid spec: {problem}", soft_wrap=True, markup=False, highlight=False)
        return None


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune.runtime.recipe.finetune", description=__doc__)
    parser.add_argument(
        "--config", type=Path, help="run.json: a RunConfig or a bare RunSpec (default: $KUBETUNE_RUN_CONFIG)"
    )
    parser.add_argument("--events", type=Path, help="also append progress events as JSON lines to this file")
    parser.add_argument("--result", type=Path, help="write the run's result (its final RunReport) as JSON to this file")
    parser.add_argument("--cpus", type=int, help="CPUs of the local Ray cluster started for this run")
    return parser.parse_args(argv)


def _kubernetes_reporter(config: RunConfig, errors: Console) -> Reporter | None:
    """The report ConfigMap's reporter inside a cluster; none (console only) for a local run."""
    from kubetune.runtime.reporting.kube_reporter import kubernetes_reporter

    try:
        return kubernetes_reporter(config.run)
    except Exception as error:  # not in a cluster, or no service account: the run still works
        errors.print(f"not reporting to Kubernetes: {error}", soft_wrap=True, markup=False, highlight=False)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _arguments(argv)
    errors = Console(stderr=True)
    started = entry_config(arguments.config, errors)
    if started is None:
        return EXIT_INVALID
    config, settings = started
    if config.ignored_fields:
        # Written by a newer operator than this runtime: the run goes on without them.
        errors.print(
            "[yellow]warning:[/yellow] this runtime does not know these spec fields and ignores them: "
            + ", ".join(config.ignored_fields),
            soft_wrap=True,
            markup=True,
            highlight=False,
        )

    from kubetune.runtime.training.preemption import busy

    from .pipeline import RunOptions, run_pipeline

    reporters: list[Reporter] = [ConsoleReporter()]
    kubernetes = _kubernetes_reporter(config, errors)
    if kubernetes is not None:
        reporters.append(kubernetes)
    if arguments.events:
        reporters.append(JsonLinesReporter(arguments.events))
    options = RunOptions(identity=config.run, resources=config.resources, local_cpus=arguments.cpus, settings=settings)
    try:
        # Busy for the head pod's preStop hook: a pod deleted mid-run waits for the driver to record the
        # workers' preemption checkpoint; once the run is over, the pod stops at once.
        with busy(settings.preemption_notice):
            result = run_pipeline(config.spec, options, Reporters(reporters))
    except InvalidRunError as error:
        errors.print(f"invalid run: {error}", soft_wrap=True, markup=False, highlight=False)
        return EXIT_INVALID
    except Exception as error:
        # Something the run could not reach shows as itself, not as Ray's wrapping of it.
        unavailable = unavailable_cause(error)
        shown = str(unavailable) if unavailable is not None else f"{type(error).__name__}: {error}"
        errors.print(f"run failed: {shown}", soft_wrap=True, markup=False, highlight=False)
        return EXIT_FAILED
    if arguments.result:
        arguments.result.write_text(result.model_dump_json(by_alias=True, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
