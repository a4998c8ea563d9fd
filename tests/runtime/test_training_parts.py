"""The pieces the training loop is built from: metrics, schedules, step arithmetic, worker shapes, overrides."""

from __future__ import annotations

import pickle
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from kubetune.runtime.contract import Hyperparameters, Mode, WorkerResources
from kubetune.runtime.contract.report import VariantReport
from kubetune.runtime.evaluate import ConfusionCounts, classification_metrics
from kubetune.runtime.io.errors import DataError
from kubetune.runtime.io.storage import anchored
from kubetune.runtime.reporting.base import JsonLinesReporter, TrainingProgress, read_events
from kubetune.runtime.training.loop import SplitMetrics, evaluation_points, improved, steps_per_epoch
from kubetune.runtime.training.optim import build_optimizer, schedule_factor
from kubetune.runtime.training.plan import with_overrides
from kubetune.runtime.training.train import _forward, worker_shape
from kubetune.runtime.variants.export import spec_digest
from kubetune.runtime.variants.measure import best_variant

from .conftest import make_spec

pytestmark = pytest.mark.runtime


def test_accuracy_and_macro_f1_by_hand() -> None:
    expected = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    metrics = classification_metrics(predicted, expected, num_labels=4)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 per class: 0 → 2·2/(4+0+1)=0.8; 1 → 2/(2+1+1)=0.5; 2 → 2/(2+1+0)=2/3; 3 never seen → 0.
    assert metrics["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3 + 0.0) / 4)
    assert classification_metrics([1, 1], [1, 1], 2) == {"accuracy": 1.0, "f1": 0.5}


def test_counts_from_shards_add_up_to_the_whole() -> None:
    expected = [0, 1, 2, 1, 0, 2, 2, 1]
    predicted = [0, 2, 2, 1, 1, 2, 0, 1]
    whole = ConfusionCounts.empty(3)
    whole.add(predicted, expected, loss_sum=4.0)
    total = torch.zeros(3 * 3 + 2, dtype=torch.float64)
    for rank in range(3):
        shard = ConfusionCounts.empty(3)
        shard.add(predicted[rank::3], expected[rank::3], loss_sum=4.0 / 3)
        total += shard.as_tensor()
    assert ConfusionCounts.from_tensor(total, 3).metrics() == pytest.approx(whole.metrics())
    assert whole.metrics()["loss"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("schedule", "at_half", "at_end"), [("linear", 0.5, 0.0), ("cosine", 0.5, 0.0), ("constant", 1.0, 1.0)]
)
def test_schedules_warm_up_then_decay(schedule: str, at_half: float, at_end: float) -> None:
    hp = Hyperparameters.model_validate({"lrSchedule": schedule, "warmupSteps": 10})
    factor = schedule_factor(hp, total_steps=110)
    assert [round(factor(s), 3) for s in (0, 4, 9)] == [round(1 / 11, 3), round(5 / 11, 3), round(10 / 11, 3)]
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(at_half)
    assert factor(110) == pytest.approx(at_end, abs=1e-9)
    ratio = schedule_factor(Hyperparameters.model_validate({"warmupRatio": 0.5}), total_steps=10)
    assert ratio(4) < 1.0 and ratio(5) == pytest.approx(1.0)


def test_weight_decay_skips_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight = torch.nn.Parameter(torch.ones(4))
    model.register_module("LayerNorm", torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, Hyperparameters(weight_decay=0.1, optimizer="adamw"))
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert [tuple(p.shape) for p in decayed[0]["params"]] == [(4, 4)]
    assert isinstance(build_optimizer(model, Hyperparameters(optimizer="sgd")), torch.optim.SGD)


def test_step_arithmetic() -> None:
    # 100 examples over 2 workers, batches of 16: 50 each → 4 batches; accumulating 3 → 2 steps.
    assert steps_per_epoch(100, 2, 16, 3) == (4, 2)
    assert evaluation_points(10, 3) == {3, 7, 10}
    assert evaluation_points(2, 5) == {1, 2}
    assert improved(0.9, None, Mode.MAX, 0.0)
    assert not improved(0.905, 0.9, Mode.MAX, 0.01)
    assert improved(0.5, 0.6, Mode.MIN, 0.05)


def test_workers_fit_a_small_machine() -> None:
    two_on_two = worker_shape(WorkerResources(workers=2), cluster_cpus=2)
    assert (two_on_two.cpus_per_worker, two_on_two.threads_per_worker, two_on_two.use_gpu) == (0.9, 1, False)
    assert worker_shape(WorkerResources(workers=2), cluster_cpus=16).cpus_per_worker == 1.0
    given = worker_shape(WorkerResources(workers=1, cpus_per_worker=4, gpus_per_worker=1), cluster_cpus=8)
    assert (given.cpus_per_worker, given.threads_per_worker, given.use_gpu) == (4, 4, True)


def test_overrides_from_a_search(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tmp_path / "t.jsonl", tmp_path)
    changed = with_overrides(spec, {"learningRate": 0.01, "lora.rank": 4, "batchSize": 8})
    assert (changed.hyperparameters.learning_rate, changed.hyperparameters.batch_size) == (0.01, 8)
    assert changed.method.lora_options.rank == 4
    assert changed.method.lora_options.alpha == spec.method.lora_options.alpha
    assert with_overrides(spec, {}) is spec


def test_spec_digest_is_canonical(tmp_path: Path) -> None:
    spec = make_spec(tmp_path, tmp_path / "t.jsonl", tmp_path)
    same = type(spec).model_validate(dict(reversed(list(spec.to_wire().items()))))
    assert spec_digest(spec) == spec_digest(same)
    assert len(spec_digest(spec)) == 64 and all(c in "0123456789abcdef" for c in spec_digest(spec))
    assert spec_digest(spec) != spec_digest(with_overrides(spec, {"epochs": 3}))


def test_invalid_run_errors_survive_pickling() -> None:
    # Raised in a Ray worker, the error reaches the driver pickled.
    error = pickle.loads(pickle.dumps(DataError("data.train", "no examples in x.jsonl")))
    assert isinstance(error, DataError) and str(error) == "data.train: no examples in x.jsonl"


def test_relative_paths_are_anchored_where_the_run_starts(tmp_path: Path) -> None:
    assert anchored("data/train.jsonl", tmp_path) == str(tmp_path / "data" / "train.jsonl")
    assert anchored("s3://bucket/train.jsonl", tmp_path) == "s3://bucket/train.jsonl"
    assert anchored("/abs/train.jsonl", tmp_path) == "/abs/train.jsonl"
    assert anchored(None, tmp_path) is None


def _variant(size: int, latency: float | None, accepted: bool = True) -> VariantReport:
    return VariantReport(uri="file:///v", size_bytes=size, latency_ms_p50=latency, accepted=accepted)


BEST_CASES = [
    # (variants, compressed names, best)
    ({"full": _variant(100, 40.0), "merged": _variant(90, 40.0), "int8": _variant(25, 45.0)}, {"int8"}, "int8"),
    ({"full": _variant(100, 40.0), "merged": _variant(90, 40.0), "int8": _variant(25, 700.0)}, {"int8"}, "merged"),
    ({"full": _variant(90, 40.0), "int8": _variant(25, 50.0, accepted=False)}, {"int8"}, "full"),
    (
        {"full": _variant(90, 40.0), "int8": _variant(25, 50.0), "pruned": _variant(40, 41.0)},
        {"int8", "pruned"},
        "int8",
    ),
    ({"full": _variant(90, None), "int8": _variant(25, 900.0)}, {"int8"}, "int8"),
]


@pytest.mark.parametrize(("variants", "compressed", "best"), BEST_CASES)
def test_best_variant_is_small_accepted_and_fast_enough(
    variants: dict[str, VariantReport], compressed: set[str], best: str
) -> None:
    assert best_variant(variants, compressed) == best


def test_worker_events_reach_the_reporter_as_sent(tmp_path: Path) -> None:
    """Rank 0's typed events survive the relay queue (a pickle) and reach the matching reporter call."""
    progress = TrainingProgress(step=3, total_steps=8, epoch=0.75, loss=0.5, learning_rate=1e-3, epochs=2)
    events = tmp_path / "events.jsonl"
    reporter = JsonLinesReporter(events)
    for event in (progress, SplitMetrics("validation", {"accuracy": 0.9}, 3)):
        _forward(pickle.loads(pickle.dumps(event)), reporter)
    sent = [{k: v for k, v in e.items() if k not in {"event", "time"}} for e in read_events(events)]
    assert [e["event"] for e in read_events(events)] == ["progress", "metrics"]
    assert sent == [asdict(progress), {"split": "validation", "values": {"accuracy": 0.9}, "step": 3}]
