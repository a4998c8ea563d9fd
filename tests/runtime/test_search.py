"""Hyperparameter search with Ray Tune on a tiny model: random with ASHA, TPE (Optuna) and grid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubetune.runtime.contract.report import RunReport
from kubetune.runtime.recipe.pipeline import run_pipeline
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events

from .conftest import fast_options, finite, make_spec, manifest_file

pytestmark = pytest.mark.runtime

NO_COMPRESSION = {"quantization": {"method": "none"}}


def _search(
    tiny_bert_dir: Path, topics_jsonl: Path, output: Path, search: dict[str, Any], **hyperparameters: Any
) -> tuple[RunReport, dict[str, Any], list[dict[str, Any]]]:
    spec = make_spec(
        tiny_bert_dir,
        topics_jsonl,
        output,
        method={"type": "full"},
        # Few examples: a trial's cost is mostly starting its Ray Train workers.
        data={"maxSamples": 96},
        hyperparameters={"epochs": 1, "batchSize": 16, "warmupRatio": 0.0, **hyperparameters},
        search=search,
        compression=NO_COMPRESSION,
    )
    events = output.parent / "events.jsonl"
    result = run_pipeline(spec, fast_options(output), JsonLinesReporter(events))
    manifest = json.loads(manifest_file(result).read_text())
    return result, manifest, read_events(events)


def test_random_search_with_asha_reports_the_best_trial(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    result, manifest, events = _search(
        tiny_bert_dir,
        topics_jsonl,
        tmp_path / "out",
        {
            "algorithm": "random",
            "scheduler": "asha",
            "asha": {"gracePeriod": 1, "reductionFactor": 2},
            "trials": 4,
            "maxConcurrentTrials": 2,
            "space": {
                "learningRate": {"type": "loguniform", "low": 1e-5, "high": 3e-3},
                "batchSize": {"type": "choice", "values": [16, 32]},
            },
        },
        evaluationsPerEpoch=3,
    )
    trials = manifest["search"]["trialResults"]
    assert result.trials_completed == len(trials) == 4
    assert all(trial["error"] is None for trial in trials)
    # The best trial has the highest (final) validation accuracy, and the run used its values.
    best = max(trials, key=lambda trial: trial["validation"]["accuracy"])
    assert result.best_hyperparameters is not None
    assert best["validation"]["accuracy"] == manifest["search"]["bestValidation"]["accuracy"]
    assert result.best_hyperparameters["learningRate"] == pytest.approx(
        next(t for t in trials if t["validation"] == manifest["search"]["bestValidation"])["hyperparameters"][
            "learningRate"
        ]
    )
    assert manifest["hyperparameters"]["learningRate"] == result.best_hyperparameters["learningRate"]
    assert manifest["hyperparameters"]["batchSize"] == result.best_hyperparameters["batchSize"]
    # Every trial validated at most 3 times plus its final report; ASHA may cut some short.
    assert all(1 <= trial["reports"] <= 4 for trial in trials)
    stages = [e["stage"] for e in events if e["event"] == "stage"]
    assert stages == ["load", "evaluate-base", "search", "evaluate", "compress", "export"]
    # The trial board: published as trials start, report and end; finished trials only add up.
    boards = [e for e in events if e["event"] == "trials"]
    counts = [board["completed"] for board in boards]
    assert counts == sorted(counts) and set(counts) == {0, 1, 2, 3, 4}
    final = boards[-1]["rows"]
    assert len(final) == 4 and all(row["metric"] is not None for row in final)
    # A trial that trained to its end made its final report; one ASHA stopped did not.
    assert all((row["state"] == "done") == (row["reports"] == 4) for row in final), final
    assert {row["state"] for row in final} <= {"done", "stopped early"}
    assert finite(result.metrics_after)["accuracy"] > 0
    _assert_cluster_is_free()


def _assert_cluster_is_free() -> None:
    """Trials stopped early must not leave CPUs reserved: later runs would wait for them forever."""
    import time

    import ray
    from kubetune.runtime.training.train import cluster_cpus

    def free_cpus() -> float:
        available: dict[str, float] = ray.available_resources()  # type: ignore[no-untyped-call]
        return available.get("CPU", 0.0)

    deadline = time.monotonic() + 30
    while free_cpus() < cluster_cpus() - 1e-6:
        assert time.monotonic() < deadline, free_cpus()
        time.sleep(0.5)


def test_tpe_search(ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path) -> None:
    result, manifest, _ = _search(
        tiny_bert_dir,
        topics_jsonl,
        tmp_path / "out",
        {
            "algorithm": "tpe",
            "metric": "loss",
            "trials": 2,
            "maxConcurrentTrials": 2,
            "space": {"learningRate": {"type": "loguniform", "low": 1e-4, "high": 3e-3}},
        },
    )
    trials = manifest["search"]["trialResults"]
    assert result.trials_completed == 2
    # metric loss: lower is better.
    assert manifest["search"]["bestValidation"]["loss"] == min(t["validation"]["loss"] for t in trials)
    assert len({t["hyperparameters"]["learningRate"] for t in trials}) == 2


def test_grid_search_tries_every_combination(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    result, manifest, _ = _search(
        tiny_bert_dir,
        topics_jsonl,
        tmp_path / "out",
        {
            "algorithm": "grid",
            "maxConcurrentTrials": 2,
            "space": {
                "learningRate": {"type": "grid", "values": [1e-4, 2e-3]},
                "warmupRatio": {"type": "choice", "values": [0.1]},
            },
        },
    )
    combinations = {
        (t["hyperparameters"]["learningRate"], t["hyperparameters"]["warmupRatio"])
        for t in manifest["search"]["trialResults"]
    }
    assert combinations == {(1e-4, 0.1), (2e-3, 0.1)}
    assert result.trials_completed == 2
