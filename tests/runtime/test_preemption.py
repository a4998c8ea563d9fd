"""A preempted worker (SIGTERM) saves a checkpoint at its step, and the run resumes from that step."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kubetune.runtime.contract import WorkerResources
from kubetune.runtime.data.load import load_data
from kubetune.runtime.io.settings import Faults, RuntimeSettings
from kubetune.runtime.reporting.base import JsonLinesReporter, read_events
from kubetune.runtime.training.plan import TrainingPlan
from kubetune.runtime.training.preemption import (
    PreemptionWatch,
    clear_notice,
    install_signal_handler,
    preemption_metrics,
)
from kubetune.runtime.training.train import train

from .conftest import make_spec

pytestmark = pytest.mark.runtime

# 256 training examples on 2 workers, batches of 16: 8 steps per epoch, periodic checkpoints after steps 4 and 8.
TRAINING = {"epochs": 1, "batchSize": 16, "evaluationsPerEpoch": 2, "learningRate": 1e-3}
PREEMPTED_AT = 6


def test_a_preempted_worker_resumes_from_the_step_it_was_stopped_at(
    ray_session: str, tiny_bert_dir: Path, topics_jsonl: Path, tmp_path: Path
) -> None:
    """Training alone (no evaluation or export around it), as a run's pipeline trains."""
    spec = make_spec(tiny_bert_dir, topics_jsonl, tmp_path, method={"type": "full"}, hyperparameters=TRAINING)
    # Rank 1 gets SIGTERM after step 6, between the periodic checkpoints of steps 4 and 8.
    notice = tmp_path / "notice"
    settings = RuntimeSettings(
        cache_dir=tmp_path / "cache", faults=Faults(preempt_step=PREEMPTED_AT), preemption_notice=notice
    )
    data = load_data(spec, settings)
    plan = TrainingPlan(spec, data.labels, data.train, data.validation, settings)
    events = tmp_path / "events.jsonl"
    resources = WorkerResources(workers=2, cpus_per_worker=0.45)
    busy_seen: set[str] = set()
    done = threading.Event()

    def watch_busy_markers() -> None:  # what a pod's preStop hook would see
        while not done.wait(0.05):
            busy_seen.update(path.name for path in tmp_path.glob("notice.*.busy"))

    watcher = threading.Thread(target=watch_busy_markers, daemon=True)
    watcher.start()
    try:
        outcome = train(plan, resources, tmp_path / "checkpoints", "train", JsonLinesReporter(events))
    finally:
        done.set()
        watcher.join()
    # Each worker of each attempt was busy while it trained, and none is once training is over.
    assert len(busy_seen) >= 2, busy_seen
    assert list(tmp_path.glob("notice.*.busy")) == []
    assert outcome.position.resumed_from_step == PREEMPTED_AT  # not 4, the last periodic checkpoint
    assert outcome.position.step == 8  # the whole plan, each step trained once
    steps = [e["step"] for e in read_events(events) if e["event"] == "progress"]
    # A resumed attempt's first progress always goes out: its first step is the one after the preemption.
    assert PREEMPTED_AT + 1 in steps, steps
    assert max(steps) == 8, steps


@pytest.fixture
def restored_sigterm() -> Iterator[None]:
    """This process's SIGTERM handler and notice as they were before the test."""
    previous = signal.getsignal(signal.SIGTERM)
    clear_notice()
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        clear_notice()


def test_sigterm_is_a_notice_and_a_second_one_goes_to_the_handler_before(restored_sigterm: None) -> None:
    received: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    assert install_signal_handler()
    assert install_signal_handler()  # idempotent: the handler before stays the one a second notice reaches
    watch = PreemptionWatch(None, world=1, device=torch.device("cpu"), signal_at_step=3)
    assert not watch.requested(2)
    assert watch.requested(3)  # the worker signalled itself: the process lives on, told to stop
    assert watch.requested(4) and received == []
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not received and time.monotonic() < deadline:
        time.sleep(0.01)
    assert received == [signal.SIGTERM]


def test_a_handler_needs_the_main_thread(restored_sigterm: None) -> None:
    results: list[bool] = []
    thread = threading.Thread(target=lambda: results.append(install_signal_handler()))
    thread.start()
    thread.join()
    assert results == [False]


def test_the_notice_file_tells_the_workers_of_its_pod(tmp_path: Path, restored_sigterm: None) -> None:
    notice = tmp_path / "preemption-notice"
    watch = PreemptionWatch(notice, world=1, device=torch.device("cpu"))
    assert not watch.requested(1)
    notice.touch()
    assert watch.requested(2)


def test_a_preemption_report_repeats_the_best_validation() -> None:
    assert preemption_metrics({"accuracy": 0.5}, step=6, epoch=0) == {
        "validation_accuracy": 0.5,
        "step": 6,
        "epoch": 0,
        "preempted": True,
    }
