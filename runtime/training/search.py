"""Hyperparameter search with Ray Tune: every trial runs the same Ray Train training as a plain run.

Ray Train V2 composes with Tune by running the TorchTrainer inside a Tune function; the
trainer's reports reach Tune (and its ASHA scheduler) through `TuneReportCallback`.
Trials are bounded by `maxConcurrentTrials` and by what the cluster can place; each
trial trains on as many Ray Train workers as a plain run (one per GPU on GPUs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray.tune
from kubetune.runtime.contract import Algorithm, ParameterType, Scheduler, SearchParameter, SearchSpec
from kubetune.runtime.io.errors import invalid_run_cause
from kubetune.runtime.reporting.base import Reporter, TrialBoard, TrialRow, TrialState
from ray.train import Checkpoint
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from .checkpoints import TrainingState
from .plan import TrainingPlan
from .train import WorkerShape, build_trainer, placement_groups, remove_leftover_placement_groups

# What the trial function itself (not its training workers) asks Ray for: it only waits on the trainer.
TRIAL_DRIVER_CPUS = 0.1
# Tune config keys cannot hold dots reliably (nested-key syntax); searched keys like lora.rank are renamed.
_DOT = "__"


def tune_key(key: str) -> str:
    return key.replace(".", _DOT)


def spec_key(key: str) -> str:
    return key.replace(_DOT, ".")


def _enumerated(parameter: SearchParameter, algorithm: Algorithm) -> bool:
    """Whether every value of the parameter is tried (a grid), rather than sampled."""
    kind = parameter.type
    return kind == ParameterType.GRID or (kind == ParameterType.CHOICE and algorithm == Algorithm.GRID)


def _domain(parameter: SearchParameter, algorithm: Algorithm) -> Any:
    """The Tune domain of one searched setting; with algorithm grid every value is enumerated."""
    kind = parameter.type
    if _enumerated(parameter, algorithm):
        return ray.tune.grid_search(parameter.choices)
    if kind == ParameterType.CHOICE:
        return ray.tune.choice(parameter.choices)
    assert parameter.low is not None and parameter.high is not None  # the contract guarantees both
    if kind == ParameterType.UNIFORM:
        return ray.tune.uniform(parameter.low, parameter.high)
    if kind == ParameterType.LOGUNIFORM:
        return ray.tune.loguniform(parameter.low, parameter.high)
    return ray.tune.randint(int(parameter.low), int(parameter.high))


def param_space(search: SearchSpec) -> dict[str, Any]:
    return {tune_key(key): _domain(parameter, search.algorithm) for key, parameter in search.space.items()}


def metric_name(plan: TrainingPlan) -> str:
    """The name the training loop reports the ranking metric under."""
    return f"validation_{plan.metric.value}"


def _search_algorithm(search: SearchSpec, metric: str, mode: str, seed: int) -> Any:
    if search.algorithm != Algorithm.TPE:
        return None  # random and grid: Tune's own variant generator
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed)
    algorithm = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    return ConcurrencyLimiter(algorithm, max_concurrent=search.max_concurrent_trials)


def _scheduler(search: SearchSpec, plan: TrainingPlan) -> Any:
    if search.scheduler != Scheduler.ASHA:
        return None
    from ray.tune.schedulers import ASHAScheduler

    options = search.asha
    hp = plan.spec.hyperparameters
    # One Tune iteration per validation report; the final report adds one more.
    max_t = hp.epochs * hp.evaluations_per_epoch + 1
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t,
        grace_period=min(options.grace_period if options else 1, max_t),
        reduction_factor=options.reduction_factor if options else 2.0,
    )


@dataclass(frozen=True)
class SearchOutcome:
    """The best trial: its settings, its validation metrics and its trained weights."""

    overrides: dict[str, Any]
    metrics: dict[str, float]
    state: TrainingState
    trials: list[dict[str, Any]]  # every trial: its values, last validation metrics, reports, error


def _trial(config: dict[str, Any], plan: TrainingPlan, shape: WorkerShape, storage_path: str, fs: Any) -> None:
    """One trial: the plan with this trial's values, trained by a TorchTrainer that reports to Tune."""
    overrides = {spec_key(key): value for key, value in config.items()}
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(
        replace(plan, overrides=overrides),
        shape,
        storage_path,
        f"trial-{trial_id}",
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]
        storage_filesystem=fs,
    )
    trainer.fit()


def run_search(
    plan: TrainingPlan,
    shape: WorkerShape,
    storage_path: str,
    name: str,
    reporter: Reporter,
    storage_filesystem: Any = None,
) -> SearchOutcome:
    """Run the spec's search; Ray must be initialised. Trial checkpoints go under `storage_path`."""
    search = plan.spec.search
    assert search is not None
    metric, mode = metric_name(plan), plan.mode.value
    trainable = ray.tune.with_parameters(
        _trial, plan=plan, shape=shape, storage_path=storage_path, fs=storage_filesystem
    )
    trials_total = _planned_trials(search)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPUS}),
        param_space=param_space(search),
        tune_config=ray.tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=search.effective_trials,
            max_concurrent_trials=search.max_concurrent_trials,
            search_alg=_search_algorithm(search, metric, mode, plan.spec.hyperparameters.seed),
            scheduler=_scheduler(search, plan),
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=[_TrialBoard(reporter, trials_total, metric)],
        ),
    )
    before = placement_groups()
    try:
        results = tuner.fit()
    finally:
        # Trials that ASHA stops die with their TorchTrainer's controller, leaving their workers' groups.
        remove_leftover_placement_groups(before)
    # A trial that failed because the run cannot work (no CUDA on a GPU worker) makes the run invalid.
    invalid = next(filter(None, map(invalid_run_cause, results.errors)), None)
    if invalid is not None:
        raise invalid
    # "last": a finished trial's last report repeats its best validation metrics with its best weights.
    best = results.get_best_result(metric=metric, mode=mode, scope="last")
    if best.config is None or not best.metrics or CHECKPOINT_PATH_KEY not in best.metrics:
        raise RuntimeError("the search finished without a successful trial")
    path = str(best.metrics[CHECKPOINT_PATH_KEY])
    with Checkpoint(path=path, filesystem=storage_filesystem).as_directory() as folder:
        state = TrainingState.load(Path(folder))
    summary = _summary(best)
    trials = [_summary(results[i]) for i in range(len(results))]
    return SearchOutcome(summary["hyperparameters"], summary["validation"], state, trials)


def _summary(result: Any) -> dict[str, Any]:
    metrics = result.metrics or {}
    return {
        "hyperparameters": {spec_key(key): value for key, value in (result.config or {}).items()},
        "validation": {
            key.removeprefix("validation_"): float(value)
            for key, value in metrics.items()
            if key.startswith("validation_")
        },
        "reports": int(metrics.get("training_iteration", 0)),
        "error": str(result.error) if result.error else None,
    }


def _planned_trials(search: SearchSpec) -> int:
    """How many trials Tune will run: grid searches multiply the samples by the grid's size."""
    grid = 1
    for parameter in search.space.values():
        if _enumerated(parameter, search.algorithm):
            grid *= len(parameter.choices)
    return search.effective_trials * grid


def _trial_state(trial: Any) -> TrialState:
    status = str(getattr(trial, "status", ""))
    if status == "RUNNING":
        return TrialState.RUNNING
    if status == "ERROR":
        return TrialState.FAILED
    if status == "TERMINATED":
        # A trial that trains to its end reports `final`; one the scheduler stopped does not.
        finished = bool((trial.last_result or {}).get("final"))
        return TrialState.DONE if finished else TrialState.STOPPED_EARLY
    return TrialState.PENDING


class _TrialBoard(ray.tune.Callback):
    """Tells the reporter each trial's state, values and latest metric as the search goes."""

    def __init__(self, reporter: Reporter, total: int, metric: str) -> None:
        self.reporter: Reporter | None = reporter
        self.total, self.metric = total, metric

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the experiment state; the reporter (files, threads) stays here.
        return {**self.__dict__, "reporter": None}

    def _publish(self, trials: list[Any], ending: Any = None, ended: TrialState | None = None) -> None:
        if self.reporter is None:
            return
        rows = []
        for trial in trials:
            last = trial.last_result or {}
            metric = last.get(self.metric)
            state = ended if trial is ending and ended is not None else _trial_state(trial)
            row = TrialRow(
                trial_id=str(trial.trial_id),
                state=state,
                hyperparameters={spec_key(key): value for key, value in (trial.config or {}).items()},
                metric=float(metric) if isinstance(metric, int | float) else None,
                reports=int(last.get("training_iteration", 0)),
            )
            rows.append(row)
        self.reporter.trials(TrialBoard(self.metric.removeprefix("validation_"), rows, self.total))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._publish(trials)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        self._publish(trials)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # Called before Tune marks the trial terminated: its state is decided here.
        finished = bool((trial.last_result or {}).get("final"))
        self._publish(trials, trial, TrialState.DONE if finished else TrialState.STOPPED_EARLY)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._publish(trials, trial, TrialState.FAILED)
